"""How well the calibrated confidence (``translate/confidence.py``) is calibrated: a checkpoint
decodes the bundled dev split (as ``translate decode`` decodes by default), a calibrator is fitted
there on each subset of the features (``FEATURES``), and each is measured on the bundled test split
and ``../shared/data/bible-es-en.dev`` (domain shift; evaluation only): expected calibration error
(10 bins) against sentence chrF >= the threshold, the Brier score, the share acceptable and the
mean confidence, and what --min-confidence 0.5 flags (the share flagged; the share acceptable
among the kept and among the flagged). Prints a table and writes JSON.

    python bench/confidence.py /work/domain/base-s1/best.pt --json bench/results/confidence.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evaluation_sets

from translate.confidence import FEATURES, THRESHOLD, dev_features, expected_calibration_error, fit
from translate.config import BUNDLED_DATA
from translate.corpus import read_parallel
from translate.translator import DecodeOptions, Translator


def measure(calibrator, values, chrf, threshold: float) -> dict:
    """ECE, Brier score, the share acceptable and the mean confidence; the reliability of each of
    the 10 bins (sentences, mean confidence, share acceptable); and for --min-confidence 0.5 and
    0.8 the share flagged and the share acceptable among the kept and the flagged."""
    p = np.array([calibrator.probability(v) for v in values])
    y = np.array([c >= threshold for c in chrf], dtype=np.float64)
    which = np.minimum((p * 10).astype(int), 9)
    bins = [[int((which == b).sum()), round(float(p[which == b].mean()), 3), round(float(y[which == b].mean()), 3)]
            for b in range(10) if (which == b).any()]
    flags = {}
    for cut in (0.5, 0.8):
        low = p < cut
        flags[str(cut)] = {"flagged": round(float(low.mean()), 4),
                           "kept_acceptable": round(float(y[~low].mean()), 4) if (~low).any() else None,
                           "flagged_acceptable": round(float(y[low].mean()), 4) if low.any() else None}
    return {"ece": round(expected_calibration_error(p, y), 4), "brier": round(float(((p - y) ** 2).mean()), 4),
            "acceptable": round(float(y.mean()), 4), "mean_confidence": round(float(p.mean()), 4),
            "sentences": len(y), "bins": bins, "min_confidence": flags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    translator = Translator.load(args.checkpoint, DecodeOptions(inter_threads=1), precision="auto", device="cpu")
    dev = read_parallel(str(BUNDLED_DATA / "dev.tsv"), "spa", "eng", "dev")
    sets = {"dev": (dev.src, dev.tgt), **evaluation_sets()}
    decoded = {}
    for name, (sources, references) in sets.items():
        values, chrf, _ = dev_features(translator, sources, references)
        decoded[name] = (values, chrf)
        print(f"decoded {name}: {len(values)} sentences", file=sys.stderr)
    results = {}
    print(f"{'features':<22} {'set':<6} {'ECE':>6} {'Brier':>6} {'accept':>7} {'mean p':>7} {'<0.5':>8} "
          f"{'kept ok':>8} {'low ok':>8}")
    for names in [("logprob",), ("length_ratio",), FEATURES]:
        values, chrf = decoded["dev"]
        calibrator = fit(values, [c >= args.threshold for c in chrf], names, args.threshold)
        row = {"parameters": calibrator.state()}
        for name in ("dev", "test", "bible"):
            row[name] = measure(calibrator, *decoded[name], args.threshold)
            figures = row[name]
            half = figures["min_confidence"]["0.5"]
            print(f"{'+'.join(names):<22} {name:<6} {figures['ece']:>6.3f} {figures['brier']:>6.3f} "
                  f"{figures['acceptable']:>7.3f} {figures['mean_confidence']:>7.3f} {half['flagged']:>8.3f} "
                  f"{half['kept_acceptable'] or 0:>8.3f} {half['flagged_acceptable'] or 0:>8.3f}")
        results["+".join(names)] = row
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": args.checkpoint, "threshold": args.threshold,
                                         "precision": translator.precision, "calibrators": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
