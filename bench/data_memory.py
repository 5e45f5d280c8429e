"""Memory and speed of the training-data pipeline as the corpus grows (the model left out).

For each size it generates that many sentence pairs into a TSV file, then, in a fresh process,
runs what ``translate train`` runs before the first step and during an epoch: read the TSV
through ``datasets`` into Arrow, tokenize it with ``Dataset.map`` into the on-disk corpus, build
the length-bucketed batches of one epoch and collate every batch. It prints the wall time of
each stage, tokenization throughput, and the peak RSS of the main process and of the
tokenizing worker processes. Peak RSS counts the pages of memory-mapped Arrow files that were
read (page cache: shared, clean, dropped first under memory pressure), so the private
(anonymous) and mapped (file-backed) peaks are shown apart. A second pass over the same files
shows the cached reuse.

    python bench/data_memory.py --pairs 100000,1000000,10000000
    python bench/data_memory.py --pairs 100000 --keep /tmp/corpora   # keep the generated files
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPANISH = ("el la los las un una gato perro casa libro agua pan sol luna niño niña hombre mujer ciudad "
           "tren mesa silla come bebe lee mira tiene quiere puede va viene hace dice grande pequeño rojo "
           "azul verde nuevo viejo bueno malo y o pero porque cuando donde muy más menos hoy mañana ayer "
           "siempre nunca aquí allí escuela trabajo familia amigo tiempo año día noche").split()
ENGLISH = ("the a cat dog house book water bread sun moon boy girl man woman city train table chair "
           "eats drinks reads looks has wants can goes comes does says big small red blue green new old "
           "good bad and or but because when where very more less today tomorrow yesterday always never "
           "here there school work family friend time year day night").split()


def generate(path: Path, pairs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        out.write("spa\teng\n")
        for _ in range(pairs):
            n = rng.randint(3, 14)
            src = " ".join(rng.choice(SPANISH) for _ in range(n)).capitalize() + "."
            tgt = " ".join(rng.choice(ENGLISH) for _ in range(n + rng.randint(-1, 2))).capitalize() + "."
            out.write(f"{src}\t{tgt}\n")


def measure(tsv: str, tokenizer_dir: str, batch_tokens: int, num_proc: int) -> dict:
    """One run of the pipeline in this process (called in a child, so peak RSS is its own)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from translate.corpus import load_pairs
    from translate.data import TrainingData, collate
    from translate.encoded import tokenize_corpus
    from translate.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = {"anon": 0, "file": 0}
    stop = threading.Event()

    def sample() -> None:  # private (anonymous) and file-backed resident memory, every 20 ms
        while not stop.is_set():
            status = Path("/proc/self/status").read_text().splitlines()
            fields = dict(line.split(":", 1) for line in status if ":" in line)
            peaks["anon"] = max(peaks["anon"], int(fields["RssAnon"].split()[0]) // 1024)
            peaks["file"] = max(peaks["file"], int(fields["RssFile"].split()[0]) // 1024)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    table = load_pairs(tsv, "spa", "eng")
    t1 = time.perf_counter()
    src, tgt = tokenize_corpus(table, tokenizer, "spa", "eng", num_proc)
    pairs = len(table)
    del table  # as training does: batches read the tokenized files
    t2 = time.perf_counter()
    data = TrainingData(src, tgt, batch_tokens, seed=1, max_len=80)
    batches = data.epoch_batches(0)
    tokens = 0
    for indices in batches:
        batch = collate(data.src, data.tgt, indices)
        tokens += int(batch.tgt_out.ne(0).sum())
    t3 = time.perf_counter()
    stop.set()
    sampler.join()
    return {"peak_anon_mb": peaks["anon"], "peak_file_mb": peaks["file"], "pairs": pairs,
            "load_s": round(t1 - t0, 1), "tokenize_s": round(t2 - t1, 1),
            "tokenize_pairs_per_s": round(pairs / max(t2 - t1, 1e-9)), "epoch_s": round(t3 - t2, 1),
            "batches": len(batches), "target_tokens": tokens, "baseline_rss_mb": round(baseline),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "workers_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "lengths_bytes": int(data.lengths.nbytes + src.lengths.nbytes + tgt.lengths.nbytes),
            "epoch_order_bytes": int(sum(b.nbytes for b in batches)), "dtype": str(np.asarray(batches[0]).dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="100000,1000000,10000000")
    parser.add_argument("--batch-tokens", type=int, default=1500)
    parser.add_argument("--num-proc", type=int, default=2, help="tokenizing processes")
    parser.add_argument("--keep", help="directory for the generated corpora and caches (default: a temporary one)")
    parser.add_argument("--child", nargs=2, metavar=("TSV", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.batch_tokens, args.num_proc)))
        return

    sys.path.insert(0, str(REPO))
    from translate.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_DATASETS_CACHE": str(root / "hf-cache"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
        sample = root / "tokenizer-sample.tsv"
        generate(sample, 20_000, seed=99)
        lines = sample.read_text(encoding="utf-8").splitlines()[1:]
        tokenizer = Tokenizer.train([row.split("\t")[0] for row in lines], [row.split("\t")[1] for row in lines], 8000)
        (root / "tokenizer").mkdir(exist_ok=True)
        tokenizer.save(root / "tokenizer")
        print(f"{'pairs':>11} {'pass':>6} {'load s':>7} {'tokenize s':>10} {'pairs/s':>9} {'epoch s':>8} "
              f"{'batches':>8} {'RSS start':>9} {'peak RSS':>9} {'private':>8} {'mapped':>8} {'workers':>8}")
        for n in (int(x) for x in args.pairs.split(",")):
            tsv = root / f"pairs-{n}.tsv"
            if not tsv.exists():
                generate(tsv, n)
            for run in ("first", "cached"):
                out = subprocess.run([sys.executable, __file__, "--child", str(tsv), str(root / "tokenizer"),
                                      "--batch-tokens", str(args.batch_tokens), "--num-proc", str(args.num_proc)],
                                     env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(out.stderr[-3000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{r['pairs']:>11,} {run:>6} {r['load_s']:>7} {r['tokenize_s']:>10} "
                      f"{r['tokenize_pairs_per_s']:>9,} {r['epoch_s']:>8} {r['batches']:>8,} "
                      f"{r['baseline_rss_mb']:>6} MB {r['peak_rss_mb']:>6} MB "
                      f"{r['peak_anon_mb']:>5} MB {r['peak_file_mb']:>5} MB "
                      f"{r['workers_peak_rss_mb']:>5} MB",
                      flush=True)


if __name__ == "__main__":
    main()
