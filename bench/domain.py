"""The user's own text: a model scored zero-shot on what users type and on another domain, then
fine-tuned to that domain, with and without mixing in its original data, against training from
scratch on the same data for the same budget.

(a) Zero-shot: each base model (a default ``translate train``, one per seed: the ``base`` arm, or
    given with ``--base``) decoded
    with today's defaults and with the decoding of before this bench's issue (``BEFORE``: no
    sentence splitting, no n-gram blocking, no restoration of casual input, no identity
    shortlist), on

    - ``test``: the bundled test split;
    - ``casual``: the same sources lower-cased, without opening ``¿ ¡`` or closing ``. ! ?``
      (``common.casual``), scored against the same references;
    - ``long``: the test's longest fifth by source words;
    - ``bible``: ``../shared/data/bible-es-en.dev``, Bible verses (evaluation only for the base).

(b) Fine-tuning on ``../shared/data/bible-es-en.train.tsv`` (24,870 verses, disjoint from the dev
    verses) less 500 of them held out as the run's dev set (which picks best.pt: the Bible dev
    verses are only scored), with the bundled dev split as an extra dev set (what is forgotten),
    for each seed:

    - ``finetune``: ``translate train --init-from BASE`` on the Bible verses alone;
    - ``finetune-mix``: the same with ``--mix`` the base's own training data, as many tokens as the
      new data each epoch (``data.mix_ratio`` 1; mixed fine-tuning, Chu et al., 2017);
    - ``finetune-adapt``, ``finetune-mix-adapt``: those two with ``train.init_vocab=adapt``, a
      tokenizer of the run's own data (and mixed share), the base's rows carried over for the
      pieces the two vocabularies share (vocabulary.py);
    - ``scratch``: a default ``translate train`` on the same Bible verses alone;
    - ``scratch-tokenizer``: the same with the first BASE's tokenizer (``tokenizer.model``), the one
      fine-tuning has to keep: what that tokenizer costs, apart from what fine-tuning brings.

    ``--verses N`` trains these arms on N of the training verses (a seeded draw) instead: fine-tuning
    on a little in-domain data (their runs and results carry ``-vN``).

    Each run is scored like (a), with today's decoding, but with ``split=clauses``: what
    ``phrases`` does for a run that counted its training sources (99.9% of the Bible verses have 40
    words or fewer, and no clause of the dev verses or the bundled test is longer), while the runs
    written before that count was kept would otherwise be cut at 24 words. Fine-tuning starts from
    the first BASE.

Every run gets the same budget: ``--minutes`` of wall time (the machine must be otherwise idle)
or ``--steps`` updates (what a run of those minutes makes on this machine: immune to a busy
machine, so that runs may share it, ``--threads 1`` each). A step on the verses costs more than one
on Tatoeba (longer sentences in the same padded tokens: more time steps, fewer sentences each), so
``--calibrate M`` times default runs of M minutes on the idle machine, on the bundled data and on
the verses, and prints the steps each makes in ``--minutes`` (with ``--steps N``: the steps on the
verses that take as long as N on the bundled data, the ``--steps`` of the Bible arms).
Runs that finished before are skipped, so the bench resumes where it stopped. Each scored model
leaves its translations and figures in RESULTS/<arm>[-v<verses>][-lr<lr>]-<budget>-s<seed>.json.gz
(kept in git; the zero-shot rows: <arm>-s<seed>); the table (means and standard deviations over seeds,
a row per arm, learning rate and budget; fine-tuning is compared with training from scratch on the
same budget) is made from those files alone:

    python bench/domain.py --seeds 1,2                       # every arm, 25 minutes a run
    python bench/domain.py --seeds 1,2 --steps 4477 --threads 1 --arms base,scratch
    python bench/domain.py --base checkpoints/default/best.pt --arms zero-shot
    python bench/domain.py --seeds 1,2 --steps 4477 --threads 1 --verses 2000 --arms finetune,scratch
    python bench/domain.py --calibrate 5 --steps 4477 --json bench/results/domain-budget.json
    python bench/domain.py --table-only --json bench/results/domain.json --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BIBLE, carried, casual, cpu_model, evaluation_sets, figures, long_fifth, write_between

from translate.config import BUNDLED_DATA
from translate.runtime import configure_process
from translate.translator import DecodeOptions, Translator

ROOT = Path(__file__).resolve().parents[1]
BIBLE_TRAIN = BIBLE.parent / "bible-es-en.train.tsv"
ARMS = ("base", "zero-shot", "finetune", "finetune-mix", "finetune-adapt", "finetune-mix-adapt", "scratch",
        "scratch-tokenizer")
FINETUNE = ("finetune", "finetune-mix", "finetune-adapt", "finetune-mix-adapt")
SETS = ("test", "casual", "long", "bible")
# the decoding of before: every option that issue 34 added, off (an option this checkout lacks is left out)
BEFORE = {"split": "none", "no_repeat_ngram": 0, "restore_casual": False, "copy_unknown": False, "coverage": 0.0,
          "alpha": 1.0, "fold_accents": False}
CODE = ""  # the code version that decodes, set once at the start
DOC_BEGIN, DOC_END = "<!-- domain-table:begin -->", "<!-- domain-table:end -->"


def before_options() -> DecodeOptions:
    known = {field.name for field in dataclasses.fields(DecodeOptions)}
    return DecodeOptions(**{name: value for name, value in BEFORE.items() if name in known})


def scoring_sets() -> dict[str, tuple[list[str], list[str]]]:
    sets = evaluation_sets()
    test_src, test_tgt = sets["test"]
    longest = long_fifth(test_src)
    return {"test": (test_src, test_tgt),
            "casual": ([casual(line) for line in test_src], test_tgt),
            "long": ([test_src[i] for i in longest], [test_tgt[i] for i in longest]),
            "bible": sets["bible"]}


def score(checkpoint: Path, options: DecodeOptions, sets: dict) -> dict:
    """Translations and figures of every set, decoded by ``checkpoint`` with ``options``."""
    translator = Translator.load(checkpoint)
    result = {}
    for name, (sources, references) in sets.items():
        hypotheses = [nbest[0].text for nbest in translator.translate(sources, options)]
        result[name] = {"outputs": hypotheses, **figures(hypotheses, references),
                        **carried(sources, hypotheses, references)}
        print(f"  {name}: BLEU {result[name]['bleu']:.2f} chrF {result[name]['chrf']:.2f} "
              f"degenerate {result[name]['degenerate']:.1f}% carried {result[name]['carried']:.1f}%", flush=True)
    return result


HELD_OUT = 500  # Bible training verses set aside as the runs' dev set


def bible_split(work: Path) -> tuple[Path, Path]:
    """The Bible training verses less ``HELD_OUT`` of them (a seeded draw), and those: the dev set
    that picks best.pt, so that the Bible dev verses are only ever scored."""
    train, dev = work / "bible-train.tsv", work / "bible-heldout.tsv"
    if not (train.is_file() and dev.is_file()):
        work.mkdir(parents=True, exist_ok=True)
        header, *rows = BIBLE_TRAIN.read_text(encoding="utf-8").splitlines()
        held = set(random.Random(20261203).sample(range(len(rows)), HELD_OUT))
        train.write_text("".join(f"{r}\n" for i, r in enumerate([header, *rows]) if i - 1 not in held),
                         encoding="utf-8")
        dev.write_text("".join(f"{r}\n" for i, r in enumerate([header, *rows]) if i == 0 or i - 1 in held),
                       encoding="utf-8")
    return train, dev


def some_verses(train: Path, verses: int) -> Path:
    """``verses`` of the training verses in ``train`` (a seeded draw, in their order), beside it."""
    path = train.with_name(f"{train.stem}-{verses}.tsv")
    if not path.is_file():
        header, *rows = train.read_text(encoding="utf-8").splitlines()
        if not 0 < verses <= len(rows):
            sys.exit(f"--verses must be 1 to {len(rows):,}, got {verses:,}")
        kept = set(random.Random(verses).sample(range(len(rows)), verses))
        path.write_text(header + "\n" + "".join(f"{r}\n" for i, r in enumerate(rows) if i in kept), encoding="utf-8")
    return path


def budget_tag(budget: dict | None) -> str:
    """A training budget as it goes into names: ``3853steps`` or ``25min`` (none: a base's zero-shot rows)."""
    if not budget:
        return ""
    return f"{budget['steps']}steps" if "steps" in budget else f"{budget['minutes']:g}min"


def arm_key(arm: str, verses: int | None, budget: dict | None = None, tuned: dict | None = None) -> str:
    """The arm's row in the table: with ``-vN`` when it trained on N verses (``--verses``), ``-lrX``
    (``-dropoutX``) when its runs set ``train.lr`` (``model.dropout``), and its budget, so that only
    runs of the same settings and budget are compared."""
    parts = (arm, f"v{verses}" if verses else "", *(f"{name}{value}" for name, value in (tuned or {}).items()),
             budget_tag(budget))
    return "-".join(part for part in parts if part)


def run_name(arm: str, seed: int, verses: int | None, budget: dict | None, tuned: dict | None = None) -> str:
    return f"{arm_key(arm, verses, budget, tuned)}-s{seed}"


def train_command(arm: str, run_dir: Path, seed: int, base: Path | None, work: Path, args) -> list[str]:
    command = ["translate", "train", "--run-dir", str(run_dir), "--set", f"train.seed={seed}"]
    if arm != "base":
        bible_train, bible_dev = bible_split(work)
        if args.verses:
            bible_train = some_verses(bible_train, args.verses)
        command += ["--train", str(bible_train), "--dev", str(bible_dev)]
    if arm == "scratch-tokenizer":
        command += ["--set", f"tokenizer.model={base.parent / 'src.model'}"]
    if arm in FINETUNE:
        command += ["--init-from", str(base), "--dev", str(BUNDLED_DATA / "dev.tsv")]
    if arm.startswith("finetune-mix"):
        command += ["--mix", str(BUNDLED_DATA / "train.tsv")]
    if arm.endswith("-adapt"):
        command += ["--set", "train.init_vocab=adapt"]
    command += ["--max-steps", str(args.steps)] if args.steps else ["--max-minutes", str(args.minutes)]
    if args.threads:
        command += ["--set", f"train.threads={args.threads}"]
    for item in args.set:
        command += ["--set", item]
    return command


def train(command: list[str], run_dir: Path) -> None:
    done = run_dir / "domain-done"
    if done.is_file():
        return
    resume = (run_dir / "last.pt").is_file()
    print("$", " ".join(command + (["--resume"] if resume else [])), flush=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.out", "a", encoding="utf-8") as out:
        code = subprocess.call(command + (["--resume"] if resume else []), stdout=out, stderr=subprocess.STDOUT,
                               cwd=ROOT)
    if code != 0:
        sys.exit(f"training failed (exit {code}); see {run_dir.parent / (run_dir.name + '.out')}")
    done.write_text(" ".join(command) + "\n", encoding="utf-8")


def steps_of(checkpoint: Path) -> int:
    import torch
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    return int(payload.get("progress", {}).get("step", 0))


def run_arm(arm: str, seed: int, base: Path | None, args, sets: dict) -> None:
    results = Path(args.results)
    if arm == "base":
        run_dir = Path(args.out) / f"base-s{seed}"
        train(train_command(arm, run_dir, seed, None, Path(args.out), args), run_dir)
        return
    if arm == "zero-shot":
        for name, options in (("before", before_options()), ("zero-shot", DecodeOptions())):
            path = results / f"{name}-s{seed}.json.gz"
            if path.is_file():
                continue
            print(f"{name} seed {seed}: {base}", flush=True)
            record = {"arm": name, "seed": seed, "checkpoint": str(base), "steps": steps_of(base),
                      "options": dataclasses.asdict(options), "scores": score(base, options, sets)}
            write(path, record)
        return
    budget = {"steps": args.steps} if args.steps else {"minutes": args.minutes}
    name = run_name(arm, seed, args.verses, budget, tuned_settings(" ".join(args.set)))
    path = results / f"{name}.json.gz"
    if path.is_file():
        return
    run_dir = Path(args.out) / name
    command = train_command(arm, run_dir, seed, base, Path(args.out), args)
    train(command, run_dir)
    print(f"{name}:", flush=True)
    options = DecodeOptions(split="clauses")
    record = {"arm": arm, "seed": seed, "verses": args.verses, "command": " ".join(command),
              "steps": steps_of(run_dir / "last.pt"),
              "budget": budget,
              "options": dataclasses.asdict(options), "scores": score(run_dir / "best.pt", options, sets)}
    write(path, record)


def calibrate(args) -> dict:
    """Steps that default runs make in ``args.calibrate`` minutes on the idle machine, on the bundled
    data (``base``) and on the Bible training verses (``scratch``), and what that makes in
    ``args.minutes``: scaled by the time (this machine's speed) and by the bundled data's steps."""
    import tempfile
    figures_ = {"machine": cpu_model(), "minutes": args.calibrate, "budget_minutes": args.minutes, "arms": {}}
    with tempfile.TemporaryDirectory() as work:
        for arm in ("base", "scratch"):
            run_dir = Path(work) / arm
            command = train_command(arm, run_dir, 1, None, Path(args.out), argparse.Namespace(
                verses=None, steps=None, minutes=args.calibrate, threads=args.threads, set=args.set))
            print("$", " ".join(command), flush=True)
            code = subprocess.call(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=ROOT)
            if code != 0:
                sys.exit(f"calibration run {arm} failed (exit {code})")
            steps = steps_of(run_dir / "last.pt")
            figures_["arms"][arm] = {"steps": steps, "steps_in_budget": round(steps * args.minutes / args.calibrate)}
            print(f"{arm}: {steps:,} steps in {args.calibrate:g} minutes, "
                  f"{figures_['arms'][arm]['steps_in_budget']:,} in {args.minutes:g}", flush=True)
    ratio = figures_["arms"]["scratch"]["steps"] / figures_["arms"]["base"]["steps"]
    figures_["bible_per_bundled_step"] = ratio
    print(f"a step on the verses costs {1 / ratio:.2f} of one on the bundled data", flush=True)
    if args.steps:  # the steps that a base of --steps makes in --minutes elsewhere, on the verses
        figures_["bible_steps"] = {"bundled": args.steps, "verses": round(args.steps * ratio)}
        print(f"{args.steps:,} steps on the bundled data take as long as {round(args.steps * ratio):,} on the verses",
              flush=True)
    return figures_


def code_version() -> str:
    """The commit this checkout is at (with "+changes" when files differ from it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "translate") else "")


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record["machine"] = cpu_model()
    record["code"] = CODE
    with gzip.open(path, "wt", encoding="utf-8") as out:
        json.dump(record, out)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


COLUMNS = [("test", "bleu"), ("casual", "bleu"), ("long", "bleu"), ("bible", "bleu"), ("bible", "chrf"),
           ("bible", "degenerate"), ("bible", "carried"), ("test", "degenerate")]
ROWS = ("before", "zero-shot", "scratch", "scratch-tokenizer", "finetune", "finetune-mix", "finetune-adapt",
        "finetune-mix-adapt")
LABELS = {"before": "base, decoding of before", "zero-shot": "base, today's decoding",
          "scratch": "Bible only, from scratch", "scratch-tokenizer": "Bible only, from scratch, the base's tokenizer",
          "finetune": "base fine-tuned on the Bible",
          "finetune-mix": "base fine-tuned, mixed with as many Tatoeba tokens",
          "finetune-adapt": "base fine-tuned on the Bible, vocabulary adapted",
          "finetune-mix-adapt": "base fine-tuned, mixed, vocabulary adapted"}


# the settings a run may tune (``--set``) that make a row of their own, by their short names
TUNED = (("train.lr", "lr"), ("model.dropout", "dropout"))


def tuned_settings(command: str) -> dict[str, str]:
    """The tuned settings (``TUNED``) a run's command set, by their short names."""
    found = {name: re.search(rf"{re.escape(key)}=(\S+)", command) for key, name in TUNED}
    return {name: match.group(1) for name, match in found.items() if match}


def tuned_label(tuned: dict | None) -> str:
    return "".join(f", {name} {value}" for name, value in (tuned or {}).items())


def summary(results: Path) -> dict:
    records: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*-s*.json.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            record = json.load(handle)
        key = arm_key(record["arm"], record.get("verses"), record.get("budget"),
                      tuned_settings(record.get("command", "")))
        records.setdefault(key, []).append(record)
    table = {}
    for arm, runs in records.items():
        row = {"arm": runs[0]["arm"], "seeds": sorted(r["seed"] for r in runs), "steps": [r["steps"] for r in runs],
               "budget": runs[0].get("budget"), "machine": runs[0].get("machine"),
               "tuned": tuned_settings(runs[0].get("command", "")), "verses": runs[0].get("verses")}
        for name, metric in COLUMNS:
            row[f"{name} {metric}"] = mean_sd([r["scores"][name][metric] for r in runs])
        table[arm] = row
    return table


def goals(table: dict) -> list[str]:
    lines = []

    def get(arm: str, key: str) -> float | None:
        return table[arm][key][0] if arm in table else None

    def check(label: str, value: float | None, passed) -> None:
        if value is not None:
            lines.append(f"{'met' if passed(value) else 'NOT met'}: {label} ({value:+.2f})")

    before, now = "before", "zero-shot"
    for key, need in (("bible bleu", 2.0), ("bible chrf", 3.0)):
        if before in table and now in table:
            check(f"zero-shot {key} >= +{need} over the decoding of before", get(now, key) - get(before, key),
                  lambda v, need=need: v >= need)
    check("zero-shot Bible degenerate <= 1%", get(now, "bible degenerate"), lambda v: v <= 1.0)
    if before in table and now in table:
        check("zero-shot test BLEU no more than 0.2 lower", get(now, "test bleu") - get(before, "test bleu"),
              lambda v: v >= -0.2)
    if now in table:
        check("casual within 3 BLEU of the test", get(now, "casual bleu") - get(now, "test bleu"),
              lambda v: v >= -3.0)
    for key in table_order(table):  # each fine-tuning row against training from scratch on the same budget
        row = table[key]
        scratch = arm_key("scratch", row.get("verses"), row.get("budget"))
        if row["arm"] not in FINETUNE or scratch not in table:
            continue
        gain, budget = get(key, "bible bleu") - get(scratch, "bible bleu"), budget_tag(row.get("budget"))
        budget += tuned_label(row.get("tuned"))
        if row.get("verses"):  # fine-tuning on fewer verses (--verses): measured, not a goal
            lines.append(f"measured: {row['arm']} on {row['verses']:,} verses, {budget}, Bible BLEU over scratch "
                         f"on them ({gain:+.2f})")
        elif len(row["seeds"]) < 2:  # the goal is judged on two seeds or more
            lines.append(f"measured, one seed: {row['arm']} ({budget}) Bible BLEU over scratch ({gain:+.2f})")
        else:
            check(f"{row['arm']} ({budget}) Bible BLEU >= +2 over scratch", gain, lambda v: v >= 2.0)
    for key in table_order(table):
        row = table[key]
        if row["arm"] in ("finetune-mix", "finetune-mix-adapt") and now in table:
            check(f"{row['arm']} ({budget_tag(row.get('budget'))}) test BLEU within 1.5 of the base",
                  get(key, "test bleu") - get(now, "test bleu"), lambda v: v >= -1.5)
    return lines


def table_order(table: dict) -> list[str]:
    """The table's rows: by arm (``ROWS``), then the verses they trained on, then their budget."""
    def budget_size(budget: dict | None) -> float:
        return 0 if not budget else budget.get("steps", budget.get("minutes", 0))
    return sorted(table, key=lambda key: (table[key]["verses"] or 0, ROWS.index(table[key]["arm"]),
                                          budget_size(table[key].get("budget")),
                                          tuple((table[key].get("tuned") or {}).get(name, "") for _, name in TUNED)))


def doc_table(table: dict) -> str:
    names = {"test": "test", "casual": "casual", "long": "longest fifth", "bible": "Bible"}
    metrics = {"bleu": "BLEU", "chrf": "chrF", "degenerate": "degenerate %", "carried": "names kept %"}
    head = "| model | seeds | steps | " + " | ".join(f"{names[n]} {metrics[m]}" for n, m in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for arm in table_order(table):
        row = table[arm]
        cells = [f"{m:.2f} ± {s:.2f}" if len(row["seeds"]) > 1 else f"{m:.2f}"
                 for m, s in (row[f"{n} {k}"] for n, k in COLUMNS)]
        steps = "/".join(f"{s:,}" for s in row["steps"])
        label = LABELS[row["arm"]] + tuned_label(row.get("tuned"))
        label += f", {row['verses']:,} verses" if row.get("verses") else ""
        lines.append(f"| {label} | {len(row['seeds'])} | {steps} | " + " | ".join(cells) + " |")
    machines: dict[str, list[str]] = {}
    for row in table.values():
        budget = budget_tag(row.get("budget")) or "zero-shot"
        if budget not in machines.setdefault(row["machine"], []):
            machines[row["machine"]].append(budget)
    where = "; ".join(f"{machine} ({', '.join(budgets)})" if len(machines) > 1 else machine
                      for machine, budgets in machines.items())
    lines.append("")
    lines.append(f"Machine: {where}, 2 cores. Beam 5, default decoding (int8, shortlist; the Bible-trained "
                 "models with split=clauses, which is what phrases does for them); steps: the run's "
                 "updates (a default run makes about 4,477 in 25 minutes on 2 idle cores of the Xeon; what that "
                 "makes on the verses: `--calibrate`, bench/results/domain-budget.json). "
                 + "Mean ± standard deviation where there are several seeds; "
                 + "made by `python bench/domain.py --table-only`.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", action="append", default=[],
                        help="a base checkpoint, one per seed (default: OUT/base-s<seed>/best.pt, the base arm's)")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds (zero-shot: one per --base)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=25.0, help="training budget in minutes")
    budget.add_argument("--steps", type=int, help="training budget in updates instead")
    parser.add_argument("--verses", type=int, help="train the Bible arms on this many of the training verses")
    parser.add_argument("--threads", type=int, default=0, help="train.threads of each run (0: torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train.* setting for every run (e.g. train.amp=bf16, what auto picks when idle)")
    parser.add_argument("--out", default="checkpoints/domain", help="where the runs go")
    parser.add_argument("--results", default="bench/results/domain", help="where each scored model's JSON goes")
    parser.add_argument("--table-only", action="store_true", help="only make the table from RESULTS")
    parser.add_argument("--calibrate", type=float, metavar="M",
                        help="only time default runs of M minutes on the bundled data and on the verses: the "
                             "steps each makes in --minutes")
    parser.add_argument("--json", dest="json_path", help="also write the table to this JSON file")
    parser.add_argument("--doc", help="write the table into this page between its markers")
    args = parser.parse_args()
    configure_process()
    global CODE
    CODE = code_version()  # as imported: a later change of the files does not change what this process runs
    if args.calibrate:
        figures_ = calibrate(args)
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(figures_, indent=1) + "\n", encoding="utf-8")
        return
    if not args.table_only:
        arms = [a for a in args.arms.split(",") if a]
        unknown = sorted(set(arms) - set(ARMS))
        if unknown:
            sys.exit(f"unknown arm {unknown[0]!r}; use {', '.join(ARMS)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        bases = [Path(b).resolve() for b in args.base] or [Path(args.out).resolve() / f"base-s{s}" / "best.pt"
                                                           for s in seeds]
        sets = scoring_sets()
        for arm in arms:
            for i, seed in enumerate(seeds):
                base = bases[i] if arm == "zero-shot" else bases[0]
                if arm not in ("base", "scratch") and not base.is_file():
                    sys.exit(f"no base model at {base}: train it first (--arms base) or give --base")
                if arm != "zero-shot" or i < len(bases):
                    run_arm(arm, seed, base, args, sets)
    table = summary(Path(args.results))
    text = doc_table(table)
    print(text)
    for line in goals(table):
        print(line)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"table": table, "goals": goals(table)}, indent=1) + "\n",
                                        encoding="utf-8")
    if args.doc:
        write_between(Path(args.doc), DOC_BEGIN, DOC_END, text)


if __name__ == "__main__":
    main()
