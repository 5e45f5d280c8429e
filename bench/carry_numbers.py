"""Numbers carried from the source (``DecodeOptions.copy_numbers``): for each model, the held-out
Tatoeba sentences (bundled dev and test) with a number that their reference writes as the source
does, that number replaced in both by numbers of the forms people type (years, prices, decimals
with a point or a comma, times, phone numbers, large counts; seeded draws), decoded with and
without number stand-ins: the share of numbers that come through as written, and BLEU on those
lines. Then the whole bundled test both ways, which must not lose BLEU.

    python bench/carry_numbers.py CHECKPOINT [CHECKPOINT ...] --draws 4 --json bench/results/carry_numbers.json \\
        --doc docs/decoding.md
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

from sacrebleu.metrics import BLEU

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, report

from translate.config import BUNDLED_DATA
from translate.corpus import read_parallel
from translate.names import NUMBER
from translate.translator import Translator

# how people write numbers: a draw of each form
FORMS = {
    "count": lambda r: str(r.randint(101, 9999)),
    "year": lambda r: str(r.randint(1901, 2030)),
    "large": lambda r: str(r.randint(10_000, 9_999_999)),
    "decimal .": lambda r: f"{r.randint(1, 99)}.{r.randint(1, 99)}",
    "decimal ,": lambda r: f"{r.randint(1, 99)},{r.randint(1, 99):02d}",
    "time": lambda r: f"{r.randint(1, 12)}:{r.randint(0, 59):02d}",
    "phone": lambda r: f"{r.randint(200, 999)}-{r.randint(1000, 9999)}",
}


def alone(number: str) -> re.Pattern:
    """``number`` as a number of its own (not part of a longer one or of a word)."""
    return re.compile(rf"(?<![\w.,:/-]){re.escape(number)}(?![\w]|[.,:/-]\d)")


def as_written(number: str, text: str) -> re.Match | None:
    return alone(number).search(text)


def templates() -> list[tuple[str, str, str]]:
    """(source, reference, number) for each held-out pair whose reference writes a source number as it is."""
    found = []
    for split in ("dev", "test"):
        data = read_parallel(str(BUNDLED_DATA / f"{split}.tsv"), "spa", "eng", split)
        for source, reference in zip(data.src, data.tgt):
            for match in NUMBER.finditer(source):
                if as_written(match.group(), reference):
                    found.append((source, reference, match.group()))
                    break
    return found


def variants(draws: int) -> list[dict]:
    """Each template with its number replaced, in source and reference, by ``draws`` draws of each form."""
    rng, out = random.Random(1), []
    for source, reference, number in templates():
        for form, draw in FORMS.items():
            for _ in range(draws):
                new = draw(rng)
                out.append({"form": form, "number": new,
                            "source": source.replace(number, new, 1),
                            "reference": alone(number).sub(lambda _, n=new: n, reference, count=1)})
    return out


def score(translator: Translator, lines: list[dict], copy: bool) -> tuple[list[str], dict]:
    options = replace(translator.options, copy_numbers=copy)
    outputs = [n[0].text for n in translator.translate([line["source"] for line in lines], options)]
    kept = [bool(as_written(line["number"], out)) for line, out in zip(lines, outputs)]
    forms = {form: 100 * sum(k for k, line in zip(kept, lines) if line["form"] == form)
             / max(1, sum(line["form"] == form for line in lines)) for form in FORMS}
    return outputs, {"carried": 100 * sum(kept) / len(kept), "forms": forms,
                     "bleu": BLEU().corpus_score(outputs, [[line["reference"] for line in lines]]).score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--draws", type=int, default=4, help="numbers of each form per sentence")
    parser.add_argument("--json")
    parser.add_argument("--doc")
    args = parser.parse_args()

    lines = variants(args.draws)
    test = read_parallel(str(BUNDLED_DATA / "test.tsv"), "spa", "eng", "test")
    results = []
    for checkpoint in args.checkpoints:
        translator = Translator.load(checkpoint)
        row = {"checkpoint": checkpoint}
        for copy in (False, True):
            _, row[f"numbers copy={copy}"] = score(translator, lines, copy)
            options = replace(translator.options, copy_numbers=copy)
            outputs = [n[0].text for n in translator.translate(test.src, options)]
            row[f"test copy={copy}"] = {"bleu": BLEU().corpus_score(outputs, [test.tgt]).score, "outputs": outputs}
        row["test lines changed"] = sum(a != b for a, b in zip(row["test copy=False"].pop("outputs"),
                                                               row["test copy=True"].pop("outputs")))
        results.append(row)
        print(checkpoint, {k: v for k, v in row.items() if k != "checkpoint"}, flush=True)

    head = "| model | numbers kept %, without → with | BLEU on their lines | bundled test BLEU | " \
        "test lines changed | " + " | ".join(f"{form} kept %" for form in FORMS) + " |"
    table = [head, "|" + "---|" * (5 + len(FORMS))]
    for row in results:
        off, on = row["numbers copy=False"], row["numbers copy=True"]
        table.append(f"| {Path(row['checkpoint']).name} | {off['carried']:.1f} → {on['carried']:.1f} | "
                     f"{off['bleu']:.2f} → {on['bleu']:.2f} | {row['test copy=False']['bleu']:.2f} → "
                     f"{row['test copy=True']['bleu']:.2f} | {row['test lines changed']} | "
                     + " | ".join(f"{off['forms'][f]:.0f} → {on['forms'][f]:.0f}" for f in FORMS) + " |")
    text = "\n".join(table) + (f"\n\n{len(lines)} lines ({len(lines) // (len(FORMS) * args.draws)} held-out "
                               f"sentences × {len(FORMS)} forms × {args.draws} draws); default decoding otherwise "
                               f"(beam 5, int8, shortlist); {cpu_model()}. Made by `python bench/carry_numbers.py`.")
    report(text, {"lines": len(lines), "draws": args.draws, "machine": cpu_model(), "models": results},
           args.json, args.doc, "<!-- numbers-table:begin -->", "<!-- numbers-table:end -->")


if __name__ == "__main__":
    main()
