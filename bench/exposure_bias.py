r"""Where exposure bias bites: configurations trained over seeds at one wall-clock budget, scored
in domain, on long sentences and under domain shift, greedy and beam 5.

Each configuration is a name and ``translate train --set`` overrides. For every configuration and
seed the script trains with ``translate train`` into OUT/<name>-s<seed> (skipping runs that
finished before, so it resumes where it stopped), decodes the run's best checkpoint on

1. the bundled test split,
2. its longest fifth by source length (a subset of 1's outputs), and
3. ``../shared/data/bible-es-en.dev.{es,en}``: Bible verses, a domain the model never saw
   (evaluation only: nothing trains or tunes on it),

greedy and beam 5, keeps the outputs in the run directory, and prints one table: the mean and
standard deviation over seeds of BLEU and chrF, the share of degenerate outputs (a word or a
character repeated four or more times in a row, or more than twice the reference's words: what
hallucination looks like here) and the length ratio, then a paired bootstrap test (sacrebleu,
1,000 resamples) of each configuration against the first, on the outputs of the seeds both have, pooled.

    python bench/exposure_bias.py --seeds 1234,2,3                  # the default configurations
    python bench/exposure_bias.py --variant luong= --variant bahdanau=model.decoder=bahdanau
    python bench/exposure_bias.py --eval-only --json bench/results/exposure_bias.json --doc docs/benchmarks.md

A configuration is NAME=KEY=VALUE,KEY=VALUE (NAME= for the defaults). The machine must be
otherwise idle: the budget is wall time, so a busy machine trains fewer steps.

Fine-tuning mode (``--base CKPT``): scheduled teacher forcing where the literature finds its gains,
after teacher forcing has trained the model. From one converged checkpoint, every arm of
``FINETUNE_VARIANTS`` (continued teacher forcing first, the baseline; each scheduled-sampling
variant as a final phase over the whole fine-tuning run, ``train.tf_phase=1``; minimum risk
training, ``train.objective=mrt``) fine-tunes for the same budget (``--minutes`` of wall time, or
``--steps``) with ``translate train --init-from CKPT``, in two settings:

(a) ``tatoeba``: continuing on the bundled training data (its dev set picks best.pt), scored on
    the bundled test, its longest fifth and the Bible dev verses (evaluation only);
(b) ``bible``: fine-tuning on ``../shared/data/bible-es-en.train.tsv`` less 500 verses held out as
    the dev set (``domain.bible_split``), scored on the Bible dev verses (and the bundled test, for
    what is forgotten).

Each setting gets a table (means ± standard deviations over seeds, degenerate-output rates, the
base model's own row) and paired bootstrap tests against continued teacher forcing; setting (a)
is judged by the issue's goal (``GOAL``). Runs go to OUT/<setting>-<arm>-s<seed>, results to
RESULTS/<setting>-<arm>-s<seed>.json.gz (``bench/results/exposure-finetune``):

    python bench/exposure_bias.py --base checkpoints/default/best.pt --minutes 5 --seeds 1,2,3 \
        --set train.lr=0.0003 --set train.amp=bf16 --json bench/results/exposure_finetune.json \
        --doc docs/benchmarks.md

``--set`` applies to every arm (an arm's own settings win); ``--variant`` replaces the arms (with
``--steps``, an arm's own ``steps=N`` gives it the updates that take the baseline's wall clock),
``--settings tatoeba`` runs one setting. A second run of the command trains only what is missing
and makes the tables again. ``--limit N --steps 3`` with a tiny base is a smoke test.

Every finished run leaves its translations, steps and command in RESULTS/<name>-s<seed>.json.gz
(``bench/results/exposure`` by default, kept in git): the table is made again from those, and a
later session goes on with the runs that are missing, seed by seed (one seed of every
configuration before the next seed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, evaluation_sets, figures, long_fifth, report, write_between
from domain import bible_split

from translate.runtime import configure_process
from translate.translator import DecodeOptions, Translator

ROOT = Path(__file__).resolve().parents[1]
BEAMS = (1, 5)
# the decoding every run here is scored with, so that runs scored before and after a change of the
# defaults compare: the default (clauses) until split=phrases (2026-12-03), and sources as they are:
# restoring casual input came to modernise older spelling (2026-12-03), which changes Bible verses
SPLIT, RESTORE = "clauses", False
# a kept run without a "decoding" was decoded before restoring modernised anything: as DECODING does
DECODING = {"split": SPLIT, "restore_casual": RESTORE}

# Every configuration names its schedule, so that a name keeps what it was measured as when the
# defaults change. inverse-sigmoid was the default schedule up to this bench's decision.
_SCHEDULED = "train.teacher_forcing=inverse_sigmoid"
# The model every run here trained (the defaults until the tuning of 2026-11-30): new seeds train
# what the kept ones did, whatever the defaults are now. A configuration's own settings win.
MEASURED_MODEL = ["model.hidden_dim=512", "model.dropout=0.2", "train.lr=0.002"]
DEFAULT_VARIANTS = [  # teacher forcing first: the baseline of the paired tests
    "teacher-forcing=train.teacher_forcing=constant,train.tf_start=1.0",
    f"inverse-sigmoid={_SCHEDULED}",
    f"position={_SCHEDULED},train.tf_floor=0.5,train.tf_position=linear,train.tf_position_k=20",
    f"sample={_SCHEDULED},train.tf_feed=sample,train.tf_tau=0.5",
    f"confidence={_SCHEDULED},train.tf_select=confidence,train.tf_confidence=0.9,train.tf_noise=0.95",
    f"two-passes={_SCHEDULED},train.tf_passes=2",
    f"sentence-oracle={_SCHEDULED},train.tf_feed=sentence",
]

def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """NAME=KEY=VALUE,KEY=VALUE,... -> {NAME: ["KEY=VALUE", ...]}, in the order given."""
    variants = {}
    for spec in specs:
        name, _, sets = spec.partition("=")
        variants[name] = [item for item in sets.split(",") if item]
    return variants


def train(run_dir: Path, seed: int, overrides: list[str], minutes: float | None) -> None:
    command = ["translate", "train", "--run-dir", str(run_dir), "--set", f"train.seed={seed}"]
    for item in overrides:
        command += ["--set", item]
    if minutes is not None:
        command += ["--max-minutes", str(minutes)]
    print("$", " ".join(command), flush=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.train.log"
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        sys.exit(f"training failed (exit {code}); see {log}")
    (run_dir / "quality-done").write_text(" ".join(command) + "\n", encoding="utf-8")


def outputs(run_dir: Path, sets: dict[str, tuple[list[str], list[str]]]) -> dict[str, list[str]]:
    """The best checkpoint's translations of every set and beam, decoded once and kept in the run
    directory (``eval/<set>.b<beam>.txt``)."""
    found, translator = {}, None
    for name, (sources, _) in sets.items():
        for beam in BEAMS:
            path = run_dir / "eval" / f"{name}.b{beam}.txt"
            if not path.is_file():
                translator = translator or Translator.load(run_dir / "best.pt")
                options = DecodeOptions(beam=beam, split=SPLIT, restore_casual=RESTORE)
                lines = [nbest[0].text for nbest in translator.translate(sources, options)]
                path.parent.mkdir(exist_ok=True)
                path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            found[f"{name}.b{beam}"] = path.read_text(encoding="utf-8").split("\n")[:-1]
    return found


def decoded(kept: Path, run: dict) -> None:
    """Stops where a kept run was decoded otherwise than runs are now: its figures would not compare."""
    if run.get("decoding", DECODING) != DECODING:
        sys.exit(f"{kept} was decoded with {run['decoding']}, not {DECODING}; move it away and delete its run's "
                 "eval/ folder to decode it again")


def finished_run(results: Path, out: Path, name: str, seed: int, overrides: list[str],
                 sets: dict[str, tuple[list[str], list[str]]], args: argparse.Namespace) -> dict | None:
    """One configuration and seed: its kept results, or trained (unless --eval-only), decoded and
    kept. None when it has neither results nor a run and may not train."""
    kept = results / f"{name}-s{seed}.json.gz"
    if kept.is_file():
        with gzip.open(kept, "rt", encoding="utf-8") as source:
            run = json.load(source)
        if run["overrides"] != overrides:
            sys.exit(f"{kept} was made with {run['overrides']}, not {overrides}; move it away to run it again")
        decoded(kept, run)
        return run
    run_dir = out / f"{name}-s{seed}"
    if not (run_dir / "quality-done").is_file():
        if args.eval_only:
            return None
        train(run_dir, seed, [*MEASURED_MODEL, *overrides], args.minutes)
    run = {"variant": name, "seed": seed, "overrides": overrides, "steps": steps_trained(run_dir),
           "command": (run_dir / "quality-done").read_text(encoding="utf-8").strip(),
           "machine": f"{cpu_model()}, {os.cpu_count()} CPUs", "precision": training_precision(run_dir),
           "decoding": DECODING, "outputs": outputs(run_dir, sets)}
    results.mkdir(parents=True, exist_ok=True)
    partial = kept.with_name(kept.name + ".part")
    with gzip.open(partial, "wt", encoding="utf-8") as sink:
        json.dump(run, sink)
    partial.replace(kept)
    return run


def training_precision(run_dir: Path) -> str:
    """What the run trained in, from its log's start line ("device cpu with bfloat16; ...")."""
    found = re.search(r"; device \S+?( with (\w+))?; ", (run_dir / "train.log").read_text(encoding="utf-8"))
    return "unknown" if found is None else found.group(2) or "float32"


