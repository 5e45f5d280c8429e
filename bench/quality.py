"""Translation quality of model variants over seeds: in domain (the bundled test split) and under
domain shift (the Bible verses of ../shared/data, evaluation only).

Each variant is a set of ``--set`` overrides. For every variant and seed, the script trains with
``translate train`` (the default 25-minute budget unless ``--minutes``) into OUT/<variant>-s<seed>,
unless that run has finished already, then decodes its best checkpoint on both sets, beam 5 and
greedy. It prints one row per run and the mean per variant, and writes everything as JSON.

Besides BLEU, chrF and TER it reports two signs of the failure that exposure bias causes, on
the greedy outputs: the length ratio (output words over reference words) and the share of outputs
that repeat a word 4-gram (a decoder caught in a loop), next to that share in the references.

    python bench/quality.py --variant luong= --variant bahdanau=model.decoder=bahdanau \\
        --seeds 1234,2 --json bench/results/decoders.json

The machine must be otherwise idle: the budget is wall time, so a busy machine trains fewer steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

from translate.corpus import read_lines, read_parallel
from translate.evaluate import evaluate
from translate.runtime import configure_process
from translate.translator import DecodeOptions, Translator

ROOT = Path(__file__).resolve().parents[1]
BIBLE = ROOT.parent / "shared" / "data" / "bible-es-en.dev"


def repeats_a_4gram(text: str) -> bool:
    words = text.split()
    return any(n > 1 for n in Counter(zip(words, words[1:], words[2:], words[3:])).values())


def loop_share(texts: list[str]) -> float:
    return round(100 * sum(map(repeats_a_4gram, texts)) / max(1, len(texts)), 2)


def length_ratio(hypotheses: list[str], references: list[str]) -> float:
    return round(sum(len(h.split()) for h in hypotheses) / max(1, sum(len(r.split()) for r in references)), 3)


def train(run_dir: Path, seed: int, overrides: list[str], minutes: float | None) -> None:
    command = ["translate", "train", "--run-dir", str(run_dir), "--set", f"train.seed={seed}"]
    for item in overrides:
        command += ["--set", item]
    if minutes is not None:
        command += ["--max-minutes", str(minutes)]
    print("$", " ".join(command), flush=True)
    log = run_dir.parent / f"{run_dir.name}.train.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        sys.exit(f"training failed (exit {code}); see {log}")
    (run_dir / "quality-done").write_text(" ".join(command) + "\n", encoding="utf-8")


def scores(run_dir: Path, sets: dict[str, tuple[list[str], list[str]]]) -> dict:
    """Decodes both sets with the run's best checkpoint (cached in the run directory)."""
    cache = run_dir / "quality.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    translator = Translator.load(run_dir / "best.pt")
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    result = {"steps": max(entry["step"] for entry in logged), "best_dev_bleu": translator.progress.get("best_bleu")}
    for name, (sources, references) in sets.items():
        for beam in (5, 1):
            figures, hypotheses = evaluate(translator, sources, references, DecodeOptions(beam=beam))
            figures.pop("signature")
            if beam == 1:
                figures["length_ratio"] = length_ratio(hypotheses, references)
                figures["loops"] = loop_share(hypotheses)
            result[f"{name}_b{beam}"] = figures
    cache.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


COLUMNS = [("test BLEU b5", "test_b5", "bleu"), ("test BLEU g", "test_b1", "bleu"),
           ("Bible BLEU b5", "bible_b5", "bleu"), ("Bible BLEU g", "bible_b1", "bleu"),
           ("Bible chrF b5", "bible_b5", "chrf"), ("Bible TER b5", "bible_b5", "ter"),
           ("Bible len g", "bible_b1", "length_ratio"), ("Bible loops % g", "bible_b1", "loops")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=KEY=VALUE,KEY=VALUE",
                        help="a variant: its name, '=', and its --set overrides separated by commas (none: NAME=)")
    parser.add_argument("--seeds", default="1234,2", help="comma-separated training seeds")
    parser.add_argument("--minutes", type=float, help="training budget (default: the config's, 25)")
    parser.add_argument("--out", default="checkpoints/quality", help="where the runs go")
    parser.add_argument("--json", dest="json_path", help="also write every figure to this JSON file")
    parser.add_argument("--eval-only", action="store_true", help="score the runs that exist; train none")
    args = parser.parse_args()
    configure_process()

    variants = {}
    for spec in args.variant:
        name, _, sets = spec.partition("=")
        variants[name] = [item for item in sets.split(",") if item]
    seeds = [int(s) for s in args.seeds.split(",")]
    test = read_parallel(str(ROOT / "translate" / "bundled" / "test.tsv"), "spa", "eng", "test")
    sets = {"test": (test.src, test.tgt),
            "bible": (read_lines(f"{BIBLE}.es"), read_lines(f"{BIBLE}.en"))}
    print(f"reference loops %: test {loop_share(test.tgt)}, Bible {loop_share(sets['bible'][1])}")

    rows = []
    for name, overrides in variants.items():
        for seed in seeds:
            run_dir = Path(args.out) / f"{name}-s{seed}"
            if not (run_dir / "quality-done").is_file():
                if args.eval_only:
                    continue
                train(run_dir, seed, overrides, args.minutes)
            rows.append({"variant": name, "seed": seed, "overrides": overrides, **scores(run_dir, sets)})
            print(json.dumps(rows[-1]), flush=True)

    header = ["variant", "seed", "steps", "dev BLEU"] + [c[0] for c in COLUMNS]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    means = {}
    for name in variants:
        runs = [r for r in rows if r["variant"] == name]
        for r in runs:
            cells = [name, r["seed"], r["steps"], r["best_dev_bleu"]] + [r[k][m] for _, k, m in COLUMNS]
            print("| " + " | ".join(str(c) for c in cells) + " |")
        if runs:
            means[name] = {label: round(statistics.mean(r[k][m] for r in runs), 2) for label, k, m in COLUMNS}
            means[name]["test+Bible BLEU b5"] = round(statistics.mean(
                (r["test_b5"]["bleu"] + r["bible_b5"]["bleu"]) / 2 for r in runs), 2)
    print("\nmeans over seeds:")
    for name, figures in means.items():
        print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({"runs": rows, "means": means}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
