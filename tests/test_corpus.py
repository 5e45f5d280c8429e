"""Reading corpora (corpus.py): every format through datasets into Arrow, the same checks and
one-line messages for training, dev and test sets, streamed UTF-8 checks, the line readers, and
the split that made the bundled data."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import pytest

from translate import corpus as corpus_module
from translate.config import BUNDLED_DATA, PACKAGE_DIR, load_config
from translate.corpus import (
    check_utf8,
    column_chunks,
    iter_lines,
    load_pairs,
    no_tqdm_monitor,
    read_lines,
    read_parallel,
    sample_sentences,
    split_corpus,
)
from translate.errors import DataError

PAIRS = [("Hola.", "Hello."), ("Adiós, amigo.", "Bye, friend."), ("1984", "1984"), ("NA", "null")]


def write_formats(root: Path) -> dict[str, str]:
    """The same pairs as a TSV, a CSV, a JSON-lines file and a pair of text files."""
    (root / "c.tsv").write_text("es\ten\n" + "".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    (root / "c.csv").write_text("en,es\n" + "".join(f"{t},{s}\n" for s, t in PAIRS if "," not in s + t),
                                encoding="utf-8")
    (root / "c.jsonl").write_text("".join(json.dumps({"es": s, "en": t}) + "\n" for s, t in PAIRS), encoding="utf-8")
    (root / "c.es").write_text("".join(s + "\n" for s, _ in PAIRS), encoding="utf-8")
    (root / "c.en").write_text("".join(t + "\n" for _, t in PAIRS), encoding="utf-8")
    return {"tsv": str(root / "c.tsv"), "csv": str(root / "c.csv"), "jsonl": str(root / "c.jsonl"),
            "pair": str(root / "c")}


def column(table, name: str) -> list[str]:
    return [s for chunk in column_chunks(table, name) for s in chunk.to_pylist()]


@pytest.mark.parametrize("form", ["tsv", "csv", "jsonl", "pair"])
def test_read_parallel_is_what_load_pairs_reads(tmp_path, hf_cache, form):
    spec = write_formats(tmp_path)[form]
    pairs = read_parallel(spec, "es", "en", "dev")
    table = load_pairs(spec, "es", "en", "dev")
    assert pairs.src == column(table, "es") and pairs.tgt == column(table, "en")
    expected = [p for p in PAIRS if form != "csv" or "," not in p[0] + p[1]]
    assert list(zip(pairs.src, pairs.tgt)) == expected  # numbers and NA stay text
    assert pairs.origin == (f"{tmp_path / 'c'}.{{es,en}}" if form == "pair" else spec)


def test_read_parallel_from_the_hub_layout(monkeypatch, hf_cache):
    import datasets

    rows = {"translation": [{"es": s, "en": t} for s, t in PAIRS]}
    asked = []

    def fake_load(name, config=None, split=None, streaming=False):
        asked.append((name, config, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    pairs = read_parallel("someone/corpus:es-en", "es", "en", "dev")
    assert asked == [("someone/corpus", "es-en", "validation")]
    assert list(zip(pairs.src, pairs.tgt)) == PAIRS and pairs.origin == "someone/corpus:es-en"
    table = load_pairs("someone/corpus:es-en", "es", "en", "dev")
    assert column(table, "es") == pairs.src and column(table, "en") == pairs.tgt
    with pytest.raises(DataError, match=r"someone/corpus: no fields 'es'/'fr' \(columns: translation\)"):
        read_parallel("someone/corpus", "es", "fr", "test")


def test_reads_tsv(corpus):
    pairs = read_parallel(str(corpus["dev"]), "spa", "eng")
    assert len(pairs.src) == len(pairs.tgt) == 40
    assert pairs.src[0].endswith(".") and pairs.tgt[0][0].isupper()


def test_reads_reversed_direction(corpus):
    pairs = read_parallel(str(corpus["dev"]), "eng", "spa")
    forward = read_parallel(str(corpus["dev"]), "spa", "eng")
    assert pairs.src == forward.tgt and pairs.tgt == forward.src


def test_json_numbers_are_sentences(tmp_path, hf_cache):
    path = tmp_path / "n.jsonl"
    path.write_text('{"es": 1984, "en": "1984"}\n{"es": "dos", "en": "two"}\n', encoding="utf-8")
    assert read_parallel(str(path), "es", "en").src == ["1984", "dos"]


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "file not found"),
    (lambda p: p.write_bytes(b"spa\teng\nhola\thello\n\xff\xfe\tbad\n"), r"line 3: not valid UTF-8"),
    (lambda p: p.write_text("spa\teng\nhola\thello\n\tbye\n"), r"line 3: empty 'spa' sentence"),
    (lambda p: p.write_text("es\ten\nhola\thello\n"), r"no column 'spa' \(columns: es, en\)"),
    (lambda p: p.write_text("spa\teng\n"), r"the corpus is empty \(a header and no pairs\)"),
    (lambda p: p.write_text(""), "the file is empty"),
])
@pytest.mark.parametrize("reader", [read_parallel, load_pairs])
def test_bad_tables(tmp_path, setup, message, reader):
    path = tmp_path / "bad.tsv"
    setup(path)
    with pytest.raises(DataError, match=message):
        reader(str(path), "spa", "eng")


def test_a_table_of_any_suffix_counts_its_header_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("spa\teng\nhola\thello\nadiós\t \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"corpus.txt line 3: empty 'eng' sentence"):
        read_parallel(str(path), "spa", "eng")


def test_text_pair_files_and_line_counts(tmp_path, hf_cache):
    (tmp_path / "c.es").write_text("hola\nadiós\n", encoding="utf-8")
    (tmp_path / "c.en").write_text("hello\nbye\n", encoding="utf-8")
    table = load_pairs(str(tmp_path / "c"), "es", "en")
    assert column(table, "es") == ["hola", "adiós"] and column(table, "en") == ["hello", "bye"]
    (tmp_path / "d.es").write_text("hola\nadiós\n", encoding="utf-8")
    (tmp_path / "d.en").write_text("hello\n", encoding="utf-8")
    (tmp_path / "e.es").write_text("hola\n\n", encoding="utf-8")
    (tmp_path / "e.en").write_text("hello\nbye\n", encoding="utf-8")
    for reader in (load_pairs, read_parallel):
        with pytest.raises(DataError, match="has 2 lines but .* has 1"):
            reader(str(tmp_path / "d"), "es", "en")
        with pytest.raises(DataError, match=r"e\.\{es,en\} line 2: empty 'es' sentence"):
            reader(str(tmp_path / "e"), "es", "en")


def test_missing_prefix_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_parallel(str(tmp_path / "nothing"), "es", "en")


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_utf8_check_names_the_line_across_chunks(tmp_path, chunk):
    path = tmp_path / "x.tsv"
    path.write_bytes("spa\teng\naño\tyear\nsí\tyes\n".encode() + b"mal\xe9\tbad\n")
    with pytest.raises(DataError, match="line 4: not valid UTF-8"):
        check_utf8(path, chunk_size=chunk)
    path.write_bytes("spa\teng\naño\tyear\n".encode())
    assert check_utf8(path, chunk_size=chunk) == "spa\teng"
    path.write_bytes(b"  \n\n")
    with pytest.raises(DataError, match="the file is empty"):
        check_utf8(path, chunk_size=chunk)
    assert check_utf8(path, chunk_size=chunk, require_text=False) == "  "


@pytest.mark.parametrize("content,expected", [
    (b"", []), (b"\n\n", ["", ""]), ("uno\r\ndós\n\ntres".encode(), ["uno", "dós", "", "tres"]),
    (b"a\nb\n", ["a", "b"]),
])
def test_read_lines_is_iter_lines(tmp_path, monkeypatch, content, expected):
    path = tmp_path / "in.txt"
    path.write_bytes(content)
    assert read_lines(str(path)) == list(iter_lines(str(path))) == expected
    for reader in (iter_lines, read_lines):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(content)))
        assert list(reader("-")) == expected


def test_line_readers_name_the_bad_line(tmp_path, monkeypatch):
    path = tmp_path / "latin1.txt"
    path.write_bytes("uno\naño\n".encode("latin-1"))
    for reader in (iter_lines, read_lines):
        with pytest.raises(DataError, match="latin1.txt line 2: not valid UTF-8"):
            list(reader(str(path)))
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(path.read_bytes())))
        with pytest.raises(DataError, match="stdin line 2: not valid UTF-8"):
            list(reader(None))
        with pytest.raises(DataError, match="file not found"):
            list(reader(str(tmp_path / "missing.txt")))
        with pytest.raises(DataError, match="is a directory"):
            list(reader(str(tmp_path)))


def test_tokenizer_sample_is_streamed_seeded_and_in_corpus_order(corpus, hf_cache, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK", 64)  # several chunks, also for in-memory views
    table = load_pairs(str(corpus["train"]), "spa", "eng")
    everything = column(table, "spa")
    assert sample_sentences(table, "spa", 10_000, seed=3) == everything
    rows = sorted(random.Random(3).sample(range(len(everything)), 50))
    sample = sample_sentences(table, "spa", 50, seed=3)
    assert sample == [everything[i] for i in rows]
    assert sample_sentences(table, "spa", 50, seed=4) != sample
    # the same from a view that is not simply a stored file (read through datasets' own batches)
    view = table.select(range(len(everything) - 1, -1, -1))
    assert sample_sentences(view, "spa", 10_000, seed=3) == everything[::-1]


def test_arrow_files_are_written_in_large_record_batches(tmp_path, hf_cache):
    import pyarrow as pa

    path = tmp_path / "big.tsv"
    path.write_text("spa\teng\n" + "".join(f"Frase {i}.\tSentence {i}.\n" for i in range(2500)), encoding="utf-8")
    table = load_pairs(str(path), "spa", "eng")
    with pa.OSFile(table.cache_files[0]["filename"]) as source:
        batches = sum(1 for _ in pa.ipc.open_stream(source))
    assert batches == 1  # not one per 1,000 rows, as datasets writes by default


def test_split_by_english_sentence(tmp_path):
    rows = [f"es{i}-{j}\ten{i}\tattr" for i in range(300) for j in range(1 + i % 3)]
    src = tmp_path / "all.tsv"
    src.write_text("spa\teng\tattribution\n" + "\n".join(rows) + "\n")
    sizes = split_corpus(src, tmp_path / "out", dev_size=50, test_size=80, seed=3)
    assert sizes == {"test": 80, "dev": 50, "train": len(rows) - 130}
    english = {}
    for name in ("train", "dev", "test"):
        lines = (tmp_path / "out" / f"{name}.tsv").read_text().splitlines()
        assert lines[0] == "spa\teng\tattribution"
        english[name] = {line.split("\t")[1] for line in lines[1:]}
    assert not english["train"] & english["dev"] and not english["train"] & english["test"]
    assert not english["dev"] & english["test"]
    again = split_corpus(src, tmp_path / "again", dev_size=50, test_size=80, seed=3)
    assert again == sizes
    assert (tmp_path / "again" / "test.tsv").read_text() == (tmp_path / "out" / "test.tsv").read_text()


def test_the_bundled_split_is_inside_the_package():
    assert BUNDLED_DATA.parent == PACKAGE_DIR
    data = load_config().data
    for name in (data.train, data.dev, data.test):
        assert Path(name).is_file() and Path(name).parent == BUNDLED_DATA
    assert check_utf8(BUNDLED_DATA / "dev.tsv").split("\t")[:2] == ["spa", "eng"]


def test_the_tqdm_switch_keeps_bars_from_starting_the_monitor_thread(monkeypatch):
    """A monitor thread would stay for the process's life, and a process with another thread
    decodes in threads, not forked processes (translator.can_fork)."""
    import tqdm

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 10)
    monkeypatch.setattr(tqdm.tqdm, "monitor", None)
    no_tqdm_monitor()
    with tqdm.tqdm(total=3, file=io.StringIO()) as bar:
        bar.update(3)
    assert tqdm.tqdm.monitor is None
