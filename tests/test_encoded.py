"""Tokenized corpora (encoded.py): in memory and on disk behind one interface, Dataset.map
tokenization cached on disk and reused, ids read back with pread."""

from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from translate.build import build_trainer
from translate.corpus import load_pairs
from translate.data import TrainingData, collate
from translate.encoded import DiskEncoded, Encoded, EncodedCorpus, tokenize_corpus

from .conftest import package_messages, tiny


def test_both_forms_declare_the_corpus_interface(corpus, tokenizer, hf_cache):
    sentences = [[5, 6, 7], [], [8]]
    memory = Encoded(sentences)
    src, _ = tokenize_corpus(load_pairs(str(corpus["dev"]), "spa", "eng"), tokenizer, "spa", "eng", num_proc=1)
    for encoded in (memory, src):
        assert isinstance(encoded, EncodedCorpus)
        assert len(encoded) == len(encoded.lengths)
        assert all(encoded[i].dtype == np.int32 and len(encoded[i]) == encoded.lengths[i] for i in range(len(encoded)))
    assert [memory[i].tolist() for i in range(3)] == sentences


def test_tokenized_corpus_matches_the_tokenizer_and_is_reused(corpus, tokenizer, hf_cache, caplog):
    caplog.set_level(logging.INFO, logger="translate")
    table = load_pairs(str(corpus["train"]), "spa", "eng")
    src, tgt = tokenize_corpus(table, tokenizer, "spa", "eng", num_proc=2)
    lines = package_messages(caplog)
    assert lines and lines[0].startswith("tokenizing 600 pairs with 2 process(es)")
    expected_src = tokenizer.encode_src(list(table["spa"]))
    expected_tgt = tokenizer.encode_tgt(list(table["eng"]))
    assert len(src) == len(tgt) == 600
    for i in (0, 1, 299, 599):
        assert src[i].tolist() == expected_src[i] and tgt[i].tolist() == expected_tgt[i]
    assert src.lengths.tolist() == [len(s) for s in expected_src]
    caplog.clear()
    src2, _ = tokenize_corpus(load_pairs(str(corpus["train"]), "spa", "eng"), tokenizer, "spa", "eng")
    again = package_messages(caplog)
    assert again and again[0].startswith("reusing the corpus tokenized by an earlier run")
    assert src2.ids_path == src.ids_path
    assert Path(src.ids_path).is_relative_to(hf_cache)  # beside the Arrow cache
    with pytest.raises(TypeError, match="pass its paths instead"):
        pickle.dumps(src)
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
    other = Tokenizer.train(list(table["spa"]), list(table["eng"]), vocab_size=60)
    second, _ = tokenize_corpus(table, other, "spa", "eng", num_proc=1)
    assert first.ids_path != second.ids_path


def test_training_reads_the_corpus_from_disk(corpus, tiny_tokenizer_file, tmp_path, hf_cache):
    trainer = build_trainer(tiny(corpus, tiny_tokenizer_file), tmp_path / "run")
    assert isinstance(trainer.data.src, DiskEncoded)
    assert len(trainer.data) == 600 and trainer.data.lengths.dtype == np.uint16
    assert Path(trainer.data.src.ids_path).is_relative_to(hf_cache)


def test_a_damaged_cache_is_tokenized_again(corpus, tokenizer, hf_cache, caplog):
    caplog.set_level(logging.INFO, logger="translate")
    table = load_pairs(str(corpus["dev"]), "spa", "eng")
    src, _ = tokenize_corpus(table, tokenizer, "spa", "eng", num_proc=1)
    expected = [src[i].tolist() for i in range(len(src))]
    ids = Path(src.ids_path)
    ids.write_bytes(ids.read_bytes()[:-8])  # a file cut short (a writer killed, a full disk)
    caplog.clear()
    again, _ = tokenize_corpus(load_pairs(str(corpus["dev"]), "spa", "eng"), tokenizer, "spa", "eng", num_proc=1)
    lines = package_messages(caplog)
    assert "does not match its manifest" in lines[0] and lines[1].startswith("tokenizing")
    assert [again[i].tolist() for i in range(len(again))] == expected
    assert not [p for p in ids.parent.parent.iterdir() if ".part-" in p.name or ".stale-" in p.name]


