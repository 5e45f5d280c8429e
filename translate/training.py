"""The training loop: scheduled teacher forcing, Adam with an LR schedule, clipping, label
smoothing, validation by dev BLEU, best/last checkpoints, early stopping and exact resume.

``build.build_trainer`` makes everything ready (``build.train`` builds, runs and cleans up);
``Trainer.run`` reads top to bottom: each optimiser step sets the teacher-forcing ratio, trains on
its batches, reports, validates every ``eval_every`` steps (``validation.Validator`` decodes and
scores the dev set), and checks the run's limits.

Scheduled teacher forcing (Bengio et al., 2015) mixes the model's own predictions into the
decoder's inputs: ``schedules`` gives the ratio of each step, ``feeding`` decides where and what.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointSaver, Progress, training_payload
from .config import Config, TrainConfig
from .data import Batch, StreamingData, TrainingData
from .distributed import World, broadcast, gather, reduce_step
from .errors import DataError, TrainingError
from .feeding import scheduled_logits
from .model import Seq2Seq
from .rundir import MetricsLog, ProgressLine, TrainLog
from .runtime import autocast_for, rng_state
from .schedules import LRSchedule, teacher_forcing_ratio
from .shortlist import Lexicon
from .tokenizer import PAD, Tokenizer
from .validation import DevScores, DevSet, Validator, metric_score, sequence_loss

logger = logging.getLogger(__name__)

MAX_NONFINITE = 5  # consecutive non-finite steps before the run stops

# ---------------------------------------------------------------- the forward pass

class ScheduledForward(nn.Module):
    """The training forward pass as a module of its own, so DistributedDataParallel can wrap it
    (DDP synchronises gradients for what runs through a wrapped module's ``forward``): the
    summed (label-smoothed) cross-entropy of the gold tokens under scheduled teacher forcing.
    ``mrt.MinimumRisk`` is the other objective's pass (``train.objective``), with the same call."""

    def __init__(self, model: Seq2Seq, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: Batch, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss summed over the batch's target tokens, and what was fed (``scheduled_logits``)."""
        logits, fed = scheduled_logits(self.model, batch, ratio, self.cfg)
        return sequence_loss(logits, batch.tgt_out, self.cfg.label_smoothing), fed


def is_oom(exc: BaseException) -> bool:
    """True for an allocation failure, however torch reports it (CUDA or CPU allocator)."""
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text


# ---------------------------------------------------------------- what a run is given

@dataclass
class Corpora:
    """The tokenizer, the training batches and the dev set of a run."""

    tokenizer: Tokenizer
    train: TrainingData | StreamingData
    dev: DevSet
    lexicon: Lexicon | None = None  # for decoding shortlists (rank 0's only), saved in every checkpoint
    extra_dev: list[DevSet] = field(default_factory=list)  # scored at every validation too (data.extra_dev)


@dataclass
class Learner:
    """The model and what updates it. Checkpoints save all of it but ``forward``, the training
    pass (wrapped in DistributedDataParallel under torchrun), and the device and type."""

    model: Seq2Seq
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: LRSchedule
    scaler: torch.amp.GradScaler  # fp16's loss scale; disabled in bf16 and fp32
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast's type; None: fp32
    origin: dict[str, Any] | None = None  # a fine-tuning run's source (train.init_from), saved in every checkpoint


@dataclass
class RunOutput:
    """Where a run's files and the messages it does not log go. Under torchrun only rank 0 writes
    files: the other ranks have no saver or metrics, and a train.log that writes nothing."""

    run_dir: Path
    line: ProgressLine
    train_log: TrainLog  # attached to the package's logger while the run lasts; closed when it ends
    saver: CheckpointSaver | None = None
    metrics: MetricsLog | None = None


# ---------------------------------------------------------------- what it reached

@dataclass(frozen=True)
class TrainResult:
    """What a run reached when ``Trainer.run`` returned: where it stands, why it stopped, its
    last validation and its checkpoints (rank 0's; the other ranks write no files)."""

    run_dir: Path
    progress: Progress  # steps, epochs, tokens, the best validation's step, BLEU and eval_metric score
    stop_reason: str  # as the log says it: "reached max_steps=…", "early stopping: …", "stopped by SIGTERM"
    final_dev: DevScores | None = None  # the last validation of this stretch of the run; None if none ran
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None  # None until a validation has written one
    main: bool = True  # the result of rank 0, the process that speaks for the run

    @property
    def steps(self) -> int:
        return self.progress.step

    @property
    def epochs(self) -> int:
        """Epochs completed."""
        return self.progress.epoch

    @property
    def best_bleu(self) -> float:
        """Dev BLEU of the best validation by ``train.eval_metric`` (-1 before any validation)."""
        return self.progress.best_bleu

    @property
    def best_step(self) -> int:
        return self.progress.best_step

    @property
    def stopped_by(self) -> str | None:
        """The signal that stopped the run, to be resumed (SIGINT or SIGTERM); None otherwise."""
        prefix = "stopped by "
        return self.stop_reason.removeprefix(prefix) if self.stop_reason.startswith(prefix) else None

    def summary(self) -> str:
        """The closing line (two for a run stopped to be resumed: how to continue it)."""
        done = (f"done: {self.stop_reason} at step {self.steps}; best dev BLEU {self.best_bleu:.2f} at step "
                f"{self.best_step}; checkpoints in {self.run_dir}")
        if self.stopped_by is None:
            return done
        resume = f"translate train --run-dir {self.run_dir} --resume"
        return f"saved {self.run_dir / 'last.pt'}; continue with: {resume}\n{done}"


# ---------------------------------------------------------------- the run

class Trainer:
    """Runs the training loop of one run over parts made ready by ``build.build_trainer``. Under
    torchrun each process has one; only rank 0's has a ``validator`` and writes files."""

    def __init__(self, config: Config, world: World, corpora: Corpora, learner: Learner, progress: Progress,
                 output: RunOutput, validator: Validator | None = None):
        self.config, self.world, self.progress, self.validator = config, world, progress, validator
        self.tokenizer, self.data, self.lexicon = corpora.tokenizer, corpora.train, corpora.lexicon
        self.model, self.forward, self.optimizer = learner.model, learner.forward, learner.optimizer
        self.lr_schedule, self.scaler = learner.lr_schedule, learner.scaler
        self.device, self.amp_dtype, self.origin = learner.device, learner.amp_dtype, learner.origin
        self.run_dir, self.line = output.run_dir, output.line
        self.saver, self.metrics, self.train_log = output.saver, output.metrics, output.train_log
        self.speed = Speedometer(self.device)
        self.stop_signal: str | None = None
        self.rank_rng: list[dict[str, Any]] | None = None  # every rank's RNG state, gathered for a checkpoint
        self.final_dev: DevScores | None = None

    # -- one optimiser step ---------------------------------------------------------------------

    def train_step(self, batches: Batch | Sequence[Batch], group_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """One optimiser step over ``batches`` (this process's share of the step; their gradients
        add up). ``group_tokens``: target tokens in the whole step over all processes, so the loss
        is a mean per target token of everything the step saw. Returns the summed loss of the
        step over all processes and the tokens it trained on (0 when skipped)."""
        cfg = self.config.train
        batches = [batches] if isinstance(batches, Batch) else list(batches)
        self.model.train()
        if group_tokens is None:  # counted on the host copies: no device sync
            group_tokens = sum(int((b.tgt_out != PAD).sum()) for b in batches)
        scale = self.world.size / max(group_tokens, 1)  # DDP averages over processes; undo it
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            accumulating = self.world.distributed and i < len(batches) - 1
            with self.forward.no_sync() if accumulating else contextlib.nullcontext():  # sync once, at the end
                with autocast_for(self.device, self.amp_dtype):
                    loss, fed = self.forward(batch, self.progress.tf_ratio)
                self.scaler.scale(loss * scale).backward()
            total += loss.detach()
            self.speed.fed += fed
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        total, verdict = judge_step(self.world, self.scaler, total, norm)
        if verdict == "calibrate":  # the scaler skips the update and halves its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return total, 0
        if verdict == "skip":
            self.progress.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            self.line.clear()
            logger.warning(f"step {self.progress.step + 1}: non-finite loss or gradient, step skipped "
                           f"({self.progress.nonfinite_steps} in a row)")
            if self.progress.nonfinite_steps >= MAX_NONFINITE:
                raise TrainingError(f"{MAX_NONFINITE} non-finite steps in a row; lower train.lr or raise "
                                    f"train.clip_norm. The last good checkpoint is {self.run_dir / 'last.pt'}")
            return total, 0
        self.progress.nonfinite_steps = 0
        self.lr_schedule.apply(self.optimizer, self.progress.step, self.progress.elapsed)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, group_tokens

    def guarded_step(self, batches: Sequence[Batch], group_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """``train_step``, but a step that runs out of memory (GPU or CPU) is skipped with a
        warning instead of ending a long run (in a single process: under torchrun the other ranks
        would wait for this one forever, so the run stops with advice instead)."""
        try:
            return self.train_step(batches, group_tokens)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) and not is_oom(exc):
                raise
        batch = max(batches, key=lambda b: b.src.numel() + b.tgt_in.numel())
        if self.world.distributed:
            raise TrainingError(f"rank {self.world.rank} ran out of memory on a batch of {batch.size} sentences; "
                                f"lower train.batch_tokens (raise train.accumulate to keep the step's size) and "
                                f"resume with --resume")
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.progress.skipped_batches += 1
        self.line.clear()
        logger.warning(f"step {self.progress.step + 1}: out of memory on a batch of {batch.size} sentences "
                       f"({batch.src.size(1)} x {batch.tgt_in.size(1)} tokens); skipped it "
                       f"({self.progress.skipped_batches} so far). Lower train.batch_tokens if this repeats")
        return torch.zeros((), device=self.device), 0

    # -- validation and checkpoints ---------------------------------------------------------------

    def validate(self) -> DevScores:
        """Rank 0: the dev figures of this step's weights."""
        return self.validator.validate()

    def on_validation(self, scores: DevScores) -> None:
        """Rank 0, after ``validate``: best score, patience, plateau LR, checkpoints, metrics, log."""
        p = self.progress
        score = metric_score(scores, self.config.train.eval_metric)
        improved = p.best_score is None or score > p.best_score
        if improved:
            p.best_score, p.best_bleu, p.best_step, p.bad_evals = score, scores["dev_bleu"], p.step, 0
        else:
            p.bad_evals += 1
        self.final_dev = scores
        self.lr_schedule.on_validation(score)
        payload = self.payload()
        self.saver.save(payload, best=improved)
        self.saver.keep_weights(payload, p.step)
        lr = self.optimizer.param_groups[0]["lr"]
        extra = scores.get("extra", {})
        self.write_metrics({"kind": "dev", "step": p.step, "epoch": p.epoch, "lr": lr, "tf_ratio": p.tf_ratio,
                            **{k: v for k, v in scores.items() if k not in ("example", "extra")}, **extra,
                            "best": improved})
        self.line.clear()
        logger.info(f"step {p.step:>6} | dev loss {scores['dev_loss']:.3f} ppl {scores['dev_ppl']:.2f} | "
                    f"BLEU {scores['dev_bleu']:.2f} chrF {scores['dev_chrf']:.2f}"
                    f"{' (best)' if improved else ''} | lr {lr:.2e} | e.g. {scores['example'][:60]!r}")
        for name in dict.fromkeys(key.rpartition("/")[0] for key in extra):
            logger.info(f"step {p.step:>6} | {name}: loss {extra[f'{name}/loss']:.3f} | "
                        f"BLEU {extra[f'{name}/bleu']:.2f} chrF {extra[f'{name}/chrf']:.2f}")

    def payload(self) -> dict[str, Any]:
        return training_payload(self.config, self.tokenizer, self.model, self.optimizer, self.lr_schedule,
                                self.scaler, self.progress, self.device, self.rank_rng, self.lexicon, self.origin,
                                self.amp_dtype)

    def _gather_rng(self) -> None:
        """Every rank, before rank 0 writes a checkpoint: all ranks' RNG states to rank 0."""
        if self.world.distributed:
            self.rank_rng = gather(self.world, rng_state(self.device))

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json_safe(record))

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, p = self.config.train, self.progress
        started = time.monotonic()  # the clock of this stretch; p.elapsed sums over resumes
        self.speed.restart()
        validated_at = p.step if p.step else -1
        reason = self._stop_reason(started)
        with signals_caught(self._on_signal):
            try:
                while reason is None:
                    for my_batches, group_tokens in self._epoch_steps():
                        # 1. train one step at this step's teacher-forcing ratio
                        p.tf_ratio = teacher_forcing_ratio(cfg, p.step, p.elapsed)
                        loss, tokens = self.guarded_step(my_batches, group_tokens)
                        p.step += 1
                        p.tokens += tokens
                        if tokens:  # a skipped step's loss (NaN, perhaps) stays out of the progress window
                            self.speed.add(loss, tokens)
                        # 2. report
                        if self.speed.due(self.line.interval) or p.step % cfg.eval_every == 0:
                            self._report()
                        # 3. validate (rank 0), then every rank takes the plateau schedule's LR
                        if p.step % cfg.eval_every == 0:
                            self._gather_rng()
                            if self.world.main:
                                self.on_validation(self.validate())
                            self._share_lr_schedule()
                            validated_at = p.step
                        # 4. the clock and the limits
                        p.elapsed += time.monotonic() - started
                        started = time.monotonic()
                        reason = self._stop_reason(started)
                        if reason:
                            break
                    else:  # the epoch is over
                        p.epoch += 1
                        p.batch_in_epoch = 0
                        reason = self._stop_reason(started)
                # a run that ends gets a last validation; one that is stopped to be resumed does not,
                # since it would count towards patience and the plateau schedule where an
                # uninterrupted run validates no extra time
                stopped = reason.startswith("stopped by")
                self._gather_rng()
                if validated_at != p.step and self.world.main and not stopped:
                    self.on_validation(self.validate())
                elif self.saver is not None:
                    self.saver.save(self.payload())
            finally:
                if self.metrics is not None:
                    self.metrics.close()
        return self._finish(reason)

    def _finish(self, reason: str) -> TrainResult:
        """What the run reached, written last in train.log (which closes)."""
        saver = self.saver
        result = TrainResult(self.run_dir, replace(self.progress), reason, self.final_dev,
                             saver.last if saver else None, saver.best if saver and saver.best.is_file() else None,
                             self.world.main)
        self.line.clear()
        for line in result.summary().splitlines():  # the command prints them: its result
            self.train_log.write(line)
        self.train_log.close()
        return result

    def _epoch_steps(self) -> Iterator[tuple[list[Batch], int]]:
        """The rest of the current epoch, a step at a time: this process's batches and the target
        tokens of the whole step. A step takes ``accumulate`` batches for each process, in rank
        order, so any world size trains on the same sequence; ``batch_in_epoch`` follows."""
        cfg, p = self.config.train, self.progress
        group = cfg.accumulate * self.world.size
        mine = slice(self.world.rank * cfg.accumulate, (self.world.rank + 1) * cfg.accumulate)
        from_start, stepped = p.batch_in_epoch == 0, False
        for position, my_batches, group_tokens in self.data.steps(p.epoch, p.batch_in_epoch, group, mine):
            stepped = True
            p.batch_in_epoch = position
            yield my_batches, group_tokens
        if from_start and not stepped:
            raise DataError(f"{self.config.data.train}: not one optimiser step fits in an epoch "
                            f"({group} batch(es) a step); use a larger corpus or lower "
                            f"train.accumulate or the number of processes")

    def _stop_reason(self, started: float) -> str | None:
        """Why the run stops now (a signal, a limit), or None; rank 0's decision and clock on every
        rank (the LR schedule reads the clock)."""
        elapsed = self.progress.elapsed + time.monotonic() - started
        reason = f"stopped by {self.stop_signal}" if self.stop_signal else limit_reached(self.config.train,
                                                                                          self.progress, elapsed)
        if not self.world.distributed:
            return reason
        reason, self.progress.elapsed = broadcast(self.world, (reason, self.progress.elapsed))
        return reason

    def _report(self) -> None:
        p, lr = self.progress, self.optimizer.param_groups[0]["lr"]
        loss, tok_s, fed, wrong = self.speed.flush()
        self.line.show(f"step {p.step:>6} | epoch {p.epoch + 1} | loss {loss:.3f} | {tok_s:,.0f} tok/s | "
                       f"tf {p.tf_ratio:.3f} fed {fed:.3f} | lr {lr:.2e}")
        self.write_metrics({"kind": "train", "step": p.step, "epoch": p.epoch, "loss": round(loss, 4),
                            "tok_per_s": round(tok_s, 1), "tf_ratio": round(p.tf_ratio, 4),
                            "fed_model": round(fed, 4), "fed_not_gold": round(wrong, 4), "lr": lr})

    def _share_lr_schedule(self) -> None:
        """After rank 0 validated (a plateau schedule may have lowered the LR), every rank takes its state."""
        if self.world.distributed:
            self.lr_schedule.load_state_dict(broadcast(self.world, self.lr_schedule.state_dict()))

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signal.Signals(signum).name


def judge_step(world: World, scaler: torch.amp.GradScaler, total: torch.Tensor,
               norm: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A step's loss summed over the ranks, and what becomes of the step, the same on every rank
    (gradients are all-reduced): ``take`` it; ``calibrate`` (fp16: gradients that overflow at a
    loss scale above 1 are the scaler's to calibrate, which neither counts nor resets the run's
    non-finite steps); or ``skip`` it as non-finite: a non-finite loss or gradient, and under fp16
    gradients that overflow at a scale of 1 or less, which overflow unscaled (else a run whose
    gradients stay NaN would calibrate, skipping steps, until its limit)."""
    if not scaler.is_enabled():
        total, bad = reduce_step(world, total, not (torch.isfinite(total) and torch.isfinite(norm)))
        return total, "skip" if bad else "take"
    total, bad = reduce_step(world, total, not bool(torch.isfinite(total)))
    if bad:
        return total, "skip"
    if not torch.isfinite(norm):
        return total, "calibrate" if scaler.get_scale() > 1 else "skip"
    return total, "take"


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record with null for each value that is not a finite number (a window of skipped
    steps, a dev loss that overflowed): JSON has no NaN or Infinity."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in record.items()}


def limit_reached(cfg: TrainConfig, p: Progress, elapsed: float) -> str | None:
    """The limit of ``cfg`` a run at ``p`` after ``elapsed`` seconds of training has reached, or None."""
    if cfg.max_steps and p.step >= cfg.max_steps:
        return f"reached max_steps={cfg.max_steps}"
    if cfg.max_epochs and p.epoch >= cfg.max_epochs:
        return f"reached max_epochs={cfg.max_epochs}"
    if cfg.max_minutes and elapsed >= cfg.max_minutes * 60:
        return f"reached max_minutes={cfg.max_minutes:g}"
    if cfg.patience and p.bad_evals >= cfg.patience:
        metric = {"bleu": "BLEU", "chrf": "chrF", "loss": "loss"}[cfg.eval_metric]
        return f"early stopping: no better dev {metric} in {cfg.patience} validations"
    return None


@contextlib.contextmanager
def signals_caught(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Ctrl-C and SIGTERM call ``handler`` (which lets the run end after the current step, with a
    checkpoint) instead of ending the process; outside the main thread they are left as they are."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


class Speedometer:
    """What training did since the last report, kept on the device (no sync per step): the summed
    loss and the tokens, and the target positions, those fed the model's choice and those fed a
    token not gold (``feeding.scheduled_logits``). Sockeye's ``Speedometer`` does the same job."""

    def __init__(self, device: torch.device):
        self.loss, self.tokens = torch.zeros((), device=device), 0
        self.fed = torch.zeros(3, dtype=torch.long, device=device)  # positions, fed the model, fed not gold
        self.restart()

    def restart(self) -> None:
        """Starts the clock of the window (the loop calls it as it starts)."""
        self.start = self.last = time.monotonic()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss += loss
        self.tokens += tokens

    def due(self, interval: float) -> bool:
        return time.monotonic() - self.last >= interval

    def flush(self) -> tuple[float, float, float, float]:
        """Mean loss per token, tokens a second, and the shares of positions fed the model's choice
        and fed a token not gold since the last flush; starts a new window."""
        now = time.monotonic()
        mean = float(self.loss) / self.tokens if self.tokens else float("nan")  # (nan: no step trained)
        tok_s = self.tokens / max(now - self.start, 1e-9)
        positions, fed, wrong = (int(n) for n in self.fed.tolist())
        self.loss.zero_()
        self.fed.zero_()
        self.tokens, self.start, self.last = 0, now, now
        return mean, tok_s, fed / max(positions, 1), wrong / max(positions, 1)
