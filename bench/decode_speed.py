"""Decoding speed and quality on the bundled test split: greedy and beam 5, at batch sizes 1
and 64 sentences. Prints sentences/s, target tokens/s, peak RSS and the BLEU reached.

    python bench/decode_speed.py checkpoints/default
    python bench/decode_speed.py checkpoints/default --limit 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb

from translate.config import BUNDLED_DATA
from translate.corpus import read_parallel
from translate.evaluate import score
from translate.runtime import configure_process
from translate.translator import PRECISIONS, DecodeOptions, Translator, decode_workers


def run(translator: Translator, sources, options: DecodeOptions) -> tuple[list[str], float, int]:
    """Translates in batches of ``options.batch_sentences`` sentences taken in length order (as
    toolkits do)."""
    start = time.perf_counter()
    out = translator.translate(sources, options)
    if translator.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return [t[0].text for t in out], seconds, sum(len(t[0].tokens) + 1 for t in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/default")
    parser.add_argument("--test", default=str(BUNDLED_DATA / "test.tsv"))
    parser.add_argument("--limit", type=int, default=0, help="only the first N test sentences")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--beams", default="1,5")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="a bf16 or int8 copy on CPU, as `translate decode --bf16 / --int8`")
    parser.add_argument("--inter-threads", type=int, default=0,
                        help="batches decoded at once, as `translate decode --inter-threads` (0: its default)")
    parser.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    args = parser.parse_args()
    configure_process()  # as the command line does

    translator = Translator.load(args.checkpoint, precision=args.precision)  # as `translate decode` loads
    config, param = translator.config, next(translator.model.parameters())
    test = read_parallel(args.test, config.data.src_lang, config.data.tgt_lang, "test")
    sources, refs = test.src, test.tgt
    if args.limit:
        sources, refs = sources[: args.limit], refs[: args.limit]
    workers = decode_workers(param.device, args.inter_threads, len(sources))
    print(f"{len(sources)} sentences from {args.test}; device {param.device}, {param.dtype}, "
          f"{torch.get_num_threads()} threads, {workers.count} batch(es) at once"
          f"{' (processes)' if workers.processes else ''}")
    print(f"{'search':<8} {'batch':>5} {'sent/s':>9} {'tok/s':>9} {'BLEU':>6} {'peak RSS':>10}")
    rows = []
    for beam in (int(b) for b in args.beams.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            options = DecodeOptions(beam=beam, batch_sentences=batch, inter_threads=args.inter_threads)
            hyps, seconds, tokens = run(translator, sources, options)
            bleu = score(hyps, refs)["bleu"]
            name = "greedy" if beam == 1 else f"beam {beam}"
            print(f"{name:<8} {batch:>5} {len(sources) / seconds:>9.1f} {tokens / seconds:>9.0f} {bleu:>6.2f} "
                  f"{peak_rss_mb():>7.0f} MB", flush=True)
            rows.append({"beam": beam, "batch": batch, "sent_per_s": round(len(sources) / seconds, 1),
                         "tok_per_s": round(tokens / seconds), "bleu": bleu, "peak_rss_mb": round(peak_rss_mb())})
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({
            "checkpoint": args.checkpoint, "test": args.test, "sentences": len(sources), "precision": args.precision,
            "threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
