"""Which precision CPU decoding should use by default: every precision (fp32, bf16, int8) decodes
the bundled test split and ``../shared/data/bible-es-en.dev`` (domain shift; evaluation only),
greedy and beam 5, as ``translate eval`` does (its batch size and threads), timed. Prints
sentences/s, BLEU and chrF and their difference from fp32, and names the fastest precision whose
BLEU stays within --tolerance of fp32 on both sets at the beam every command decodes with by
default (the rule of ``translator.CPU_PRECISION``; the other searches are shown beside it), then
writes JSON. Given several checkpoints (runs of one configuration with different seeds), the rule
reads the mean difference over them: on the Bible verses, at about 3.5 BLEU, one checkpoint's
tenth of a point is a sentence or two.

    python bench/decode_precision.py checkpoints/default --json bench/results/decode_precision.json

The machine must be otherwise idle: the speeds are wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, evaluation_sets

from translate.evaluate import score
from translate.runtime import configure_process
from translate.translator import PRECISIONS, DecodeOptions, Translator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", default=["checkpoints/default"])
    # fp32 first, the yardstick; not auto, which is one of the others (the one this chooses)
    parser.add_argument("--precisions", default=",".join(p for p in PRECISIONS if p != "auto"))
    parser.add_argument("--beams", default="1,5")
    parser.add_argument("--tolerance", type=float, default=0.1, help="BLEU a precision may lose against fp32")
    parser.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    args = parser.parse_args()
    configure_process()  # as the command line does

    sets = evaluation_sets()
    beams = [int(b) for b in args.beams.split(",")]
    precisions = args.precisions.split(",")
    print(f"{', '.join(args.checkpoints)}; {cpu_model()}, {torch.get_num_threads()} threads")
    print(f"{'precision':<9} {'set':<6} {'search':<7} {'sent/s':>8} {'BLEU':>6} {'chrF':>6} {'ΔBLEU':>6} {'speed':>6}")
    rows, fp32 = [], {}
    for checkpoint, precision in ((c, p) for c in args.checkpoints for p in precisions):
        translator = Translator.load(checkpoint, precision=precision)  # as `translate eval` loads
        if len(args.checkpoints) > 1 and precision == precisions[0]:
            print(checkpoint)
        for name, (sources, references) in sets.items():
            for beam in beams:
                start = time.perf_counter()
                hypotheses = [nbest[0].text for nbest in translator.translate(sources, DecodeOptions(beam=beam))]
                seconds = time.perf_counter() - start
                figures = score(hypotheses, references)
                row = {"checkpoint": checkpoint, "precision": precision, "set": name, "beam": beam,
                       "sent_per_s": len(sources) / seconds, "bleu": figures["bleu"], "chrf": figures["chrf"]}
                key = (checkpoint, name, beam)
                base = fp32.setdefault(key, row) if precision == "fp32" else fp32.get(key)
                row["delta_bleu"] = row["bleu"] - base["bleu"] if base else None
                row["speedup"] = row["sent_per_s"] / base["sent_per_s"] if base else None
                rows.append(row)
                search = "greedy" if beam == 1 else f"beam {beam}"
                delta = f"{row['delta_bleu']:+6.2f}" if base else f"{'–':>6}"
                speed = f"{row['speedup']:5.2f}×" if base else f"{'–':>6}"
                print(f"{precision:<9} {name:<6} {search:<7} {row['sent_per_s']:>8.1f} {row['bleu']:>6.2f} "
                      f"{row['chrf']:>6.2f} {delta} {speed}", flush=True)

    default_beam = DecodeOptions().beam

    def mean_delta(precision: str, name: str, beam: int) -> float | None:
        mine = [r["delta_bleu"] for r in rows if (r["precision"], r["set"], r["beam"]) == (precision, name, beam)]
        return None if not mine or None in mine else sum(mine) / len(mine)

    def keeps_quality(precision: str) -> bool:
        deltas = [mean_delta(precision, name, default_beam) for name in sets]
        return all(d is not None and d >= -args.tolerance for d in deltas)

    def speed(precision: str) -> float:  # mean speed-up over sets and searches
        mine = [r["speedup"] for r in rows if r["precision"] == precision and r["speedup"] is not None]
        return sum(mine) / len(mine) if mine else 0.0

    eligible = [p for p in precisions if p == "fp32" or keeps_quality(p)]
    choice = max(eligible, key=lambda p: 1.0 if p == "fp32" else speed(p)) if fp32 else None  # fp32 is the yardstick
    for precision in precisions[1:] if len(args.checkpoints) > 1 else []:
        print(f"mean ΔBLEU of {precision} over the checkpoints: " + ", ".join(
            f"{name} {'greedy' if beam == 1 else f'beam {beam}'} {mean_delta(precision, name, beam):+.2f}"
            for name in sets for beam in beams if mean_delta(precision, name, beam) is not None))
    print(f"\nfastest within {args.tolerance} BLEU of fp32 on both sets at the default beam ({default_beam}): {choice}")
    for name, beam in ((name, beam) for name in sets for beam in beams if beam != default_beam):
        if choice and mean_delta(choice, name, beam) is not None:
            print(f"  (with beam {beam} on {name}: {mean_delta(choice, name, beam):+.2f} BLEU against fp32)")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({
            "checkpoints": args.checkpoints, "machine": cpu_model(),
            "threads": torch.get_num_threads(), "tolerance": args.tolerance, "default_beam": default_beam,
            "choice": choice, "rows": rows},
            indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