def steps_trained(run_dir: Path) -> int:
    logged = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
    return max(entry["step"] for entry in logged)


def trained_on(summary: dict) -> list[str]:
    """Every "machine, precision" the summarised runs trained on."""
    return sorted({t for row in summary.values() for t in row["trained"]})


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", metavar="NAME=KEY=VALUE,...",
                        help="a configuration (repeatable; default: the scheduled-sampling set in DEFAULT_VARIANTS)")
    parser.add_argument("--seeds", default="1234,2,3", help="comma-separated training seeds")
    parser.add_argument("--minutes", type=float, help="training budget (default: the config's, 25)")
    parser.add_argument("--out", help="where the runs go (default checkpoints/exposure, or checkpoints/"
                        "exposure-finetune with --base)")
    parser.add_argument("--results", help="where each finished run's translations are kept (and found again; "
                        "default bench/results/exposure, or bench/results/exposure-finetune with --base)")
    parser.add_argument("--json", dest="json_path", help="also write every figure to this JSON file")
    parser.add_argument("--eval-only", action="store_true", help="score the runs that exist; train none")
    parser.add_argument("--doc", help="rewrite the table between this file's exposure-bias markers "
                        "(docs/benchmarks.md)")
    parser.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    finetuning = parser.add_argument_group("fine-tuning mode (--base)")
    finetuning.add_argument("--base", help="fine-tune this converged checkpoint in every arm (FINETUNE_VARIANTS)")
    finetuning.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    finetuning.add_argument("--steps", type=int, help="a budget of updates instead of --minutes")
    finetuning.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="a train.* setting for every fine-tuning run (e.g. train.lr=0.0003)")
    finetuning.add_argument("--threads", type=int, default=0, help="train.threads of each run (0: torch's default)")
    finetuning.add_argument("--limit", type=int, default=0,
                            help="score only the first N sentences of each set (a smoke test; 0: all)")
    args = parser.parse_args()
    configure_process()
    if args.base:
        finetune_main(args)
        return

    args.out, args.results = args.out or "checkpoints/exposure", args.results or "bench/results/exposure"
    variants = parse_variants(args.variant or DEFAULT_VARIANTS)
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = evaluation_sets()
    test_src, test_tgt = sets["test"]
    longest = long_fifth(test_src)
    references = {"test": test_tgt, "long": [test_tgt[i] for i in longest], "bible": sets["bible"][1]}

    runs: list[dict] = []
    for seed in seeds:  # one seed of every configuration first: the table fills in evenly
        for name, overrides in variants.items():
            run = finished_run(Path(args.results), Path(args.out), name, seed, overrides, sets, args)
            if run is None:
                continue
            for beam in BEAMS:
                run["outputs"][f"long.b{beam}"] = [run["outputs"][f"test.b{beam}"][i] for i in longest]
            run["scores"] = {key: figures(hyps, references[key.split(".")[0]]) for key, hyps in run["outputs"].items()}
            runs.append(run)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} BLEU {v['bleu']:.2f}" for k, v in run["scores"].items()),
                  flush=True)
    if not runs:
        sys.exit("no finished runs to score")

    columns = [(f"{s}.b{b}", m) for s in ("test", "long", "bible") for b in BEAMS for m in ("bleu", "chrf")]
    columns += [("bible.b1", "degenerate"), ("bible.b5", "degenerate"), ("bible.b1", "length_ratio")]
    summary = {}
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        if mine:
            summary[name] = {"seeds": [r["seed"] for r in mine], "steps": mean_sd([r["steps"] for r in mine]),
                             "trained": sorted({f"{r['machine']}, {r.get('precision', 'unknown')}" for r in mine}),
                             **{f"{key} {metric}": mean_sd([r["scores"][key][metric] for r in mine])
                                for key, metric in columns}}
    trained = trained_on(summary)
    if len(trained) > 1:
        print("\nwarning: these runs were trained on different machines or in different precisions, so their "
              "steps differ for more than the configuration: " + "; ".join(trained))
    print(f"\nreferences degenerate: Bible {figures(references['bible'], references['bible'])['degenerate']:.1f}%, "
          f"test {figures(references['test'], references['test'])['degenerate']:.1f}%")
    header = ["configuration", "seeds", "steps"] + [f"{k} {m}" for k, m in columns]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, row in summary.items():
        cells = [name, str(len(row["seeds"])), f"{row['steps'][0]:,.0f}"]
        cells += [f"{row[f'{k} {m}'][0]:.2f} ± {row[f'{k} {m}'][1]:.2f}" for k, m in columns]
        print("| " + " | ".join(cells) + " |")

    tests = paired_tests(runs, variants, references, args.resamples)
    if tests:
        print(f"\npaired bootstrap against {next(iter(summary))} (the seeds both have, outputs together; "
              f"p: the chance of a difference this large by luck):")
        for key, results in tests.items():
            print(f"  {key}: " + "; ".join(f"{name} {r['delta']:+.2f} (n={r['seeds']}, p={r['p']:.3f})"
                                           for name, r in results.items()))
    verdicts = goal(summary)
    for name, verdict in verdicts.items():
        print(f"goal against {next(iter(summary))}: {name}: {verdict}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k != "outputs"} for r in runs]
        Path(args.json_path).write_text(json.dumps({"runs": slim, "summary": summary, "paired_tests": tests,
                                                    "goal": verdicts}, indent=1) + "\n", encoding="utf-8")
    if args.doc:
        write_between(Path(args.doc), DOC_BEGIN, DOC_END, doc_table(summary, tests, verdicts))


# what a configuration must do against the first (plain teacher forcing) to become the default:
# means over seeds, greedy unless named; (key, least difference)
GOAL = [("bible.b1 bleu", 1.0), ("bible.b1 chrf", 2.0), ("long.b1 bleu", 0.5), ("test.b1 bleu", -0.3),
        ("test.b5 bleu", -0.3)]


def goal(summary: dict) -> dict[str, str]:
    """For every configuration but the first: "met", or which of GOAL's differences fall short."""
    if len(summary) < 2:
        return {}
    base_name, *names = summary
    base, verdicts = summary[base_name], {}
    for name in names:
        short = [f"{key} {summary[name][key][0] - base[key][0]:+.2f} (needs {least:+.1f})"
                 for key, least in GOAL if summary[name][key][0] - base[key][0] < least]
        verdicts[name] = "met" if not short else "not met: " + ", ".join(short)
    return verdicts


DOC_BEGIN, DOC_END = "<!-- exposure-bias table: begin -->", "<!-- exposure-bias table: end -->"


def doc_table(summary: dict, tests: dict, verdicts: dict) -> str:
    """The table of docs/benchmarks.md: the columns the goal is judged on, means ± standard deviations."""
    columns = [("test.b5 bleu", "test BLEU b5"), ("test.b1 bleu", "test BLEU greedy"),
               ("long.b1 bleu", "long fifth BLEU greedy"), ("bible.b1 bleu", "Bible BLEU greedy"),
               ("bible.b1 chrf", "Bible chrF greedy"), ("bible.b5 bleu", "Bible BLEU b5"),
               ("bible.b1 degenerate", "Bible degenerate % greedy")]
    lines = [f"Trained on {'; '.join(trained_on(summary))}.\n",
             "| configuration | seeds | steps | " + " | ".join(title for _, title in columns) + " | goal |",
             "|---|---|---|" + "---|" * len(columns) + "---|"]
    for name, row in summary.items():
        cells = [f"`{name}`", str(len(row["seeds"])), f"{row['steps'][0]:,.0f}"]
        cells += [f"{row[key][0]:.2f} ± {row[key][1]:.2f}" for key, _ in columns]
        cells.append("(baseline)" if name == next(iter(summary)) else verdicts.get(name, "–").split(":")[0])
        lines.append("| " + " | ".join(cells) + " |")
    shown = [key for key in ("bible.b1 BLEU", "bible.b1 chrF", "long.b1 BLEU", "test.b1 BLEU") if key in tests]
    if shown:
        lines.append(f"\nPaired bootstrap against `{next(iter(summary))}` (the seeds both have, outputs pooled; n: "
                     f"how many seeds; p: the chance of a difference this large by luck):\n")
    for key in shown:
        lines.append(f"- {key}: " + "; ".join(
            f"`{name}` {r['delta']:+.2f} (n = {r['seeds']}, p = {r['p']:.3f})" for name, r in tests[key].items()))
    return "\n".join(lines)


def paired_tests(runs: list[dict], variants: dict, references: dict, resamples: int,
                 keys: Sequence[str] = ("bible.b1", "long.b1", "test.b1", "bible.b5")) -> dict:
    """BLEU and chrF of every configuration against the first, paired by seed and sentence: the
    outputs of the seeds both have, one after another, as one system each."""
    outputs = {(r["variant"], r["seed"]): r["outputs"] for r in runs}
    names = [n for n in variants if any(v == n for v, _ in outputs)]
    seeds = {n: {s for v, s in outputs if v == n} for n in names}
    tests: dict = {}
    for name in names[1:]:
        common = sorted(seeds[names[0]] & seeds[name])
        if not common:
            continue
        for key in keys:
            refs = references[key.split(".")[0]] * len(common)
            systems = [(n, [line for seed in common for line in outputs[n, seed][key]]) for n in (names[0], name)]
            for metric_name, metric in (("BLEU", BLEU()), ("chrF", CHRF())):
                _, scores = PairedTest(systems, {metric_name: metric}, [refs], test_type="bs", n_samples=resamples)()
                base, other = next(v for k, v in scores.items() if k != "System")  # the one metric's column
                tests.setdefault(f"{key} {metric_name}", {})[name] = {
                    "delta": other.score - base.score, "p": other.p_value, "seeds": len(common)}
    return tests

# ---------------------------------------------------------------- fine-tuning mode (--base)

SETTINGS = ("tatoeba", "bible")
# The whole fine-tuning run is the final phase (train.tf_phase=1): each schedule falls from its start to its
# floor over the run's budget, whatever the machine's speed. Continued teacher forcing first: the baseline.
_PHASE = "train.tf_phase=1,train.teacher_forcing=inverse_sigmoid"
FINETUNE_VARIANTS = [
    "teacher-forcing=train.teacher_forcing=constant,train.tf_start=1.0",
    f"inverse-sigmoid={_PHASE}",
    "linear-0.5=train.tf_phase=1,train.teacher_forcing=linear,train.tf_floor=0.5",
    f"position={_PHASE},train.tf_floor=0.5,train.tf_position=linear,train.tf_position_k=20",
    f"sample={_PHASE},train.tf_feed=sample,train.tf_tau=0.5",
    f"confidence={_PHASE},train.tf_select=confidence,train.tf_confidence=0.9,train.tf_noise=0.95",
    f"two-passes={_PHASE},train.tf_passes=2",
    f"sentence-oracle={_PHASE},train.tf_feed=sentence",
    # Shen et al. (2016) as Wang & Sennrich (2020) fine-tuned with it: 4 samples, alpha 0.005, no label smoothing
    "mrt=train.objective=mrt,train.mrt_samples=4,train.mrt_alpha=0.005,train.mrt_metric=bleu",
    # the n-best of a beam of 4 instead of samples (Edunov et al., 2018)
    "mrt-beam=train.objective=mrt,train.mrt_samples=4,train.mrt_search=beam,train.mrt_alpha=0.005",
]
SCORED = {"tatoeba": ("test", "long", "bible"), "bible": ("bible", "test")}


def finetune_command(setting: str, run_dir: Path, seed: int, overrides: list[str], args) -> list[str]:
    """``translate train --init-from BASE`` for one arm, setting and seed, at the bench's budget."""
    command = ["translate", "train", "--init-from", str(Path(args.base).resolve()), "--run-dir", str(run_dir),
               "--set", f"train.seed={seed}"]
    if setting == "bible":
        bible_train, bible_dev = bible_split(Path(args.out))
        command += ["--train", str(bible_train), "--dev", str(bible_dev)]
    overrides, budget = arm_budget(overrides, args)
    command += ["--max-steps", str(budget["steps"])] if "steps" in budget else ["--max-minutes", str(args.minutes)]
    if args.threads:
        command += ["--set", f"train.threads={args.threads}"]
    for item in [*args.set, *overrides]:  # the arm's own settings last: they win
        command += ["--set", item]
    return command


def arm_budget(overrides: list[str], args) -> tuple[list[str], dict]:
    """An arm's train settings and its budget: the bench's (``--steps`` or ``--minutes``), or the
    arm's own ``steps=N`` where an update costs more than the baseline's (MRT decodes samples):
    with ``--steps``, equal wall clock means fewer of its updates, as many as take that time."""
    own = [item for item in overrides if item.startswith("steps=")]
    settings = [item for item in overrides if not item.startswith("steps=")]
    if own:
        return settings, {"steps": int(own[-1].removeprefix("steps="))}
    return settings, {"steps": args.steps} if args.steps else {"minutes": args.minutes}


def finetuned_run(setting: str, name: str, seed: int, overrides: list[str], sets: dict, args) -> dict | None:
    """One fine-tuning run, scored and kept (RESULTS/<setting>-<name>-s<seed>.json.gz), or what was
    kept before; None when there is nothing and --eval-only forbids training. A run stopped midway
    (its last.pt without the done mark) is resumed."""
    results = Path(args.results)
    kept = results / f"{setting}-{name}-s{seed}.json.gz"
    budget = arm_budget(overrides, args)[1]
    if kept.is_file():
        with gzip.open(kept, "rt", encoding="utf-8") as source:
            run = json.load(source)
        if (run["overrides"], run["budget"], run["common"], run["limit"]) != (overrides, budget, args.set, args.limit):
            sys.exit(f"{kept} was made with {run['overrides']}, {run['budget']}, --set {run['common']}, --limit "
                     f"{run['limit']}; move it away to run it again")
        decoded(kept, run)
        return run
    run_dir = Path(args.out) / f"{setting}-{name}-s{seed}"
    command = finetune_command(setting, run_dir, seed, overrides, args)
    done = run_dir / "quality-done"
    if not done.is_file():
        if args.eval_only:
            return None
        resume = ["--resume"] if (run_dir / "last.pt").is_file() else []
        print("$", " ".join(command + resume), flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{run_dir.name}.train.log"
        with open(log, "a", encoding="utf-8") as out:
            code = subprocess.call(command + resume, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        if code != 0:
            sys.exit(f"training failed (exit {code}); see {log}")
        done.write_text(" ".join(command) + "\n", encoding="utf-8")
    run = {"setting": setting, "variant": name, "seed": seed, "overrides": overrides, "budget": budget,
           "common": args.set, "limit": args.limit, "base": str(args.base), "steps": steps_trained(run_dir),
           "command": " ".join(command), "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
           "precision": training_precision(run_dir), "decoding": DECODING, "outputs": outputs(run_dir, sets)}
    write_kept(kept, run)
    return run


def write_kept(path: Path, run: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with gzip.open(partial, "wt", encoding="utf-8") as sink:
        json.dump(run, sink)
    partial.replace(path)


def base_run(sets: dict, args) -> dict:
    """The base checkpoint itself, decoded once: where every arm starts (RESULTS/base.json.gz)."""
    kept = Path(args.results) / "base.json.gz"
    if kept.is_file():
        with gzip.open(kept, "rt", encoding="utf-8") as source:
            run = json.load(source)
        if (run["base"], run["limit"], run.get("decoding", DECODING)) == (str(args.base), args.limit, DECODING):
            return run
    work = Path(args.out) / "base"
    work.mkdir(parents=True, exist_ok=True)
    (work / "best.pt").unlink(missing_ok=True)
    (work / "best.pt").symlink_to(Path(args.base).resolve())
    for stale in (work / "eval").glob("*.txt") if (work / "eval").is_dir() else ():
        stale.unlink()  # another base, --limit or decoding
    run = {"variant": "base", "seed": 0, "base": str(args.base), "limit": args.limit, "decoding": DECODING,
           "outputs": outputs(work, sets)}
    write_kept(kept, run)
    return run


def finetune_sets(args) -> tuple[dict, dict, list[int]]:
    """The sets every run decodes (sources and references), the references of every scored key
    and the indices of the test's longest fifth; the first ``--limit`` sentences of each set when given."""
    sets = evaluation_sets()
    if args.limit:
        sets = {name: (src[: args.limit], ref[: args.limit]) for name, (src, ref) in sets.items()}
    longest = long_fifth(sets["test"][0])
    references = {"test": sets["test"][1], "long": [sets["test"][1][i] for i in longest], "bible": sets["bible"][1]}
    return sets, references, longest


def scored(run: dict, references: dict, longest: list[int], keys: tuple[str, ...]) -> dict:
    """The run's figures on ``keys`` (test, long, bible) at every beam; the long fifth is the test's subset."""
    for beam in BEAMS:
        run["outputs"][f"long.b{beam}"] = [run["outputs"][f"test.b{beam}"][i] for i in longest]
    run["scores"] = {f"{key}.b{beam}": figures(run["outputs"][f"{key}.b{beam}"], references[key])
                     for key in keys for beam in BEAMS}
    return run


def finetune_columns(setting: str) -> list[tuple[str, str]]:
    """(key, metric) of a setting's table and summary: BLEU and chrF of its sets, degenerate outputs."""
    columns = [(f"{key}.b{beam}", metric) for key in SCORED[setting] for beam in BEAMS for metric in ("bleu", "chrf")]
    if setting == "tatoeba":
        columns = [c for c in columns if not c[0].startswith("long")] + [("long.b1", "bleu"), ("long.b5", "bleu")]
    return columns + [("bible.b1", "degenerate"), ("bible.b5", "degenerate"), ("bible.b1", "length_ratio")]


def finetune_summary(runs: list[dict], names: list[str], columns: list[tuple[str, str]]) -> dict:
    summary = {}
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        if mine:
            summary[name] = {"seeds": [r["seed"] for r in mine], "steps": mean_sd([r.get("steps", 0) for r in mine]),
                             "trained": sorted({f"{r['machine']}, {r.get('precision', 'unknown')}"
                                                for r in mine if "machine" in r}),
                             **{f"{key} {metric}": mean_sd([r["scores"][key][metric] for r in mine])
                                for key, metric in columns}}
    return summary


FINETUNE_DOC = {  # the columns each setting's table in docs/benchmarks.md shows
    "tatoeba": [("test.b5 bleu", "test BLEU b5"), ("test.b1 bleu", "test BLEU greedy"),
                ("long.b1 bleu", "long fifth BLEU greedy"), ("bible.b1 bleu", "Bible BLEU greedy"),
                ("bible.b1 chrf", "Bible chrF greedy"), ("bible.b5 bleu", "Bible BLEU b5"),
                ("bible.b1 degenerate", "Bible degenerate % greedy"), ("bible.b5 degenerate", "Bible degenerate % b5")],
    "bible": [("bible.b1 bleu", "Bible BLEU greedy"), ("bible.b1 chrf", "Bible chrF greedy"),
              ("bible.b5 bleu", "Bible BLEU b5"), ("bible.b5 chrf", "Bible chrF b5"),
              ("bible.b1 degenerate", "Bible degenerate % greedy"), ("bible.b5 degenerate", "Bible degenerate % b5"),
              ("test.b1 bleu", "test BLEU greedy (forgotten?)")],
}
FINETUNE_BEGIN = "<!-- exposure-bias finetune table: begin -->"
FINETUNE_END = "<!-- exposure-bias finetune table: end -->"


def finetune_doc(results: dict, args) -> str:
    """Both settings' tables, their paired tests and the goal, for docs/benchmarks.md."""
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} minutes"
    lines = [f"Fine-tuning `{args.base}` for {budget} a run"
             + (f" (`--set {' '.join(args.set)}`)" if args.set else "") + "; made by `python bench/exposure_bias.py "
             "--base ...`. Mean ± standard deviation over seeds; greedy and beam 5 with today's default decoding "
             f"but split={SPLIT} and sources as they are (no casual restoring, no modernised spelling)."]
    for setting, part in results.items():
        columns = FINETUNE_DOC[setting]
        title = {"tatoeba": "(a) continuing on the bundled Tatoeba data",
                 "bible": "(b) fine-tuning on the Bible verses"}[setting]
        head = "| arm | seeds | steps | " + " | ".join(t for _, t in columns) + (" | goal |" if part["goal"] else " |")
        lines += ["", f"**{title}**, trained on {'; '.join(trained_on(part['summary'])) or 'no run yet'}:", "",
                  head, "|---|---|---|" + "---|" * (len(columns) + bool(part["goal"]))]
        for name, row in part["summary"].items():
            cells = [f"`{name}`", str(len(row["seeds"])) if name != "base" else "–",
                     f"{row['steps'][0]:,.0f}" if name != "base" else "0"]
            cells += [f"{row[key][0]:.2f} ± {row[key][1]:.2f}" if key in row else "–" for key, _ in columns]
            if part["goal"]:
                cells.append("–" if name == "base" else part["goal"].get(name, "(baseline)").split(":")[0])
            lines.append("| " + " | ".join(cells) + " |")
        if part["paired"]:
            baseline = next(name for name in part["summary"] if name != "base")
            lines.append(f"\nPaired bootstrap against `{baseline}` (the seeds "
                         f"both have, outputs pooled; n: how many seeds; p: the chance of a difference this large by "
                         f"luck):\n")
        for key, found in part["paired"].items():
            lines.append(f"- {key}: " + "; ".join(
                f"`{name}` {r['delta']:+.2f} (n = {r['seeds']}, p = {r['p']:.3f})" for name, r in found.items()))
    return "\n".join(lines)


def finetune_main(args) -> None:
    """The fine-tuning mode: every setting, seed and arm, then the tables."""
    if not Path(args.base).is_file():
        sys.exit(f"no checkpoint at {args.base}")
    if bool(args.steps) == (args.minutes is not None):
        sys.exit("give the fine-tuning budget as --minutes or as --steps (one of them)")
    if args.doc and FINETUNE_BEGIN not in Path(args.doc).read_text(encoding="utf-8"):
        sys.exit(f"{args.doc} has no {FINETUNE_BEGIN} ... {FINETUNE_END} markers; add them where the tables go")
    args.out = args.out or "checkpoints/exposure-finetune"
    args.results = args.results or "bench/results/exposure-finetune"
    settings = [s for s in args.settings.split(",") if s]
    if set(settings) - set(SETTINGS):
        sys.exit(f"unknown setting {sorted(set(settings) - set(SETTINGS))[0]!r}; use {', '.join(SETTINGS)}")
    variants = parse_variants(args.variant or FINETUNE_VARIANTS)
    seeds = [int(s) for s in args.seeds.split(",")]
    sets, references, longest = finetune_sets(args)
    base = base_run(sets, args)
    results = {}
    for setting in settings:
        keys, runs = SCORED[setting], []
        for seed in seeds:  # one seed of every arm first: the table fills in evenly
            for name, overrides in variants.items():
                run = finetuned_run(setting, name, seed, overrides, sets, args)
                if run is not None:
                    runs.append(scored(run, references, longest, keys))
                    print(f"{setting} {name} seed {seed}: " + ", ".join(
                        f"{k} BLEU {v['bleu']:.2f}" for k, v in run["scores"].items()), flush=True)
        columns = finetune_columns(setting)
        columns = [c for c in columns if c[0].split(".")[0] in keys]
        summary = finetune_summary([scored(dict(base, outputs=dict(base["outputs"])), references, longest, keys)]
                                   + runs, ["base", *variants], columns)
        tested = paired_tests(runs, variants, references, args.resamples,
                              [key for key in ("bible.b1", "long.b1", "test.b1", "bible.b5") if key[:-3] in keys])
        arms = {name: row for name, row in summary.items() if name != "base"}
        verdicts = goal(arms) if setting == "tatoeba" else {}
        results[setting] = {"summary": summary, "paired": tested, "goal": verdicts,
                            "runs": [{k: v for k, v in r.items() if k != "outputs"} for r in runs]}
        print(f"\n{setting}:")
        for name, verdict in verdicts.items():
            print(f"goal against {next(iter(arms))}: {name}: {verdict}")
    print()
    report(finetune_doc(results, args), results, args.json_path, args.doc, FINETUNE_BEGIN, FINETUNE_END)


if __name__ == "__main__":
    main()
