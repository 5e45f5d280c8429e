"""Whether decoding shortlists (``translate/shortlist.py``) keep BLEU, and what they save: each
checkpoint decodes the bundled test split and ``../shared/data/bible-es-en.dev`` (domain shift;
evaluation only) greedy and with beam 5, in its default precision and threads (as ``translate
eval``), over the whole vocabulary (--shortlist 0) and over shortlists of K translations a source
piece. Prints sentences/s, BLEU, chrF, the mean shortlist size and the differences from the
whole vocabulary, then the mean difference over the checkpoints, and writes JSON.

A checkpoint written before lexicons were saved gets one fitted on its run's training data, as
``translate train`` fits it.

    python bench/shortlist.py checkpoints/default --json bench/results/shortlist.json

The machine must be otherwise idle: the speeds are wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, evaluation_sets

from translate.build import fit_lexicon
from translate.data import collate
from translate.encoded import Encoded
from translate.evaluate import score
from translate.runtime import configure_process
from translate.translator import DecodeOptions, Translator, decode_batches


def mean_shortlist(translator: Translator, sources: list[str], options: DecodeOptions) -> float:
    """The mean size of the shortlists of the sentences ``translator`` decodes ``sources`` as."""
    encoded = Encoded(translator.tokenizer.encode_src(sources))
    sizes = []
    for indices in decode_batches(encoded, options):
        batch = collate(encoded, None, indices, max_src_len=options.max_src_len)
        shortlist = translator.lexicon.shortlist(batch.src, options.shortlist, options.shortlist_frequent)
        sizes += shortlist.allowed.sum(1).tolist()
    return float(np.mean(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", default=["checkpoints/default"])
    parser.add_argument("--shortlists", default="0,10,20,50", help="K values; 0 (the yardstick) first")
    parser.add_argument("--beams", default="1,5")
    parser.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    args = parser.parse_args()
    configure_process()  # as the command line does

    sets = evaluation_sets()
    beams = [int(b) for b in args.beams.split(",")]
    shortlists = [int(k) for k in args.shortlists.split(",")]
    print(f"{', '.join(args.checkpoints)}; {cpu_model()}, {torch.get_num_threads()} threads")
    rows = []
    for checkpoint in args.checkpoints:
        translator = Translator.load(checkpoint)  # as `translate eval` loads
        fitted = None
        if translator.lexicon is None:
            started = time.perf_counter()
            translator.lexicon = fit_lexicon(translator.config, translator.tokenizer)
            fitted = round(time.perf_counter() - started, 1)
        print(f"{checkpoint} ({translator.precision}{f'; lexicon fitted in {fitted} s' if fitted else ''})")
        print(f"{'set':<6} {'search':<7} {'K':>3} {'words':>6} {'sent/s':>8} {'BLEU':>6} {'chrF':>6} {'ΔBLEU':>6} "
              f"{'ΔchrF':>6} {'speed':>6}")
        for name, (sources, references) in sets.items():
            for beam in beams:
                base = None
                for k in shortlists:
                    options = DecodeOptions(beam=beam, shortlist=k)
                    start = time.perf_counter()
                    hypotheses = [nbest[0].text for nbest in translator.translate(sources, options)]
                    seconds = time.perf_counter() - start
                    figures = score(hypotheses, references)
                    row = {"checkpoint": checkpoint, "precision": translator.precision, "set": name, "beam": beam,
                           "shortlist": k, "lexicon_fitted_s": fitted, "sent_per_s": len(sources) / seconds,
                           "bleu": figures["bleu"], "chrf": figures["chrf"],
                           "mean_shortlist": mean_shortlist(translator, sources, options) if k else None}
                    base = base or row
                    row["delta_bleu"], row["delta_chrf"] = row["bleu"] - base["bleu"], row["chrf"] - base["chrf"]
                    row["speedup"] = row["sent_per_s"] / base["sent_per_s"]
                    rows.append(row)
                    words = f"{row['mean_shortlist']:>6.0f}" if k else f"{'all':>6}"
                    print(f"{name:<6} {'greedy' if beam == 1 else f'beam {beam}':<7} {k:>3} {words} "
                          f"{row['sent_per_s']:>8.1f} {row['bleu']:>6.2f} {row['chrf']:>6.2f} "
                          f"{row['delta_bleu']:+6.2f} {row['delta_chrf']:+6.2f} {row['speedup']:5.2f}×", flush=True)

    summary = []
    print(f"\nmean over {len(args.checkpoints)} checkpoint(s)")
    print(f"{'set':<6} {'search':<7} {'K':>3} {'ΔBLEU':>6} {'ΔchrF':>6} {'speed':>6}")
    for name in sets:
        for beam in beams:
            for k in shortlists[1:]:
                chosen = [r for r in rows if (r["set"], r["beam"], r["shortlist"]) == (name, beam, k)]
                mean = {key: sum(r[key] for r in chosen) / len(chosen)
                        for key in ("delta_bleu", "delta_chrf", "speedup")}
                summary.append({"set": name, "beam": beam, "shortlist": k, **mean})
                print(f"{name:<6} {'greedy' if beam == 1 else f'beam {beam}':<7} {k:>3} {mean['delta_bleu']:+6.2f} "
                      f"{mean['delta_chrf']:+6.2f} {mean['speedup']:5.2f}×")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"machine": cpu_model(), "threads": torch.get_num_threads(),
                                                    "rows": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
