"""Training speed of the default model (or ``--set`` overrides) on the bundled data.

Prints target tokens/s, sentences/s, ms/step, padding fraction, peak RSS and MFU (the model's
matmul FLOPs per second over a dense-matmul peak measured here, in the training precision).

    python bench/train_speed.py --steps 40
    python bench/train_speed.py --ratio 0.75 --set train.scheduled_sampling=sequential
    python bench/train_speed.py --profile --set model.input_feeding=true

``--profile`` runs the timed steps a second time under torch's profiler and prints how much of a
step the matrix products take (their kernels' own time) and the target tokens/s that a step
doing nothing but those products (and any fused RNN kernels) would reach: a bound that overhead
work cannot beat.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import forward_flops, matmul_peak_flops, peak_rss_mb

from translate.build import build_trainer
from translate.config import load_config, parse_overrides
from translate.data import collate, padding_fraction
from translate.runtime import configure_logging, configure_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--tokenizer", default="checkpoints/default/src.model",
                        help="an existing SentencePiece model (trained afresh when missing)")
    parser.add_argument("--ratio", type=float, default=1.0,
                        help="teacher-forcing ratio of the timed steps (1.0: pure teacher forcing; "
                             "below 1 times scheduled sampling)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the timed steps: the matrix products' share of a step (CPU)")
    args = parser.parse_args()
    configure_process()  # as the command line does
    configure_logging()

    overrides = {"train.max_minutes": 0, **parse_overrides(args.overrides)}
    if Path(args.tokenizer).is_file():
        overrides["tokenizer.model"] = args.tokenizer
    config = load_config(overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(config, run_dir, progress_bar=False)
        batches = trainer.data.epoch_batches(0)
        ratio = args.ratio

        def run(steps: int, offset: int = 0):
            for i in range(steps):
                batch = collate(trainer.data.src, trainer.data.tgt, batches[(i + offset) % len(batches)])
                trainer.progress.tf_ratio = ratio
                trainer.train_step(batch)
                yield batch

        tgt_tokens = src_tokens = sentences = pairs = 0
        for _ in run(args.warmup):
            pass
        start = time.perf_counter()
        for batch in run(args.steps, args.warmup):
            real_src = batch.src_lengths
            real_tgt = (batch.tgt_out != 0).sum(1)
            tgt_tokens += int(real_tgt.sum())
            src_tokens += int(real_src.sum())
            sentences += batch.size
            pairs += int((real_src * real_tgt).sum())
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        passes = 3.0 + (1.0 if config.train.scheduled_sampling == "parallel" and ratio < 1 else 0.0)
        flops = forward_flops(config.model, trainer.tokenizer.tgt_vocab_size, src_tokens, tgt_tokens, pairs) * passes
        dtype = trainer.amp_dtype or torch.float32
        on_gpu = trainer.device.type == "cuda"  # a GPU's peak needs a product big enough to fill it
        peak = matmul_peak_flops(dtype, size=8192 if on_gpu else 2048, repeats=20 if on_gpu else 5,
                                 device=trainer.device)
        rows = [
            ("device", f"{trainer.device} ({str(dtype).split('.')[-1]}, {torch.get_num_threads()} threads)"),
            ("teacher forcing", f"{config.train.scheduled_sampling}, ratio {ratio:.2f}"),
            ("target tokens/s", f"{tgt_tokens / seconds:,.0f}"),
            ("sentences/s", f"{sentences / seconds:,.1f}"),
            ("ms/step", f"{1000 * seconds / args.steps:,.1f}"),
            ("padding fraction", f"{padding_fraction(trainer.data.lengths, batches):.1%}"),
            ("peak RSS", f"{peak_rss_mb():,.0f} MB"),
            ("model GFLOP/s", f"{flops / seconds / 1e9:,.1f}"),
            ("matmul peak GFLOP/s", f"{peak / 1e9:,.1f}"),
            ("MFU", f"{flops / seconds / peak:.1%}" if peak == peak else "n/a"),
        ]
        if args.profile:
            rows += profile_rows(lambda: sum(1 for _ in run(args.steps, args.warmup)), args.steps, tgt_tokens)
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(dict(rows), indent=1) + "\n", encoding="utf-8")


# the kernels that multiply matrices (self time: what the product itself costs)
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_mkl_linear"}


def profile_rows(steps, n_steps: int, tgt_tokens: int) -> list[tuple[str, str]]:
    """Runs ``steps`` (the timed steps again) under the profiler; the products' share of a step and
    the bound it sets. The profiler slows the rest more than the products, so the share is a floor."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3  # ms, all steps
    products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS) / 1e3
    rnn = sum(e.self_cpu_time_total for e in events if "rnn" in e.key.lower()) / 1e3
    # a fused RNN kernel is mostly products it does not report apart, so the bound counts it whole
    return [("profiled ms/step", f"{total / n_steps:,.1f}"),
            ("products ms/step", f"{products / n_steps:,.1f} ({products / total:.0%})"),
            ("fused RNN ms/step", f"{rnn / n_steps:,.1f} ({rnn / total:.0%})"),
            ("products-only bound", f"{tgt_tokens / ((products + rnn) / 1e3):,.0f} target tok/s")]


if __name__ == "__main__":
    main()