def test_a_writer_that_finishes_second_takes_the_first_ones_files(corpus, tokenizer, hf_cache, monkeypatch):
    """Two writers at once (nodes sharing a file system): each builds in its own directory, the
    first rename wins, the second drops its copy and reads the winner's."""
    from translate import encoded

    real = encoded._write_manifest
    winner = {}

    def slower(directory, key, pairs):  # just before this writer finishes, another one does
        monkeypatch.setattr(encoded, "_write_manifest", real)
        # ... on a node whose file system does not share this one's locks
        monkeypatch.setattr(encoded, "_locked", lambda directory, exclusive: contextlib.nullcontext())
        winner["src"], _ = tokenize_corpus(load_pairs(str(corpus["dev"]), "spa", "eng"), tokenizer, "spa", "eng",
                                           num_proc=1)
        real(directory, key, pairs)

    monkeypatch.setattr(encoded, "_write_manifest", slower)
    src, _ = tokenize_corpus(load_pairs(str(corpus["dev"]), "spa", "eng"), tokenizer, "spa", "eng", num_proc=1)
    assert src.ids_path == winner["src"].ids_path
    assert [src[i].tolist() for i in range(len(src))] == [winner["src"][i].tolist() for i in range(len(src))]
    siblings = [p.name for p in Path(src.ids_path).parent.parent.iterdir() if p.name.startswith("translate-")]
    assert len(siblings) == 1 and ".part-" not in siblings[0]


def test_a_cache_found_incomplete_is_checked_again_before_it_is_set_aside(corpus, tokenizer, hf_cache, monkeypatch,
                                                                           caplog):
    """A process that found no intact cache while another node's process was finishing it must
    not remove that cache, which the other node's ranks are opening: it checks again once it
    holds the lock alone, and reuses what it finds."""
    from translate import encoded

    caplog.set_level(logging.INFO, logger="translate")
    src, _ = tokenize_corpus(load_pairs(str(corpus["dev"]), "spa", "eng"), tokenizer, "spa", "eng", num_proc=1)
    directory = Path(src.ids_path).parent
    (directory / "opened-by-another-node").write_text("")
    real, looks = encoded._intact, []

    def first_look_too_early(*args):  # the first check ran before the other process's rename
        looks.append(args)
        return len(looks) > 1 and real(*args)

    monkeypatch.setattr(encoded, "_intact", first_look_too_early)
    caplog.clear()
    again, _ = tokenize_corpus(load_pairs(str(corpus["dev"]), "spa", "eng"), tokenizer, "spa", "eng", num_proc=1)
    assert (directory / "opened-by-another-node").exists() and again.ids_path == src.ids_path
    assert not any(line.startswith("tokenizing") for line in package_messages(caplog))
    assert [again[i].tolist() for i in range(len(again))] == [src[i].tolist() for i in range(len(src))]


def test_a_damaged_cache_is_set_aside_only_while_no_process_holds_it(corpus, tokenizer, hf_cache, monkeypatch):
    """Readers check and open the cache under a shared lock; setting aside and rebuilding happen
    under the exclusive one, so a process opening the cache is never left without it."""
    import fcntl
    import os

    from translate import encoded

    src, _ = tokenize_corpus(load_pairs(str(corpus["dev"]), "spa", "eng"), tokenizer, "spa", "eng", num_proc=1)
    expected = [src[i].tolist() for i in range(len(src))]
    ids = Path(src.ids_path)
    ids.write_bytes(ids.read_bytes()[:-8])
    lock = ids.parent.with_name(f".{ids.parent.name}.lock")
    states = []

    def can_share() -> bool:  # what another process (here: another open file) would get
        handle = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(handle)

    real_aside, real_flat = encoded._set_aside, encoded._write_flat
    monkeypatch.setattr(encoded, "_set_aside", lambda d: states.append(("aside", can_share())) or real_aside(d))
    monkeypatch.setattr(encoded, "_write_flat", lambda t, d: states.append(("build", can_share())) or real_flat(t, d))
    again, _ = tokenize_corpus(load_pairs(str(corpus["dev"]), "spa", "eng"), tokenizer, "spa", "eng", num_proc=1)
    assert states == [("aside", False), ("build", False)] and can_share()
    assert [again[i].tolist() for i in range(len(again))] == expected
