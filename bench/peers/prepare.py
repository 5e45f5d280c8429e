"""Prepares the data that the three toolkits share for the peer benchmark.

From the bundled split (translate/bundled/train.tsv, dev.tsv, test.tsv: tab-separated, a header, columns
``spa`` and ``eng``; Spanish -> English) it writes into bench/peers/work/:

  spm.model, spm.vocab         ONE SentencePiece unigram model, joint vocabulary of 8,000,
                               character coverage 1.0, trained on the training Spanish + English
                               (ids pad=0, unk=1, bos=2, eos=3, the layout `translate` requires)
  train.es, train.en           piece files (space-separated pieces, one sentence a line);
                               training pairs with more than 50 pieces on either side dropped
  dev.es, dev.en, test.es, test.en   piece files, nothing dropped
  test.raw.es, test.raw.en     plain (detokenized) test sources and references
  vocab.joey.txt               one piece a line, without the specials (Joey adds its own)
  vocab.onmt.txt               "piece count" lines, counts from the training piece files
  stats.json                   counts, mean lengths, and the `translate` batch size in tokens
                               that gives about 64 sentences a batch

    python bench/peers/prepare.py [--data translate/bundled] [--out bench/peers/work] [--force]

Nothing is redone when stats.json already matches the inputs and settings (use --force).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import sys
from pathlib import Path

import sentencepiece as spm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VOCAB_SIZE = 8000
CHARACTER_COVERAGE = 1.0
MAX_PIECES = 50
BATCH_SENTENCES = 64
SPECIALS = {"<pad>", "<unk>", "<s>", "</s>"}


def read_tsv(path: Path, src: str = "spa", tgt: str = "eng") -> tuple[list[str], list[str]]:
    """The ``src`` and ``tgt`` columns of a tab-separated file with a header line."""
    with path.open(encoding="utf-8", newline="") as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
        try:
            i, j = header.index(src), header.index(tgt)
        except ValueError:
            sys.exit(f"{path}: needs columns {src!r} and {tgt!r}, has {header}")
        sources, targets = [], []
        for number, line in enumerate(handle, start=2):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) <= max(i, j):
                sys.exit(f"{path}:{number}: expected at least {max(i, j) + 1} tab-separated fields")
            sources.append(" ".join(fields[i].split()))
            targets.append(" ".join(fields[j].split()))
    return sources, targets


def write_lines(path: Path, lines) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line + "\n")
    tmp.replace(path)


def count_batches(lengths: list[int], order: list[int], batch_tokens: int, pool_batches: int = 50) -> int:
    """How many batches `translate` makes (translate/data.py token_batches: shuffled, sorted by
    length inside pools of ``pool_batches`` batches, filled up to ``batch_tokens`` padded tokens)."""
    mean = max(1.0, sum(lengths) / len(lengths))
    pool = max(1, int(pool_batches * batch_tokens / mean))
    count = 0
    for start in range(0, len(order), pool):
        size = longest = 0
        for length in sorted(lengths[i] for i in order[start: start + pool]):
            if size and max(longest, length) * (size + 1) > batch_tokens:
                count, size, longest = count + 1, 0, 0
            size, longest = size + 1, max(longest, length)
        count += 1 if size else 0
    return count


def batch_tokens_for(lengths: list[int], sentences: int = BATCH_SENTENCES) -> tuple[int, float]:
    """The smallest `translate` train.batch_tokens whose batches hold ``sentences`` on average."""
    order = list(range(len(lengths)))
    random.Random(42).shuffle(order)
    low, high = sentences, sentences * max(lengths)
    while low < high:
        mid = (low + high) // 2
        if len(lengths) / count_batches(lengths, order, mid) >= sentences:
            high = mid
        else:
            low = mid + 1
    return low, round(len(lengths) / count_batches(lengths, order, low), 2)


def fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256(f"{VOCAB_SIZE} {CHARACTER_COVERAGE} {MAX_PIECES} {BATCH_SENTENCES} v2".encode())
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "translate" / "bundled",
                        help="folder with train/dev/test.tsv")
    parser.add_argument("--out", type=Path, default=HERE / "work")
    parser.add_argument("--force", action="store_true", help="redo everything")
    args = parser.parse_args()

    inputs = [args.data / f"{name}.tsv" for name in ("train", "dev", "test")]
    for path in inputs:
        if not path.exists():
            sys.exit(f"{path} not found (give --data)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = fingerprint(inputs)
    stats_path = out / "stats.json"
    if stats_path.exists() and not args.force:
        old = json.loads(stats_path.read_text())
        if old.get("fingerprint") == stamp and all((out / f).exists() for f in old.get("files", [])):
            print(f"prepare: {out} is up to date (use --force to redo)")
            return

    train_src, train_tgt = read_tsv(inputs[0])
    print(f"prepare: training SentencePiece unigram, vocab {VOCAB_SIZE}, coverage {CHARACTER_COVERAGE}, "
          f"on {len(train_src):,} Spanish + {len(train_tgt):,} English sentences", flush=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s for s in train_src + train_tgt if s]), model_prefix=str(out / "spm"),
        vocab_size=VOCAB_SIZE, model_type="unigram", character_coverage=CHARACTER_COVERAGE,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=2, max_sentence_length=16384, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))

    stats: dict = {"fingerprint": stamp, "vocab_size": sp.get_piece_size(), "max_pieces": MAX_PIECES}
    files = ["spm.model", "spm.vocab"]
    counts: collections.Counter = collections.Counter()
    for name, (sources, targets) in (("train", (train_src, train_tgt)), ("dev", read_tsv(inputs[1])),
                                     ("test", read_tsv(inputs[2]))):
        src_pieces = sp.encode(sources, out_type=str)
        tgt_pieces = sp.encode(targets, out_type=str)
        keep = range(len(sources))
        if name == "train":
            keep = [k for k in keep if 0 < len(src_pieces[k]) <= MAX_PIECES and 0 < len(tgt_pieces[k]) <= MAX_PIECES]
            for k in keep:
                counts.update(src_pieces[k])
                counts.update(tgt_pieces[k])
            longer = [max(len(src_pieces[k]), len(tgt_pieces[k])) + 1 for k in keep]
            stats["train_pairs"] = len(keep)
            stats["train_dropped"] = len(sources) - len(keep)
            stats["train_mean_src_pieces"] = round(sum(len(src_pieces[k]) for k in keep) / len(keep), 3)
            stats["train_mean_tgt_pieces"] = round(sum(len(tgt_pieces[k]) for k in keep) / len(keep), 3)
            # `translate` batches by padded tokens (longer side + 1, length-bucketed): this many make
            # 64 sentences a batch on average.
            stats["translate_batch_tokens"], stats["translate_sentences_per_batch"] = batch_tokens_for(longer)
        else:
            empty = [k + 2 for k in keep if not src_pieces[k]]
            if empty:
                sys.exit(f"{name}.tsv has empty sources at lines {empty[:5]}: the peers would skip them")
            stats[f"{name}_pairs"] = len(sources)
        write_lines(out / f"{name}.es", (" ".join(src_pieces[k]) for k in keep))
        write_lines(out / f"{name}.en", (" ".join(tgt_pieces[k]) for k in keep))
        files += [f"{name}.es", f"{name}.en"]
        if name == "test":
            write_lines(out / "test.raw.es", sources)
            write_lines(out / "test.raw.en", targets)
            files += ["test.raw.es", "test.raw.en"]

    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    pieces = [p for p in pieces if p not in SPECIALS]
    write_lines(out / "vocab.joey.txt", pieces)
    # OpenNMT-py reads "token count"; pieces never seen in the training files get count 1
    write_lines(out / "vocab.onmt.txt", (f"{p} {max(counts[p], 1)}" for p in
                                         sorted(pieces, key=lambda p: -counts[p])))
    files += ["vocab.joey.txt", "vocab.onmt.txt"]
    stats["files"] = files
    stats_path.write_text(json.dumps(stats, indent=1) + "\n")
    print(f"prepare: {stats['train_pairs']:,} training pairs ({stats['train_dropped']:,} longer than "
          f"{MAX_PIECES} pieces dropped), dev {stats['dev_pairs']:,}, test {stats['test_pairs']:,}; "
          f"translate batch_tokens {stats['translate_batch_tokens']} ({stats['translate_sentences_per_batch']} "
          f"sentences a batch); files in {out}")


if __name__ == "__main__":
    main()
