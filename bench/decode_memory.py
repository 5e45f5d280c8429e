"""Peak memory of ``translate decode`` as the input grows: streaming keeps it flat.

Runs ``translate decode`` (greedy) in a subprocess on generated files of each size and prints
the child's peak RSS. By default it uses a tiny randomly initialised model, so that a million
lines take minutes; the point is the pipeline's memory, not the translations.

    python bench/decode_memory.py --lines 10000,1000000
    python bench/decode_memory.py --lines 10000,100000 --checkpoint checkpoints/default
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "el la un una gato perro casa libro come bebe lee mira grande rojo agua pan sol y de en".split()


def tiny_checkpoint(directory: Path) -> Path:
    from translate.checkpoint import save_checkpoint
    from translate.config import load_config
    from translate.model import build_model
    from translate.tokenizer import Tokenizer

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    tokenizer = Tokenizer.train(lines, lines, vocab_size=60)
    config = load_config(overrides={"model.embed_dim": 32, "model.hidden_dim": 64})
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    path = directory / "tiny.pt"
    save_checkpoint(path, {"config": config.to_dict(), "model": model.state_dict(),
                           "tokenizer": {"src": tokenizer.src_proto, "tgt": tokenizer.tgt_proto},
                           "tokenizer_fingerprint": tokenizer.fingerprint})
    return path


def write_input(path: Path, lines: int) -> None:
    rng = random.Random(lines)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(lines):
            out.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", default="10000,1000000")
    parser.add_argument("--checkpoint", help="a real checkpoint instead of the tiny random one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or str(tiny_checkpoint(tmp))
        print(f"{'lines':>10} {'seconds':>8} {'lines/s':>9} {'peak RSS':>10} {'output lines':>13}")
        for n in (int(x) for x in args.lines.split(",")):
            src, out = tmp / f"in{n}.txt", tmp / f"out{n}.txt"
            write_input(src, n)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "translate.cli", "decode", checkpoint, "-i", str(src), "-o", str(out),
                            "--beam", "1", "--max-len-ratio", "1.0"], check=True)
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            with out.open("rb") as handle:
                produced = sum(1 for _ in handle)
            note = "" if peak > before else " (not above an earlier run's peak)"
            print(f"{n:>10,} {seconds:>8.1f} {n / seconds:>9.0f} {peak / 1024:>7.0f} MB {produced:>13,}{note}",
                  flush=True)
            src.unlink()
            out.unlink()


if __name__ == "__main__":
    main()
