"""Trains and decodes the same model with Joey NMT 2.3.0, OpenNMT-py 3.5.1 and `translate`, for
the same training wall time each, one toolkit after the other, and prints one table.

    bash bench/peers/install.sh              # once: the peers' virtual environments
    python bench/peers/run.py --minutes 10   # [--toolkits joey,onmt,translate]

For each toolkit: train for --minutes of wall time (counted from the toolkit's first training
step, after its data loading; peers are stopped with SIGINT, `translate` stops itself with
--max-minutes), peak RSS from /usr/bin/time -v; then decode the test set greedy and with beam 5
(length penalty alpha 1.0, batches of 64 sentences, at most 100 output pieces) with the
toolkit's own decoder from the last checkpoint saved within the budget, detokenize with the
shared SentencePiece model and score with sacrebleu (13a) against the plain test references.
Prints a Markdown table and writes bench/peers/work/results.json. See bench/peers/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORK = HERE / "work"
VENVS = HERE / ".venvs"
CONFIGS = HERE / "configs"
TIME = "/usr/bin/time"
TOOLKITS = ("joey", "onmt", "translate")
NAMES = {"joey": "Joey NMT 2.3.0", "onmt": "OpenNMT-py 3.5.1", "translate": "translate"}
THREADS = 2
BATCH = 64
ALPHA = 1.0
MAX_LEN = 100
BEAMS = (1, 5)
# Read inside each toolkit's own environment: its training counters, whether a checkpoint loads.
JOEY_STATS = ("import json, sys, torch; s = torch.load(sys.argv[1], map_location='cpu', weights_only=False)"
              "['stats_state']; print(json.dumps({k: s[k] for k in ('steps', 'total_tokens')}))")
ONMT_LOADS = "import sys, torch; torch.load(sys.argv[1], map_location='cpu', weights_only=False)"
TRANSLATE_PROGRESS = ("import json, sys, torch; p = torch.load(sys.argv[1], map_location='cpu', weights_only=True)"
                      "['progress']; print(json.dumps(p))")
# Rough speeds on 2 CPU cores (shared/bench/PEERS.md), used only to space checkpoints and
# validations in steps: the peers count in steps, the budget is in minutes.
STEPS_PER_MINUTE = {"joey": 113, "onmt": 210}

# The `translate` settings that match the protocol (the peers' configs/*.yaml): the same model,
# initialised as OpenNMT-py does (uniform in +-0.1), pure teacher forcing, no label smoothing,
# separate output layer, full precision, no validation inside the budget. --translate-set
# KEY=VALUE adds to or overrides these.
TRANSLATE_SETTINGS = {
    "model.cell": "lstm", "model.embed_dim": 256, "model.hidden_dim": 512, "model.layers": 1,
    "model.bidirectional": "true", "model.attention": "bahdanau", "model.input_feeding": "true",
    "model.bridge": "true", "model.dropout": 0.2, "model.tie_embeddings": "false", "model.init_uniform": 0.1,
    "train.lr": 0.001, "train.lr_schedule": "constant", "train.clip_norm": 1.0, "train.label_smoothing": 0.0,
    "train.teacher_forcing": "constant", "train.tf_start": 1.0, "train.seed": 42, "train.threads": THREADS,
    "train.amp": "false", "train.device": "cpu", "train.eval_every": 10 ** 9, "train.patience": 0,
    "data.max_len": 50,
}


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Failure(RuntimeError):
    """One toolkit could not be trained or decoded; the message says where to look."""


class Timed:
    """A command under /usr/bin/time -v, in its own process group, its output (stdout and stderr)
    written line by line, each with the second it arrived, to ``log_path``."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str], stdin: Path | None = None,
                 stdout: Path | None = None):
        """``stdout``: a file for the command's standard output; the log then gets standard error."""
        self.log_path = log_path
        self.rss_path = log_path.with_suffix(".time")
        self.lines: list[tuple[float, str]] = []
        self.done = False
        self.cond = threading.Condition()
        self.t0 = time.monotonic()
        self.stdin = stdin.open("rb") if stdin else subprocess.DEVNULL
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w", encoding="utf-8") as handle:
            handle.write("$ " + " ".join(cmd) + "\n")
        self.stdout = stdout.open("wb") if stdout else None
        self.proc = subprocess.Popen([TIME, "-v", "-o", str(self.rss_path)] + cmd, cwd=REPO, env=env,
                                     stdin=self.stdin, stdout=self.stdout or subprocess.PIPE,
                                     stderr=subprocess.PIPE if self.stdout else subprocess.STDOUT,
                                     start_new_session=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with self.log_path.open("a", encoding="utf-8") as handle:
            stream = self.proc.stderr if self.stdout else self.proc.stdout
            for raw in iter(stream.readline, b""):
                now = time.monotonic()
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                handle.write(f"{now - self.t0:9.3f} | {line}\n")
                handle.flush()
                with self.cond:
                    self.lines.append((now, line))
                    self.cond.notify_all()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> float | None:
        """The arrival time of the first line matching ``pattern``; None if the process ended or
        ``timeout`` passed first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for t, line in self.lines[seen:]:
                    if regex.search(line):
                        return t
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    return None
                self.cond.wait(min(left, 1.0))

    def running(self) -> bool:
        return self.proc.poll() is None

    def _children(self) -> list[int]:
        """The command's own process (the child of /usr/bin/time), to signal it without time."""
        try:
            path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            return [int(p) for p in path.read_text().split()]
        except (OSError, ValueError):
            return []

    def interrupt(self) -> None:
        """SIGINT to the whole group: /usr/bin/time ignores it while it waits, the toolkit (and
        any data-loader workers) get it, as from Ctrl-C."""
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def finish(self, grace: float) -> int:
        """Waits up to ``grace`` seconds, then SIGTERM and SIGKILL to the command (not to time,
        so the peak-RSS report is still written). Returns the exit status."""
        try:
            return self._wait(grace)
        except subprocess.TimeoutExpired:
            pass
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            for pid in self._children():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                return self._wait(wait)
            except subprocess.TimeoutExpired:
                continue
        os.killpg(self.proc.pid, signal.SIGKILL)
        return self._wait(None)

    def _wait(self, timeout: float | None) -> int:
        code = self.proc.wait(timeout)
        self.thread.join(10)
        if self.stdin is not subprocess.DEVNULL:
            self.stdin.close()
        if self.stdout:
            self.stdout.close()
        return code

    def peak_rss_mb(self) -> float | None:
        try:
            match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", self.rss_path.read_text())
        except OSError:
            return None
        return int(match.group(1)) / 1024 if match else None

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_budget(proc: Timed, start_pattern: str, seconds: float, startup_timeout: float = 900,
               need: str | None = None) -> tuple[float, float]:
    """Waits for the toolkit's first-training marker, lets it train ``seconds``, then SIGINT.
    Returns (start, stop) on the monotonic clock: the budget's start and end.

    ``need``: a pattern (a checkpoint being saved) that must have been seen before the SIGINT; if
    it was not seen within the budget, training goes on until it appears and a next line follows
    (the save is then complete), and the caller reports the overrun."""
    start = proc.wait_for(start_pattern, startup_timeout)
    if start is None:
        proc.interrupt()
        proc.finish(30)
        raise Failure(f"training never started (no line matching {start_pattern!r}); see {proc.log_path}:\n"
                      f"{tail(proc.log_path)}")
    deadline = start + seconds
    while proc.running() and time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    stop = time.monotonic()
    if not proc.running():
        raise Failure(f"the trainer ended before the budget was over; see {proc.log_path}:\n{tail(proc.log_path)}")
    if need and proc.wait_for(need, 0) is None:
        log("no checkpoint within the budget: training on until the first one is saved")
        saved = proc.wait_for(need, 1800)
        if saved is not None:
            with proc.cond:
                while proc.running() and not any(t > saved for t, _ in proc.lines):
                    proc.cond.wait(1.0)
    proc.interrupt()
    return start, stop


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def venv_python(name: str) -> Path:
    python = VENVS / name / "bin" / "python"
    if not python.exists():
        raise Failure(f"{python} is missing: run bash bench/peers/install.sh first")
    return python


def round_steps(value: float, floor: int) -> int:
    step = 10 if value < 200 else 50
    return max(floor, round(value / step) * step)


# --------------------------------------------------------------------------------------------
# Joey NMT 2.3.0
# --------------------------------------------------------------------------------------------

def joey_train(minutes: float, out: Path) -> dict:
    python = venv_python("joey")
    cfg = yaml.safe_load((CONFIGS / "joey.yaml").read_text(encoding="utf-8"))
    model_dir = out / "model"
    cfg["model_dir"] = rel(model_dir)
    # Joey saves a checkpoint at each validation and when interrupted; validate (a greedy pass over
    # the dev set, inside the budget as for any Joey user) about every third of the budget
    validation = round_steps(STEPS_PER_MINUTE["joey"] * minutes / 3, 100)
    cfg["training"]["validation_freq"] = validation
    config = write_yaml(out / "train.yaml", cfg)
    proc = Timed([str(python), "-m", "joeynmt", "train", rel(config), "--skip-test"], out / "train.log", environment())
    start, stop = run_budget(proc, r"EPOCH\s+1\s*$", minutes * 60)
    code = proc.finish(300)
    latest = model_dir / "latest.ckpt"
    if not latest.exists():
        raise Failure(f"Joey left no checkpoint (exit {code}); see {proc.log_path}:\n{tail(proc.log_path)}")
    ckpt = latest.resolve()
    stats = json.loads(subprocess.run(
        [str(python), "-c", JOEY_STATS, str(ckpt)], check=True, capture_output=True, text=True,
        env=environment()).stdout)
    text = proc.text()
    logged = [float(x) for x in re.findall(r"Tokens per Sec:\s*([\d.]+)", text)]
    params = re.search(r"Total params:\s*(\d+)", text)
    seconds = stop - start
    return {
        "steps": stats["steps"], "target_tokens": stats["total_tokens"], "train_seconds": round(seconds, 1),
        "tok_per_s": stats["total_tokens"] / seconds, "logged_tok_per_s_median": median(logged),
        "validations": max(0, len(re.findall(r"Checkpoint saved in", text)) - 1),
        "validation_freq": validation, "checkpoint": rel(ckpt), "checkpoint_step": stats["steps"],
        "parameters": int(params.group(1)) if params else None, "peak_rss_train_mb": proc.peak_rss_mb(),
        "exit_code": code, "config": rel(config),
    }


def joey_decode(train: dict, beam: int, src: Path, out: Path) -> dict:
    python = venv_python("joey")
    cfg = yaml.safe_load((REPO / train["config"]).read_text(encoding="utf-8"))
    cfg["testing"].update(load_model=train["checkpoint"], beam_size=beam, beam_alpha=ALPHA, batch_size=BATCH,
                          batch_type="sentence", max_output_length=MAX_LEN, n_best=1)
    config = write_yaml(out / f"decode.b{beam}.yaml", cfg)
    hyp = out / f"hyp.b{beam}.pieces"
    # Joey 2.3.0's `translate -o FILE` crashes (AttributeError: 'BaseConfig' object has no attribute
    # 'n_best'): read the translations from its standard output instead
    proc = Timed([str(python), "-m", "joeynmt", "translate", rel(config)],
                 out / f"decode.b{beam}.log", environment(), stdin=src, stdout=hyp)
    code = proc.finish(3600)
    took = re.search(r"Generation took ([\d.]+)\[sec\]", proc.text())
    n = len(hyp.read_text(encoding="utf-8").splitlines()) if hyp.exists() else 0
    if code != 0 or not took or n != len(src.read_text(encoding="utf-8").splitlines()):
        raise Failure(f"Joey decoding failed ({n} lines out, exit {code}); see {proc.log_path}:\n"
                      f"{tail(proc.log_path)}")
    return {"pieces": hyp, "seconds": float(took.group(1)),
            "timing": "Joey's 'Generation took' (model loading excluded)",
            "peak_rss_mb": proc.peak_rss_mb()}


# --------------------------------------------------------------------------------------------
# OpenNMT-py 3.5.1
# --------------------------------------------------------------------------------------------

ONMT_REPORT = re.compile(r"Step\s+(\d+)(?:/\s*\d+)?;.*?bsz:\s*(\d+)/\s*(\d+)/\s*(\d+);\s*(\d+)/\s*(\d+) tok/s")


def onmt_train(minutes: float, out: Path) -> dict:
    train_bin = VENVS / "onmt" / "bin" / "onmt_train"
    venv_python("onmt")
    cfg = yaml.safe_load((CONFIGS / "onmt.yaml").read_text(encoding="utf-8"))
    model_dir = out / "model"
    cfg["save_model"] = rel(model_dir / "model")
    cfg["save_data"] = rel(out / "data")
    # OpenNMT-py saves only every N steps and not when interrupted: about 10 saves a budget, and
    # the last one saved before the budget ended is the one decoded
    save_steps = round_steps(STEPS_PER_MINUTE["onmt"] * minutes / 10, 10)
    cfg["save_checkpoint_steps"] = save_steps
    config = write_yaml(out / "train.yaml", cfg)
    proc = Timed([str(train_bin), "-config", rel(config)], out / "train.log", environment())
    # OpenNMT-py reads its corpus into its first bucket inside the training loop: the budget starts
    # at its first step's report (report_every 1), as the others' start after their data loading
    start, stop = run_budget(proc, r"Step\s+1[/;]", minutes * 60, need=r"Saving checkpoint")
    code = proc.finish(120)
    # target tokens from the step reports (average target tokens a batch x steps) after the first
    # step, up to the last report within the budget; the time is when that report arrived
    tokens, last_step, last_time, logged = 0, None, None, []
    for t, line in proc.lines:
        match = ONMT_REPORT.search(line)
        if match and t <= stop + 0.5:
            step, tgt_per_batch = int(match.group(1)), int(match.group(3))
            if last_step is not None:
                tokens += tgt_per_batch * (step - last_step)
                logged.append(float(match.group(6)))
            last_step, last_time = step, t
    if last_time is None or last_time <= start:
        raise Failure(f"OpenNMT-py logged no training step within the budget; see {proc.log_path}")
    saved, late = {}, {}
    for t, line in proc.lines:
        match = re.search(r"Saving checkpoint (\S+_step_(\d+)\.pt)", line)
        if match:
            (saved if t <= stop else late)[int(match.group(2))] = (REPO / match.group(1), t)
    over_budget = None
    if not saved and late:  # none within the budget: the first one after it (reported)
        first = min(late)
        saved = {first: late[first]}
        over_budget = round(late[first][1] - stop, 1)
    ckpt = None
    for step in sorted(saved, reverse=True):  # one being written at the interrupt may be cut short
        path = saved[step][0]
        if path.exists() and subprocess.run([str(venv_python("onmt")), "-c", ONMT_LOADS, str(path)], check=False,
                                            capture_output=True, env=environment()).returncode == 0:
            ckpt = (step, path)
            break
    if ckpt is None:
        raise Failure(f"OpenNMT-py saved no readable checkpoint within the budget (every {save_steps} steps); "
                      f"see {proc.log_path}")
    params = re.search(r"number of parameters:\s*(\d+)", proc.text())
    return {
        "steps": last_step, "target_tokens": tokens, "train_seconds": round(last_time - start, 1),
        "tok_per_s": tokens / (last_time - start), "logged_tok_per_s_median": median(logged),
        "save_checkpoint_steps": save_steps, "checkpoint": rel(ckpt[1]), "checkpoint_step": ckpt[0],
        "checkpoint_seconds_over_budget": over_budget,
        "parameters": int(params.group(1)) if params else None, "peak_rss_train_mb": proc.peak_rss_mb(),
        "exit_code": code, "config": rel(config),
    }


def onmt_decode(train: dict, beam: int, src: Path, out: Path) -> dict:
    hyp = out / f"hyp.b{beam}.pieces"
    cmd = [str(VENVS / "onmt" / "bin" / "onmt_translate"), "-model", train["checkpoint"], "-src", rel(src),
           "-output", rel(hyp), "-gpu", "-1", "-batch_size", str(BATCH), "-batch_type", "sents",
           "-beam_size", str(beam), "-max_length", str(MAX_LEN), "-seed", "42", "-report_time"]
    if beam > 1:
        cmd += ["-length_penalty", "wu", "-alpha", str(ALPHA)]
    proc = Timed(cmd, out / f"decode.b{beam}.log", environment(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
    code = proc.finish(3600)
    text = proc.text()
    average = re.search(r"Average translation time \(ms\):\s*([\d.]+)", text)
    if code != 0 or not hyp.exists() or not average:
        raise Failure(f"onmt_translate failed (exit {code}); see {proc.log_path}:\n{tail(proc.log_path)}")
    n = len(hyp.read_text(encoding="utf-8").splitlines())
    return {"pieces": hyp, "seconds": float(average.group(1)) * n / 1000,
            "timing": "onmt_translate -report_time (model loading excluded)", "peak_rss_mb": proc.peak_rss_mb()}


# --------------------------------------------------------------------------------------------
# translate (this repository)
# --------------------------------------------------------------------------------------------

def translate_train(minutes: float, out: Path, extra: list[str], batch_tokens: int) -> dict:
    settings = dict(TRANSLATE_SETTINGS)
    settings["train.batch_tokens"] = batch_tokens
    settings["tokenizer.model"] = rel(WORK / "spm.model")
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--translate-set expects KEY=VALUE, got {item!r}")
        settings[key.strip()] = value.strip()
    run_dir = out / "run"
    cmd = [sys.executable, "-m", "translate.cli", "train", "--run-dir", rel(run_dir), "--max-minutes", f"{minutes:g}"]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    proc = Timed(cmd, out / "train.log", environment())
    # translate stops itself after --max-minutes of training; SIGINT only if it overruns badly
    start = proc.wait_for(r"batches an epoch", 900)
    if start is None:
        proc.finish(30)
        raise Failure(f"translate never started training; see {proc.log_path}:\n{tail(proc.log_path)}")
    while proc.running() and time.monotonic() < start + minutes * 60 + 900:
        time.sleep(1.0)
    if proc.running():
        proc.interrupt()
    code = proc.finish(300)
    last = run_dir / "last.pt"
    if not last.exists():
        raise Failure(f"translate left no last.pt (exit {code}); see {proc.log_path}:\n{tail(proc.log_path)}")
    progress = json.loads(subprocess.run(
        [sys.executable, "-c", TRANSLATE_PROGRESS, str(last)],
        check=True, capture_output=True, text=True, env=environment(), cwd=REPO).stdout)
    text = proc.text()
    pairs = re.search(r"([\d,]+) training pairs, ([\d,]+) batches an epoch", text)
    params = re.search(r"([\d,]+) parameters", text)
    logged = [float(x.replace(",", "")) for x in re.findall(r"\| ([\d,]+) tok/s", text)]
    result = {
        "steps": progress["step"], "target_tokens": progress["tokens"], "train_seconds": round(progress["elapsed"], 1),
        "tok_per_s": progress["tokens"] / progress["elapsed"], "logged_tok_per_s_median": median(logged),
        "checkpoint": rel(last), "checkpoint_step": progress["step"],
        "parameters": int(params.group(1).replace(",", "")) if params else None,
        "peak_rss_train_mb": proc.peak_rss_mb(), "exit_code": code, "settings": settings,
    }
    if pairs:
        n, batches = (int(g.replace(",", "")) for g in pairs.groups())
        result["sentences_per_batch"] = round(n / batches, 1)
    return result


def translate_decode(train: dict, beam: int, src: Path, out: Path, precision: str = "auto") -> dict:
    hyp = out / f"hyp.b{beam}.txt"
    cmd = [sys.executable, str(HERE / "translate_decode.py"), train["checkpoint"], "-i", rel(src), "-o", rel(hyp),
           "--beam", str(beam), "--batch", str(BATCH), "--alpha", str(ALPHA), "--precision", precision]
    proc = Timed(cmd, out / f"decode.b{beam}.log", environment())
    code = proc.finish(3600)
    report = next((json.loads(line) for _, line in reversed(proc.lines) if line.startswith("{")), None)
    if code != 0 or report is None or not hyp.exists():
        raise Failure(f"translate decoding failed (exit {code}); see {proc.log_path}:\n{tail(proc.log_path)}")
    return {"text": hyp, "seconds": report["seconds"],
            "timing": "translate_decode.py around Translator.translate (model loading excluded)",
            "peak_rss_mb": proc.peak_rss_mb(), "max_len_ratio": report.get("max_len_ratio"),
            "precision": report.get("precision", precision),
            "inter_threads": report.get("inter_threads"), "shortlist": report.get("shortlist")}


# --------------------------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def detokenize(pieces_file: Path, sp) -> list[str]:
    return [sp.decode_pieces(line.split()) for line in pieces_file.read_text(encoding="utf-8").splitlines()]


def score(hyps: list[str], refs: list[str]) -> dict:
    import sacrebleu

    if len(hyps) != len(refs):
        raise Failure(f"{len(hyps)} translations for {len(refs)} references")
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a")
    chrf = sacrebleu.corpus_chrf(hyps, [refs])
    return {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2)}


def fmt(value, pattern: str = "{:,.0f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def table(results: dict) -> str:
    head = ("| toolkit | params | steps | train tgt tok/s | BLEU greedy | BLEU beam 5 | greedy sent/s | beam-5 sent/s "
            "| peak RSS train | peak RSS decode |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results.values():
        if "error" in r:
            lines.append(f"| {r['toolkit']} | failed: {r['error'].splitlines()[0][:90]} |")
            continue
        t, g, b = r["train"], r["decode"].get("1", {}), r["decode"].get("5", {})
        precision = g.get("precision") or b.get("precision") or "fp32"
        name = r["toolkit"] if precision == "fp32" else f"{r['toolkit']} ({precision} decoding)"
        cells = [name, fmt(t.get("parameters"), "{:,}"), fmt(t.get("steps")), fmt(t.get("tok_per_s")),
                 fmt(g.get("bleu"), "{:.2f}"), fmt(b.get("bleu"), "{:.2f}"), fmt(g.get("sent_per_s"), "{:,.1f}"),
                 fmt(b.get("sent_per_s"), "{:,.1f}"), fmt(t.get("peak_rss_train_mb"), "{:,.0f} MB"),
                 fmt(r.get("peak_rss_decode_mb"), "{:,.0f} MB")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(results: dict, test_limit: int) -> list[str]:
    """What a reader of the table must know about this run."""
    out = [("decode sent/s: decoding wall time of the whole test set, model loading excluded (Joey: its "
            "'Generation took'; OpenNMT-py: -report_time; translate: timed around Translator.translate)"),
           ("peak RSS: /usr/bin/time -v, the largest single process (OpenNMT-py's data-loader workers "
            "are separate processes, not added)"),
           (f"batches of {BATCH} sentences for every toolkit, in length order; translate decodes {THREADS} at a "
            f"time on CPU, each in a process of one thread forked from it (its default on Linux, "
            f"`--inter-threads 0`; their peak RSS counts the pages they share with it), the peers one at a "
            f"time on all {THREADS} threads")]
    for r in results.values():
        t = r.get("train", {})
        if t.get("checkpoint_seconds_over_budget"):
            out.append(f"{r['toolkit']}: no checkpoint was saved within the budget; decoded the first one "
                       f"after it (step {t['checkpoint_step']}, {t['checkpoint_seconds_over_budget']} s late)")
        elif t.get("checkpoint_step") not in (None, t.get("steps")):
            out.append(f"{r['toolkit']}: decoded the last checkpoint within the budget, step "
                       f"{t['checkpoint_step']} of {t['steps']}")
        if t.get("sentences_per_batch"):
            out.append(f"{r['toolkit']}: {t['sentences_per_batch']} sentences a batch on average "
                       f"(train.batch_tokens={t['settings'].get('train.batch_tokens')}); output at most 2 x "
                       f"source length + 10 pieces (it has no fixed maximum of {MAX_LEN})")
    if test_limit:
        out.append(f"--test-limit {test_limit}: only the first {test_limit} test sentences")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time per toolkit (default 10)")
    parser.add_argument("--toolkits", default=",".join(TOOLKITS), help="comma-separated, from joey,onmt,translate")
    parser.add_argument("--translate-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `translate train --set` for our toolkit (repeatable; overrides the defaults)")
    parser.add_argument("--test-limit", type=int, default=0,
                        help="decode only the first N test sentences (quick checks)")
    parser.add_argument("--translate-precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                        help="how `translate` decodes on CPU (auto: as `translate decode` does by default; "
                             "`--fp32 / --bf16 / --int8`); the peers use fp32")
    parser.add_argument("--skip-train", action="store_true",
                        help="reuse each toolkit's last training (work/<toolkit>/train.json) and only decode")
    args = parser.parse_args()
    # The peers are stopped with SIGINT, which a shell leaves ignored in background jobs (nohup, &)
    # and children inherit: handle it here, so that the toolkits start with the default action.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    toolkits = [t.strip() for t in args.toolkits.split(",") if t.strip()]
    unknown = sorted(set(toolkits) - set(TOOLKITS))
    if unknown:
        parser.error(f"unknown toolkit(s) {', '.join(unknown)}; choose from {', '.join(TOOLKITS)}")
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if not Path(TIME).exists():
        sys.exit(f"{TIME} is missing (peak RSS): apt-get install -y time, or run bench/peers/install.sh")

    subprocess.run([sys.executable, str(HERE / "prepare.py"), "--out", str(WORK)], check=True)
    stats = json.loads((WORK / "stats.json").read_text())
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(WORK / "spm.model"))
    src_pieces, src_raw, ref_raw = WORK / "test.es", WORK / "test.raw.es", WORK / "test.raw.en"
    if args.test_limit:
        for name in ("test.es", "test.raw.es", "test.raw.en"):
            lines = (WORK / name).read_text(encoding="utf-8").splitlines()[: args.test_limit]
            (WORK / f"limit.{name}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        src_pieces, src_raw, ref_raw = WORK / "limit.test.es", WORK / "limit.test.raw.es", WORK / "limit.test.raw.en"
    refs = ref_raw.read_text(encoding="utf-8").splitlines()

    results_path = WORK / "results.json"
    results: dict = {}
    for toolkit in toolkits:
        out = WORK / toolkit
        record: dict = {"toolkit": NAMES[toolkit], "decode": {}}
        results[toolkit] = record
        try:
            if args.skip_train:
                record["train"] = json.loads((out / "train.json").read_text())
                log(f"{toolkit}: reusing the training in {out / 'train.json'}")
            else:
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir(parents=True)
                log(f"{toolkit}: training for {args.minutes:g} min (log {rel(out / 'train.log')})")
                if toolkit == "joey":
                    record["train"] = joey_train(args.minutes, out)
                elif toolkit == "onmt":
                    record["train"] = onmt_train(args.minutes, out)
                else:
                    record["train"] = translate_train(args.minutes, out, args.translate_set,
                                                      stats["translate_batch_tokens"])
                record["train"]["minutes"] = args.minutes
                (out / "train.json").write_text(json.dumps(record["train"], indent=1) + "\n")
            t = record["train"]
            log(f"{toolkit}: {t['steps']:,} steps, {t['tok_per_s']:,.0f} target tok/s, "
                f"peak RSS {fmt(t['peak_rss_train_mb'], '{:,.0f} MB')}; decoding {rel(REPO / t['checkpoint'])}")
            for beam in BEAMS:
                if toolkit == "joey":
                    d = joey_decode(t, beam, src_pieces, out)
                elif toolkit == "onmt":
                    d = onmt_decode(t, beam, src_pieces, out)
                else:
                    d = translate_decode(t, beam, src_raw, out, args.translate_precision)
                if "pieces" in d:
                    hyps = detokenize(d.pop("pieces"), sp)
                    d["text"] = out / f"hyp.b{beam}.txt"
                    d["text"].write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
                else:
                    hyps = d["text"].read_text(encoding="utf-8").splitlines()
                d.update(score(hyps, refs))
                d["text"] = rel(d["text"])
                d["sentences"] = len(refs)
                d["sent_per_s"] = len(refs) / d["seconds"] if d["seconds"] > 0 else None
                record["decode"][str(beam)] = d
                log(f"{toolkit}: beam {beam}: BLEU {d['bleu']:.2f} chrF {d['chrf']:.2f}, "
                    f"{fmt(d['sent_per_s'], '{:,.1f}')} sent/s, peak RSS {fmt(d['peak_rss_mb'], '{:,.0f} MB')}")
            rss = [d["peak_rss_mb"] for d in record["decode"].values() if d.get("peak_rss_mb")]
            record["peak_rss_decode_mb"] = max(rss) if rss else None
        except (Failure, subprocess.CalledProcessError, OSError, KeyError, ValueError) as exc:
            record["error"] = str(exc)
            log(f"{toolkit}: FAILED: {exc}")
        results_path.write_text(json.dumps({"minutes": args.minutes, "test_sentences": len(refs),
                                            "threads": THREADS, "batch": BATCH, "results": results},
                                           indent=1, default=str) + "\n")

    print()
    print(f"{args.minutes:g} min of training each, {THREADS} threads; test {len(refs):,} sentences, "
          f"batch {BATCH}; BLEU sacrebleu 13a on detokenized text")
    print(table(results))
    for note in notes(results, args.test_limit):
        print(f"- {note}")
    print(f"\n(details, chrF and logs: {rel(results_path)}, {rel(WORK)}/<toolkit>/)")
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
