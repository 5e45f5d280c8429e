"""Ensembles of separately trained models against each model alone: the checkpoints (default
configuration, one seed each, sharing a tokenizer) decode the bundled test split and the Bible
verses (``../shared/data/bible-es-en.dev``, domain shift, evaluation only) with the default
options, each alone, in disjoint pairs (1+2, 3+4, ...) and all together. Prints and writes JSON:
BLEU, chrF and degenerate outputs of each, the mean and standard deviation over the singles and
over the pairs, and sentences per second (one thread) with its ratio to the singles' mean. Each
decode is kept under ``--out`` so that a stopped run goes on where it was; ``--sets test`` and
``--sets bible`` may run side by side, then ``--table-only`` writes the table.

    python bench/ensemble.py /work/domain/base-s{1,2,3,4}/best.pt --out /work/ensemble \\
        --json bench/results/ensemble.json --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, evaluation_sets, figures, report

from translate.translator import DecodeOptions, Translator

BEGIN, END = "<!-- ensemble table: begin -->", "<!-- ensemble table: end -->"


def arms(count: int) -> dict[str, tuple[int, ...]]:
    """Each model alone, disjoint pairs and (with more than two) all of them, by index."""
    chosen = {f"single-{i + 1}": (i,) for i in range(count)}
    chosen.update({f"pair-{i + 1}+{i + 2}": (i, i + 1) for i in range(0, count - 1, 2)})
    if count > 2:
        chosen[f"all-{count}"] = tuple(range(count))
    return chosen


def decode(checkpoints: list[str], members: tuple[int, ...], sources: list[str]) -> tuple[list[str], float]:
    first, *others = (checkpoints[i] for i in members)
    translator = Translator.load(first, DecodeOptions(inter_threads=1), ensemble=tuple(others))
    translator.translate(sources[:16])  # warm-up, untimed
    start = time.perf_counter()
    texts = [nbest[0].text for nbest in translator.translate(sources)]
    return texts, time.perf_counter() - start


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(out: Path, checkpoints: list[str], sets: dict) -> dict:
    """The figures of every decode kept under ``out``, and per set the mean of each kind of arm."""
    rows: dict[str, dict] = {}
    for set_name, (_, references) in sets.items():
        rows[set_name] = {}
        for arm in arms(len(checkpoints)):
            path = out / f"{arm}-{set_name}.json"
            if path.exists():
                kept = json.loads(path.read_text(encoding="utf-8"))
                rows[set_name][arm] = {**figures(kept["texts"], references), "seconds": kept["seconds"],
                                       "sent_per_s": len(references) / kept["seconds"]}
    summary: dict[str, dict] = {}
    for set_name, by_arm in rows.items():
        singles = [v for k, v in by_arm.items() if k.startswith("single")]
        if not singles:
            continue
        summary[set_name] = {}
        for kind in ("single", "pair", "all"):
            chosen = [v for k, v in by_arm.items() if k.startswith(kind)]
            if chosen:
                summary[set_name][kind] = {name: mean_sd([v[name] for v in chosen])
                                           for name in ("bleu", "chrf", "degenerate", "sent_per_s")}
                summary[set_name][kind]["time_vs_single"] = (statistics.fmean(v["seconds"] for v in chosen)
                                                             / statistics.fmean(v["seconds"] for v in singles))
    return {"arms": rows, "summary": summary}


def table(summary: dict, count: int, machine: str) -> str:
    lines = ["| models | test BLEU | test chrF | Bible BLEU | Bible chrF | Bible degenerate % | decoding time |",
             "|---|---|---|---|---|---|---|"]
    labels = {"single": "one (mean of {n})", "pair": "2 (mean of {n} disjoint pairs)", "all": f"all {count}"}
    for kind, label in labels.items():
        test, bible = summary.get("test", {}).get(kind), summary.get("bible", {}).get(kind)
        if not test and not bible:
            continue

        def cell(row, name):
            if not row:
                return ""
            figure = row[name]
            return f"{figure['mean']:.2f}" + (f" ± {figure['sd']:.2f}" if figure["n"] > 1 else "")
        n = (test or bible)["bleu"]["n"]
        time_ratio = (test or bible)["time_vs_single"]
        lines.append(f"| {label.format(n=n)} | {cell(test, 'bleu')} | {cell(test, 'chrf')} | {cell(bible, 'bleu')} "
                     f"| {cell(bible, 'chrf')} | {cell(bible, 'degenerate')} | {time_ratio:.2f}x |")
    lines += ["", f"Machine: {machine}, one thread. Beam 5, default decoding (int8, shortlists: the union of the "
              "models'). Decoding time: the test split's, against one model's. Made by `python bench/ensemble.py`."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True, help="a folder for each decode's output (a rerun goes on)")
    parser.add_argument("--sets", default="test,bible", help="test, bible or both")
    parser.add_argument("--limit", type=int, default=0, help="only the first N sentences of each set (0: all)")
    parser.add_argument("--table-only", action="store_true", help="decode nothing: summarise what --out holds")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--doc", help="a page with the ensemble table's markers to write the table into")
    args = parser.parse_args()
    if len(args.checkpoints) < 2:
        raise SystemExit("give two or more checkpoints")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = evaluation_sets()
    if args.limit:
        sets = {k: (s[: args.limit], r[: args.limit]) for k, (s, r) in sets.items()}
    if not args.table_only:
        for set_name in args.sets.split(","):
            sources, references = sets[set_name]
            for arm, members in arms(len(args.checkpoints)).items():
                path = out / f"{arm}-{set_name}.json"
                if path.exists():
                    continue
                texts, seconds = decode(args.checkpoints, members, sources)
                path.write_text(json.dumps({"checkpoints": [args.checkpoints[i] for i in members], "texts": texts,
                                            "seconds": seconds}, ensure_ascii=False) + "\n", encoding="utf-8")
                score = figures(texts, references)
                print(f"{set_name:<6} {arm:<12} BLEU {score['bleu']:6.2f}  chrF {score['chrf']:6.2f}  degenerate "
                      f"{score['degenerate']:5.2f}%  {len(sources) / seconds:6.1f} sent/s", flush=True)
    result = {"checkpoints": args.checkpoints, "machine": cpu_model(), "threads": 1, "limit": args.limit,
              "options": "defaults, inter_threads 1", **summarise(out, args.checkpoints, sets)}
    report(table(result["summary"], len(args.checkpoints), result["machine"]), result, args.json_path, args.doc,
           BEGIN, END)


if __name__ == "__main__":
    main()
