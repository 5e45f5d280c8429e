"""What decides BLEU at a fixed wall-clock budget on this machine: a documented, repeatable search.

Each candidate changes the default configuration in one respect (``CANDIDATES``; ``--candidate``
adds others). Every candidate trains with ``translate train`` at the budget into
OUT/<stage>/<name>-s<seed> (runs that finished before are kept, so the search resumes), with
the last validations' weights kept for averaging. Candidates are chosen on the dev set, never
on the test set:

- dev BLEU, beam 5, of the run's best checkpoint;
- of the average of its last K validations' weights (``translate average``), K in ``--average``;
- and, for the best of those, of beam search with each length penalty in ``--alphas``.

The bundled test split's BLEU (beam 5, default length penalty) is reported beside it, for
docs/benchmarks.md, and so are BLEU and chrF on ``../shared/data/bible-es-en.dev`` (greedy and beam 5), the
domain-shift set a new default must not get worse on (evaluation only: it chooses nothing).
Screen at 10 minutes with one seed, then confirm the best few at the full budget:

    python bench/tune.py --stage screen2 --minutes 10 --seeds 1234
    python bench/tune.py --stage confirm2 --seeds 1234,2 --only dropout-0.2

It prints a table (mean over seeds) and writes JSON. A kept run whose settings are no longer its
candidate's (after the defaults changed) is refused: start another stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BIBLE
from exposure_bias import steps_trained, train  # one way to train a configuration

from translate.checkpoint import average_checkpoints, save_checkpoint, step_checkpoints
from translate.config import load_config, parse_overrides
from translate.corpus import read_lines, read_parallel
from translate.evaluate import evaluate
from translate.runtime import configure_process
from translate.translator import DecodeOptions, Translator

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "translate" / "bundled"

CANDIDATES = [  # one change from the defaults each; "default" is the reference
    "default=",
    # the defaults before the search of 2026-11-30, which screened the others against them
    "earlier-default=model.hidden_dim=512,model.dropout=0.2,train.lr=0.002,model.init_uniform=0",
    "hidden-256=model.hidden_dim=256",
    "hidden-512=model.hidden_dim=512",
    "embed-384=model.embed_dim=384",
    "layers-2=model.layers=2",
    "vocab-4k=tokenizer.vocab_size=4000",
    "vocab-16k=tokenizer.vocab_size=16000",
    "bpe=tokenizer.type=bpe",
    "batch-1000=train.batch_tokens=1000",
    "batch-2500=train.batch_tokens=2500",
    "lr-2e-3=train.lr=0.002",
    "lr-4e-3=train.lr=0.004",
    "warmup-decay=train.lr_schedule=warmup-decay",
    "dropout-0.1=model.dropout=0.1",
    "dropout-0.2=model.dropout=0.2",
    "smoothing-0=train.label_smoothing=0.0",
    "smoothing-0.2=train.label_smoothing=0.2",
    "bahdanau-decoder=model.decoder=bahdanau",
    "gru=model.cell=gru",
    "pytorch-init=model.init_uniform=0",
]


def dev_bleu(translator: Translator, dev, beam: int = 5, alpha: float = 1.0) -> float:
    scores, _ = evaluate(translator, dev.src, dev.tgt, DecodeOptions(beam=beam, alpha=alpha))
    return scores["bleu"]


def bible_scores(translator: Translator) -> dict[str, float]:
    """BLEU and chrF on the Bible verses, greedy and beam 5, as ``translate eval`` decodes."""
    sources, references = read_lines(f"{BIBLE}.es"), read_lines(f"{BIBLE}.en")
    found = {}
    for beam in (1, 5):
        scores, _ = evaluate(translator, sources, references, DecodeOptions(beam=beam))
        found.update({f"bleu_b{beam}": scores["bleu"], f"chrf_b{beam}": scores["chrf"]})
    return found


def chosen_path(run_dir: Path, chosen: str) -> Path:
    return run_dir / ("best.pt" if chosen == "best" else f"averaged-{chosen.removeprefix('average-')}.pt")


# settings that change how long or where a run trains or what it keeps, not the model it makes
_RUNTIME = {"train.keep_checkpoints", "train.tensorboard", "train.device", "train.threads",
            "train.dist_timeout_minutes"}


def differs(run_dir: Path, overrides: list[str], seed: int, minutes: float | None) -> list[str]:
    """The settings of a finished run that are not what the candidate asks for now (say, after
    the defaults changed), so that a resumed search never scores a run under another name."""
    asked = {**parse_overrides(overrides), "train.seed": seed}
    if minutes is not None:
        asked["train.max_minutes"] = minutes
    wanted, ran = load_config(overrides=asked).to_dict(), load_config(run_dir / "config.yaml").to_dict()
    return [f"{section}.{key}: ran {ran[section][key]!r}, asked {value!r}"
            for section in ("tokenizer", "model", "train") for key, value in wanted[section].items()
            if f"{section}.{key}" not in _RUNTIME and ran[section][key] != value]


def score_run(run_dir: Path, dev, test, averages: list[int], alphas: list[float]) -> dict:
    """Dev BLEU of the best checkpoint and of averaged weights, the length penalties on the
    better of them, and the test and Bible scores of the checkpoint dev chose (cached in the run
    directory; a cache from before the Bible was scored gains it)."""
    cache = run_dir / "tune.json"
    cached = cache.is_file()
    result = (json.loads(cache.read_text(encoding="utf-8")) if cached
              else dev_choice(run_dir, dev, test, averages, alphas))
    if "bible" not in result and Path(f"{BIBLE}.es").is_file():
        result["bible"] = bible_scores(Translator.load(chosen_path(run_dir, result["chosen"])))
    elif cached:
        return result
    cache.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def dev_choice(run_dir: Path, dev, test, averages: list[int], alphas: list[float]) -> dict:
    candidates = {"best": chosen_path(run_dir, "best")}
    kept = step_checkpoints(run_dir)
    for k in averages:
        if len(kept) >= k:
            path = chosen_path(run_dir, f"average-{k}")
            if not path.is_file():
                save_checkpoint(path, average_checkpoints(kept[-k:]))
            candidates[f"average-{k}"] = path
    dev_scores = {name: dev_bleu(Translator.load(path), dev) for name, path in candidates.items()}
    chosen = max(dev_scores, key=dev_scores.get)
    translator = Translator.load(candidates[chosen])
    alpha_scores = {alpha: dev_bleu(translator, dev, alpha=alpha) for alpha in alphas}
    alpha = max(alpha_scores, key=alpha_scores.get)
    return {"steps": steps_trained(run_dir), "dev_bleu_b5": dev_scores, "chosen": chosen,
            "dev_bleu_by_alpha": {str(a): s for a, s in alpha_scores.items()}, "alpha": alpha,
            "test_bleu_b5": evaluate(translator, test.src, test.tgt, DecodeOptions(beam=5))[0]["bleu"],
            "test_bleu_b5_alpha": evaluate(translator, test.src, test.tgt,
                                           DecodeOptions(beam=5, alpha=alpha))[0]["bleu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="screen", help="a name for this round (its runs go in OUT/STAGE)")
    parser.add_argument("--minutes", type=float, help="training budget (default: the config's, 25)")
    parser.add_argument("--seeds", default="1234")
    parser.add_argument("--only", help="comma-separated candidate names to run (default: all)")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help="one more candidate")
    parser.add_argument("--average", default="3,5", help="K values of last-K checkpoint averaging to try")
    parser.add_argument("--alphas", default="0.6,0.8,1.0,1.2", help="length penalties to try")
    parser.add_argument("--out", default="checkpoints/tune")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    configure_process()

    candidates = {}
    for spec in CANDIDATES + args.candidate:
        name, _, sets = spec.partition("=")
        candidates[name] = [item for item in sets.split(",") if item]
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(candidates))
        if unknown:
            sys.exit(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(candidates)}")
        candidates = {name: candidates[name] for name in wanted}
    averages = [int(k) for k in args.average.split(",") if k]
    keep = max(averages, default=0)
    dev = read_parallel(str(BUNDLED / "dev.tsv"), "spa", "eng", "dev")
    test = read_parallel(str(BUNDLED / "test.tsv"), "spa", "eng", "test")

    rows = []
    for name, overrides in candidates.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            run_dir = Path(args.out) / args.stage / f"{name}-s{seed}"
            if not (run_dir / "quality-done").is_file():
                train(run_dir, seed, [*overrides, f"train.keep_checkpoints={keep}"], args.minutes)
            elif stale := differs(run_dir, overrides, seed, args.minutes):
                sys.exit(f"{run_dir} trained another configuration than {name} asks for now "
                         f"({'; '.join(stale)}); move it away, or use another --stage")
            rows.append({"candidate": name, "seed": seed, "overrides": overrides,
                         **score_run(run_dir, dev, test, averages, [float(a) for a in args.alphas.split(",")])})
            print(json.dumps(rows[-1]), flush=True)

    if args.json_path and Path(args.json_path).is_file():  # runs this call did not score stay in the file
        done = {(r["candidate"], r["seed"]) for r in rows}
        earlier = json.loads(Path(args.json_path).read_text(encoding="utf-8"))["runs"]
        rows = [r for r in earlier if (r["candidate"], r["seed"]) not in done] + rows

    summary = []
    for name in dict.fromkeys(r["candidate"] for r in rows):
        mine = [r for r in rows if r["candidate"] == name]
        best_dev = [max(r["dev_bleu_b5"].values()) for r in mine]
        tuned_dev = [max(r["dev_bleu_by_alpha"].values()) for r in mine]
        bible = [r["bible"] for r in mine if "bible" in r]
        summary.append({"candidate": name, "seeds": len(mine), "steps": statistics.mean(r["steps"] for r in mine),
                        "dev_b5": statistics.mean(r["dev_bleu_b5"]["best"] for r in mine),
                        "dev_b5_best_average": statistics.mean(best_dev), "dev_b5_tuned": statistics.mean(tuned_dev),
                        "test_b5": statistics.mean(r["test_bleu_b5"] for r in mine),
                        "bible": {key: statistics.mean(b[key] for b in bible) for key in bible[0]} if bible else None,
                        "chosen": [r["chosen"] for r in mine], "alpha": [r["alpha"] for r in mine]})
    summary.sort(key=lambda row: -row["dev_b5_tuned"])
    print("\n| candidate | seeds | steps | dev b5 (best.pt) | dev b5 (+ averaging) | dev b5 (+ alpha) | test b5 | "
          "Bible BLEU greedy / b5 | Bible chrF greedy | chosen | alpha |\n" + "|---" * 11 + "|")
    for row in summary:
        bible = row["bible"]
        shift = f"{bible['bleu_b1']:.2f} / {bible['bleu_b5']:.2f} | {bible['chrf_b1']:.2f}" if bible else "- | -"
        print(f"| {row['candidate']} | {row['seeds']} | {row['steps']:,.0f} | {row['dev_b5']:.2f} | "
              f"{row['dev_b5_best_average']:.2f} | {row['dev_b5_tuned']:.2f} | {row['test_b5']:.2f} | "
              f"{shift} | {', '.join(row['chosen'])} | {', '.join(map(str, row['alpha']))} |")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({"runs": rows, "summary": summary}, indent=1) + "\n",
                                        encoding="utf-8")


if __name__ == "__main__":
    main()
