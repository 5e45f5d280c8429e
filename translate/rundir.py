"""A training run's directory and what people watch of it: opening it (new or resumed), the
resolved ``config.yaml``, the ``train.log`` of what the run said, the metrics stream
(``metrics.jsonl``, and TensorBoard event files with ``train.tensorboard``), and the progress
line. Checkpoints in it are written by ``checkpoint.CheckpointSaver``."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .config import Config
from .errors import CheckpointError, MissingExtraError
from .runtime import PACKAGE_LOGGER, LevelFormatter


def open_run_dir(run_dir: str | Path, resume: bool) -> dict[str, Any] | None:
    """Makes ``run_dir`` ready for a new run (and refuses one that holds a run), or returns the
    payload of its ``last.pt`` when resuming."""
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise CheckpointError(f"{run_dir}: nothing to resume (no last.pt); drop --resume to start "
                                  f"a new run there")
        return load_checkpoint(last)
    refuse_a_run(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"cannot write to run directory {run_dir}: {exc.strerror}; "
                              f"choose a writable --run-dir") from None
    return None


def refuse_a_run(run_dir: str | Path) -> None:
    """A new run may not start in a directory that holds one."""
    run_dir = Path(run_dir)
    if (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
        raise CheckpointError(f"{run_dir} already holds a run; continue it with --resume or choose "
                              f"another --run-dir")


def write_config(run_dir: str | Path, config: Config) -> None:
    """The run's resolved configuration as ``config.yaml``, readable and usable with ``--config``
    (every checkpoint holds it too)."""
    import yaml

    text = "# the resolved configuration of this run (translate train --config accepts it)\n"
    (Path(run_dir) / "config.yaml").write_text(text + yaml.safe_dump(config.to_dict(), sort_keys=False),
                                               encoding="utf-8")


class TrainLog(logging.Handler):
    """``train.log``: every message of the run (the package's log records at INFO and above),
    time-stamped, appended as training goes (a resumed run adds to it); progress lines drawn in
    place on a terminal at most every ``progress_every`` seconds. While attached, the package's
    logger passes INFO and above; with no ``run_dir`` (ranks other than 0, which write no files)
    nothing is written and it passes only warnings and errors, so that one process speaks for the
    run. ``close`` detaches it and gives the logger back its level."""

    def __init__(self, run_dir: str | Path | None, progress_every: float = 30.0):
        super().__init__(logging.INFO)
        self.setFormatter(LevelFormatter())
        self.file = None if run_dir is None else (Path(run_dir) / "train.log").open("a", encoding="utf-8")
        self.progress_every, self.last_progress = progress_every, -float("inf")
        logger = logging.getLogger(PACKAGE_LOGGER)
        self.level_before = logger.level
        if self.file is None:
            logger.setLevel(logging.WARNING)
        elif logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # as logging's own handlers: a failing handler never raises
            self.handleError(record)

    def write(self, line: str, progress: bool = False) -> None:
        if self.file is None:
            return
        if progress:
            if time.monotonic() - self.last_progress < self.progress_every:
                return
            self.last_progress = time.monotonic()
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.file.flush()

    def close(self) -> None:
        logger = logging.getLogger(PACKAGE_LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self.level_before)
        if self.file is not None:
            self.file.close()
        super().close()


class MetricsLog:
    """One JSON object a line in ``metrics.jsonl`` per progress report (``"kind": "train"``) and per
    validation (``"kind": "dev"``); with ``tensorboard``, the same numbers as TensorBoard scalars
    in RUN_DIR/tensorboard (``tensorboard --logdir RUN_DIR``)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False):
        run_dir = Path(run_dir)
        self.board = _summary_writer(run_dir / "tensorboard") if tensorboard else None
        self.file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key not in ("kind", "step", "epoch", "best") and isinstance(value, (int, float)):
                    self.board.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.board.flush()

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _summary_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtraError("train.tensorboard needs the tensorboard package; install it with "
                                "pip install 'translate-rnn[tensorboard]' or set train.tensorboard=false") from None
    return SummaryWriter(log_dir=str(directory))


class ProgressLine:
    """The training progress line: redrawn in place about every second on a terminal, else one
    logged line every 30 seconds. Other messages call ``clear`` first so they start on a clean line."""

    def __init__(self, log: Callable[[str], None], in_place: bool, record: TrainLog | None = None):
        self.log, self.in_place, self.record = log, in_place, record
        self.interval = 1.0 if in_place else 30.0

    def show(self, line: str) -> None:
        if self.record is not None and self.in_place:  # (a logged line reaches train.log through log)
            self.record.write(line, progress=True)
        if self.in_place:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        else:
            self.log(line)

    def clear(self) -> None:
        if self.in_place:
            sys.stderr.write("\r\033[K")
