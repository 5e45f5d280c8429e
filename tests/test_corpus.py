"""The large-corpus path: Arrow through datasets, Dataset.map tokenization cached on disk,
ids read back with pread, streaming, and UTF-8 checks that never hold a whole file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from translate.checkpoint import load_checkpoint
from translate.cli import main
from translate.corpus import StreamingData, load_pairs, tokenize_corpus
from translate.data import Encoded, TrainingData, check_utf8_stream, collate
from translate.errors import DataError
from translate.training import Trainer, train

from .conftest import tiny


def test_tokenized_corpus_matches_the_tokenizer_and_is_reused(corpus, tokenizer, hf_cache):
    table = load_pairs(str(corpus["train"]), "spa", "eng")
    lines = []
    src, tgt = tokenize_corpus(table, tokenizer, "spa", "eng", num_proc=2, log=lines.append)
    assert lines and lines[0].startswith("tokenizing 600 pairs with 2 process(es)")
    expected_src = tokenizer.encode_src(table["spa"])
    expected_tgt = tokenizer.encode_tgt(table["eng"])
    assert len(src) == len(tgt) == 600
    for i in (0, 1, 299, 599):
        assert src[i].tolist() == expected_src[i] and tgt[i].tolist() == expected_tgt[i]
    assert src.lengths.tolist() == [len(s) for s in expected_src]
    again = []
    src2, _ = tokenize_corpus(load_pairs(str(corpus["train"]), "spa", "eng"), tokenizer, "spa", "eng", log=again.append)
    assert again and again[0].startswith("reusing the tokenized corpus")
    assert src2.ids_path == src.ids_path
    # batches from disk equal batches from memory
    on_disk = TrainingData(src, tgt, 300, seed=3)
    in_memory = TrainingData(Encoded(expected_src), Encoded(expected_tgt), 300, seed=3)
    for a, b in zip(on_disk.epoch_batches(0)[:5], in_memory.epoch_batches(0)[:5]):
        assert a.tolist() == b.tolist()
        x, y = collate(src, tgt, a), collate(in_memory.src, in_memory.tgt, b)
        assert torch.equal(x.src, y.src) and torch.equal(x.tgt_out, y.tgt_out)


def test_another_tokenizer_gets_its_own_cache(corpus, tokenizer, hf_cache):
    from translate.tokenizer import Tokenizer

    table = load_pairs(str(corpus["train"]), "spa", "eng")
    first, _ = tokenize_corpus(table, tokenizer, "spa", "eng", num_proc=1)
    other = Tokenizer.train(table["spa"], table["eng"], vocab_size=60)
    second, _ = tokenize_corpus(table, other, "spa", "eng", num_proc=1)
    assert first.ids_path != second.ids_path


def test_text_pair_files_and_line_counts(tmp_path, hf_cache):
    (tmp_path / "c.es").write_text("hola\nadiós\n", encoding="utf-8")
    (tmp_path / "c.en").write_text("hello\nbye\n", encoding="utf-8")
    table = load_pairs(str(tmp_path / "c"), "es", "en")
    assert table["es"] == ["hola", "adiós"] and table["en"] == ["hello", "bye"]
    (tmp_path / "d.es").write_text("hola\nadiós\n", encoding="utf-8")
    (tmp_path / "d.en").write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match="has 2 lines but .* has 1"):
        load_pairs(str(tmp_path / "d"), "es", "en")
    (tmp_path / "e.es").write_text("hola\n\n", encoding="utf-8")
    (tmp_path / "e.en").write_text("hello\nbye\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: empty 'es' sentence"):
        load_pairs(str(tmp_path / "e"), "es", "en")


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_utf8_stream_check_names_the_line_across_chunks(tmp_path, chunk):
    path = tmp_path / "x.tsv"
    path.write_bytes("spa\teng\naño\tyear\nsí\tyes\n".encode() + b"mal\xe9\tbad\n")
    with pytest.raises(DataError, match="line 4: not valid UTF-8"):
        check_utf8_stream(path, chunk_size=chunk)
    path.write_bytes("spa\teng\naño\tyear\n".encode())
    assert check_utf8_stream(path, chunk_size=chunk) == "spa\teng"
    path.write_bytes(b"  \n\n")
    with pytest.raises(DataError, match="the file is empty"):
        check_utf8_stream(path, chunk_size=chunk)


def test_streaming_batches_cover_the_corpus(corpus, tokenizer, hf_cache):
    table = load_pairs(str(corpus["train"]), "spa", "eng", streaming=True)
    data = StreamingData(table, tokenizer, "spa", "eng", batch_tokens=300, seed=1, max_len=80, pool_batches=2)
    assert data.pool == 1000
    seen, positions = 0, []
    for position, batches, tokens in data.steps(0, 0, 1, slice(0, 1)):
        positions.append(position)
        seen += batches[0].size
        assert tokens == int((batches[0].tgt_out != 0).sum())
    assert seen == 600 and positions == list(range(1, len(positions) + 1))
    resumed = [p for p, _, _ in data.steps(0, 3, 1, slice(0, 1))]
    assert resumed == positions[3:]


def test_streaming_training_through_the_cli_and_resume(corpus, tiny_tokenizer_file, tmp_path, hf_cache):
    import yaml

    config = tiny(corpus, tiny_tokenizer_file, **{"model.dropout": 0.0, "train.max_steps": 6, "train.eval_every": 3,
                                                   "train.lr_schedule": "constant",
                                                   "train.amp": False})
    whole = train(config.override({"data.streaming": True}), tmp_path / "whole", log=lambda s: None)
    assert whole.progress.step == 6
    half = config.override({"data.streaming": True, "train.max_steps": 3})
    train(half, tmp_path / "split", log=lambda s: None)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    result = CliRunner().invoke(main, ["train", "--config", str(config_file), "--streaming", "--run-dir",
                                       str(tmp_path / "split"), "--resume", "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_reads_the_corpus_from_disk(corpus, tiny_tokenizer_file, tmp_path, hf_cache):
    trainer = Trainer(tiny(corpus, tiny_tokenizer_file), tmp_path / "run", log=lambda s: None)
    assert type(trainer.data.src).__name__ == "DiskEncoded"
    assert len(trainer.data) == 600 and trainer.data.lengths.dtype == np.uint16
    assert Path(trainer.data.src.ids_path).is_relative_to(hf_cache)


def test_tokenizer_sample_is_streamed_seeded_and_in_corpus_order(corpus, hf_cache, monkeypatch):
    import random

    from translate import corpus as corpus_module

    monkeypatch.setattr(corpus_module, "CHUNK", 64)  # several chunks, also for in-memory views
    table = load_pairs(str(corpus["train"]), "spa", "eng")
    everything = [str(s) for s in table["spa"]]
    assert corpus_module.sample_sentences(table, "spa", 10_000, seed=3) == everything
    rows = sorted(random.Random(3).sample(range(len(everything)), 50))
    sample = corpus_module.sample_sentences(table, "spa", 50, seed=3)
    assert sample == [everything[i] for i in rows]
    assert corpus_module.sample_sentences(table, "spa", 50, seed=4) != sample
    # the same from a view that is not simply a stored file (read through datasets' own batches)
    view = table.select(range(len(everything) - 1, -1, -1))
    assert corpus_module.sample_sentences(view, "spa", 10_000, seed=3) == everything[::-1]


def test_arrow_files_are_written_in_large_record_batches(tmp_path, hf_cache):
    import pyarrow as pa

    path = tmp_path / "big.tsv"
    path.write_text("spa\teng\n" + "".join(f"Frase {i}.\tSentence {i}.\n" for i in range(2500)), encoding="utf-8")
    table = load_pairs(str(path), "spa", "eng")
    with pa.OSFile(table.cache_files[0]["filename"]) as source:
        batches = sum(1 for _ in pa.ipc.open_stream(source))
    assert batches == 1  # not one per 1,000 rows, as datasets writes by default


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_released_arrow_pages_leave_the_process_and_the_data_stays(tmp_path):
    import pyarrow as pa

    from translate.corpus import release_mapped_pages

    def resident_file_kb() -> int:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(status["RssFile"].split()[0])

    path = tmp_path / "data.arrow"
    table = pa.table({"s": [f"sentence number {i} " * 4 for i in range(200_000)]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    mapped = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    text = mapped.column("s").to_pylist()  # every page of the file read through the map
    before = resident_file_kb()
    assert release_mapped_pages() >= path.stat().st_size
    assert resident_file_kb() < before - path.stat().st_size // 2048  # at least half the file gone
    assert mapped.column("s").to_pylist() == text  # and still readable
