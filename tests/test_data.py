import json

import numpy as np
import pytest

from translate.data import Encoded, collate, padding_fraction, read_parallel, split_corpus, token_batches
from translate.errors import DataError
from translate.tokenizer import BOS, EOS, PAD


def test_reads_tsv(corpus):
    pairs = read_parallel(str(corpus["dev"]), "spa", "eng")
    assert len(pairs.src) == len(pairs.tgt) == 40
    assert pairs.src[0].endswith(".") and pairs.tgt[0][0].isupper()


def test_reads_reversed_direction(corpus):
    pairs = read_parallel(str(corpus["dev"]), "eng", "spa")
    forward = read_parallel(str(corpus["dev"]), "spa", "eng")
    assert pairs.src == forward.tgt and pairs.tgt == forward.src


def test_reads_text_pair_and_jsonl(tmp_path):
    (tmp_path / "train.es").write_text("Hola.\nAdiós.\n", encoding="utf-8")
    (tmp_path / "train.en").write_text("Hello.\nBye.\n", encoding="utf-8")
    pairs = read_parallel(str(tmp_path / "train"), "es", "en")
    assert pairs.src == ["Hola.", "Adiós."] and pairs.tgt == ["Hello.", "Bye."]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"es": s, "en": t}) + "\n" for s, t in zip(pairs.src, pairs.tgt)))
    assert read_parallel(str(jsonl), "es", "en").tgt == ["Hello.", "Bye."]


def test_numbers_stay_text(tmp_path):
    path = tmp_path / "n.tsv"
    path.write_text("spa\teng\n1984\t1984\nNA\tnull\n", encoding="utf-8")
    pairs = read_parallel(str(path), "spa", "eng")
    assert pairs.src == ["1984", "NA"] and pairs.tgt == ["1984", "null"]


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "file not found"),
    (lambda p: p.write_bytes(b"spa\teng\nhola\thello\n\xff\xfe\tbad\n"), r"line 3: not valid UTF-8"),
    (lambda p: p.write_text("spa\teng\nhola\thello\n\tbye\n"), r"line 3: empty 'spa' sentence"),
    (lambda p: p.write_text("es\ten\nhola\thello\n"), r"no column 'spa' \(columns: es, en\)"),
    (lambda p: p.write_text("spa\teng\n"), "the corpus is empty"),
    (lambda p: p.write_text(""), "the file is empty"),
])
def test_bad_tables(tmp_path, setup, message):
    path = tmp_path / "bad.tsv"
    setup(path)
    with pytest.raises(DataError, match=message):
        read_parallel(str(path), "spa", "eng")


def test_mismatched_text_pair(tmp_path):
    (tmp_path / "x.es").write_text("a\nb\nc\n")
    (tmp_path / "x.en").write_text("a\nb\n")
    with pytest.raises(DataError, match="has 3 lines but .* has 2"):
        read_parallel(str(tmp_path / "x"), "es", "en")


def test_missing_prefix_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_parallel(str(tmp_path / "nothing"), "es", "en")


def test_token_batches_cover_all_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=1000)
    batches = token_batches(lengths, 200, np.random.default_rng(1))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[batch]) * len(batch) <= 200
    assert padding_fraction(lengths, batches) < 0.1
    again = token_batches(lengths, 200, np.random.default_rng(1))
    assert [b.tolist() for b in batches] == [b.tolist() for b in again]


def reference_batches(lengths, budget, rng, pool_batches=50):
    """Sentence-by-sentence greedy packing, written plainly: what token_batches must equal."""
    order = rng.permutation(len(lengths))
    pool = max(1, int(pool_batches * budget / max(1.0, float(lengths.mean()))))
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start: start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batch, longest = [], 0
        for i in chunk.tolist():
            if batch and max(longest, lengths[i]) * (len(batch) + 1) > budget:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, lengths[i])
        if batch:
            batches.append(batch)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


@pytest.mark.parametrize("budget", [1, 37, 200, 5000])
def test_token_batches_equal_plain_greedy_packing(budget):
    lengths = np.random.default_rng(budget).integers(1, 90, size=3000).astype(np.uint16)
    fast = token_batches(lengths, budget, np.random.default_rng(5))
    plain = reference_batches(lengths.astype(np.int64), budget, np.random.default_rng(5))
    assert [b.tolist() for b in fast] == plain


def test_token_batches_leave_out_zero_lengths():
    lengths = np.array([3, 0, 4, 0, 5], dtype=np.uint16)
    batches = token_batches(lengths, 100, np.random.default_rng(0))
    assert sorted(i for b in batches for i in b.tolist()) == [0, 2, 4]


def test_collate_pads_and_masks():
    src = Encoded([[5, 6, 7], [8]])
    tgt = Encoded([[9], [10, 11]])
    batch = collate(src, tgt, [0, 1])
    assert batch.src.tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert batch.src_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.src_lengths.tolist() == [4, 2]
    assert batch.tgt_in.tolist() == [[BOS, 9, PAD], [BOS, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, EOS, PAD], [10, 11, EOS]]


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
