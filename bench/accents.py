"""What spelling carried words in the target's letters (``DecodeOptions.fold_accents``) changes in
the outputs that ``bench/domain.py`` stored for its zero-shot rows (decoded before the option
existed): each set's lines changed and BLEU / chrF before and after, per base model. The outputs
are taken as they are; only the spelling step runs, with the letters of the bundled English
targets (a-z: no accented letter reaches ``names.LETTER_SHARE`` of them).

    python bench/accents.py --json bench/results/accents.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import sacrebleu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import casual, evaluation_sets, long_fifth

from translate.names import TargetLetters

# the zero-shot rows of the four base models of 2026-12-03 (2-core Xeon), decoded before the option existed
RESULTS = Path(__file__).resolve().parent / "results" / "domain-zero-shot-xeon"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="bench/domain.py's result files")
    parser.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    args = parser.parse_args()
    english = TargetLetters("abcdefghijklmnopqrstuvwxyz")
    sets = evaluation_sets()
    test_src, test_ref = sets["test"]
    long = long_fifth(test_src)
    inputs = {"test": sets["test"], "casual": ([casual(s) for s in test_src], test_ref),
              "long": ([test_src[i] for i in long], [test_ref[i] for i in long]), "bible": sets["bible"]}
    figures = {}
    for path in sorted(args.results.glob("zero-shot-s*.json.gz")):
        run = json.loads(gzip.open(path).read())
        rows = {}
        for name, (sources, references) in inputs.items():
            outputs = run["scores"][name]["outputs"]
            spelled = [english.spell(output, source) for output, source in zip(outputs, sources)]
            rows[name] = {"changed": sum(a != b for a, b in zip(outputs, spelled)),
                          "bleu": [round(sacrebleu.corpus_bleu(o, [references]).score, 2) for o in (outputs, spelled)],
                          "chrf": [round(sacrebleu.corpus_chrf(o, [references]).score, 2) for o in (outputs, spelled)]}
            (b0, b1), (c0, c1) = rows[name]["bleu"], rows[name]["chrf"]
            print(f"{path.name[:-8]:14} {name:7} {rows[name]['changed']:4} lines changed  "
                  f"BLEU {b0:6.2f} -> {b1:6.2f}  chrF {c0:6.2f} -> {c1:6.2f}")
        figures[path.name[:-8]] = rows
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
