"""The training loop: scheduled teacher forcing, Adam with an LR schedule, clipping, label
smoothing, validation by dev BLEU, best/last checkpoints, early stopping and exact resume.

``build.build_trainer`` makes everything ready (``build.train`` builds, runs and cleans up);
``Trainer.run`` reads top to bottom: each
optimiser step sets the teacher-forcing ratio, trains on its batches, reports, validates every
``eval_every`` steps, and checks the run's limits.

Scheduled teacher forcing (Bengio et al., 2015) mixes the model's own predictions into the
decoder's inputs: ``schedules`` gives the ratio of each step, ``feeding`` decides where and what.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointSaver, Progress, training_payload
from .config import Config, TrainConfig
from .data import Batch, StreamingData, TrainingData, padding_fraction
from .distributed import World, broadcast, gather, reduce_step
from .errors import DataError, TrainingError
from .evaluate import evaluate
from .feeding import scheduled_logits
from .model import Seq2Seq
from .rundir import MetricsLog, ProgressLine, TrainLog
from .runtime import autocast_for, rng_state
from .schedules import LRSchedule, teacher_forcing_ratio
from .shortlist import Lexicon
from .tokenizer import PAD, Tokenizer
from .translator import DecodeOptions, Translator

MAX_NONFINITE = 5  # consecutive non-finite steps before the run stops


# ---------------------------------------------------------------- the forward pass and the loss

class ScheduledForward(nn.Module):
    """The training forward pass as a module of its own, so DistributedDataParallel can wrap it
    (DDP synchronises gradients for what runs through a wrapped module's ``forward``)."""

    def __init__(self, model: Seq2Seq, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: Batch, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        return scheduled_logits(self.model, batch, ratio, self.cfg)


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over real target tokens. logits: (batch, len, vocab); target: (batch, len)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), target.reshape(-1), ignore_index=PAD,
                           label_smoothing=label_smoothing, reduction="sum")


def is_oom(exc: BaseException) -> bool:
    """True for an allocation failure, however torch reports it (CUDA or CPU allocator)."""
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text


# ---------------------------------------------------------------- the run

@dataclass
class Corpora:
    """The tokenizer, the training batches and the dev set of a run."""

    tokenizer: Tokenizer
    train: TrainingData | StreamingData
    dev: TrainingData  # for the dev loss
    dev_src: list[str]  # for dev BLEU, decoded as `translate eval` decodes
    dev_ref: list[str]
    lexicon: Lexicon | None = None  # for decoding shortlists (rank 0's only), saved in every checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    progress: Progress
    stop_reason: str
    dev: dict[str, Any]


class Trainer:
    """Runs the training loop of one run over parts made ready by ``build.build_trainer``. Under
    torchrun each process has one; only rank 0's has a ``saver`` and ``metrics``."""

    def __init__(self, *, config: Config, world: World, run_dir: Path, device: torch.device, corpora: Corpora,
                 model: Seq2Seq, forward: nn.Module, optimizer: torch.optim.Optimizer, lr_schedule: LRSchedule,
                 amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler, progress: Progress,
                 saver: CheckpointSaver | None, metrics: MetricsLog | None, line: ProgressLine,
                 log: Callable[[str], None], train_log: TrainLog | None = None):
        self.config, self.world, self.run_dir, self.device = config, world, run_dir, device
        self.tokenizer, self.data, self.dev_data = corpora.tokenizer, corpora.train, corpora.dev
        self.lexicon = corpora.lexicon
        self.dev_src, self.dev_ref = corpora.dev_src, corpora.dev_ref
        self.model, self.forward, self.optimizer, self.lr_schedule = model, forward, optimizer, lr_schedule
        self.amp_dtype, self.scaler, self.progress = amp_dtype, scaler, progress
        self.saver, self.metrics, self.line, self.log = saver, metrics, line, log
        self.train_log = train_log  # (rank 0) train.log, which ``log`` also writes; closed when the run ends
        self.stop_signal: str | None = None
        # this process's target positions, those fed the model's choice, those fed a token not gold
        # (feeding.scheduled_logits), summed on the device since the last report
        self.fed_counts = torch.zeros(3, dtype=torch.long, device=device)
        self.rank_rng: list[dict[str, Any]] | None = None  # every rank's RNG state, gathered for a checkpoint

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
                    logits, fed = self.forward(batch, self.progress.tf_ratio)
                loss = sequence_loss(logits, batch.tgt_out, cfg.label_smoothing)
                self.scaler.scale(loss * scale).backward()
            total += loss.detach()
            self.fed_counts += fed
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        if self.scaler.is_enabled():  # fp16: gradients that overflow at this loss scale are the scaler's
            total, bad = reduce_step(self.world, total, not bool(torch.isfinite(total)))
            if not bad and not torch.isfinite(norm):  # (the same on every rank: gradients are all-reduced)
                self.scaler.step(self.optimizer)  # skips the update, and the scale calibrates down
                self.scaler.update()
                self.progress.nonfinite_steps = 0
                return total, 0
        else:
            total, bad = reduce_step(self.world, total, not (torch.isfinite(total) and torch.isfinite(norm)))
        if bad:
            self.progress.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            self.log(f"step {self.progress.step + 1}: non-finite loss or gradient, step skipped "
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
        self.log(f"warning: step {self.progress.step + 1}: out of memory on a batch of {batch.size} sentences "
                 f"({batch.src.size(1)} x {batch.tgt_in.size(1)} tokens); skipped it "
                 f"({self.progress.skipped_batches} so far). Lower train.batch_tokens if this repeats")
        return torch.zeros((), device=self.device), 0

    # -- validation and checkpoints ---------------------------------------------------------------

    def dev_translator(self) -> Translator:
        """Dev BLEU decoded as `translate eval` decodes by default (in its precision: on a CPU, a
        ``CPU_PRECISION`` copy of this step's weights), so the two figures agree; one batch at a
        time, since two at once would add a second batch's memory to training's peak."""
        return Translator(self.model, self.tokenizer, DecodeOptions(beam=self.config.train.eval_beam, inter_threads=1),
                          precision="auto", amp=self.config.train.amp, lexicon=self.lexicon)

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Dev loss and perplexity (teacher forced, no smoothing) and dev BLEU/chrF as ``eval`` decodes."""
        self.model.eval()
        total, tokens = 0.0, 0
        for _, batch in self.dev_data.batches(0):
            batch = batch.to(self.device)
            with autocast_for(self.device, self.amp_dtype):
                logits = self.model(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in)
            total += float(sequence_loss(logits, batch.tgt_out))
            tokens += int((batch.tgt_out != PAD).sum())
        scores, hyps = evaluate(self.dev_translator(), self.dev_src, self.dev_ref)
        loss = total / max(tokens, 1)
        return {"dev_loss": round(loss, 4), "dev_ppl": round(math.exp(min(loss, 50)), 2),
                "dev_bleu": scores["bleu"], "dev_chrf": scores["chrf"], "example": hyps[0] if hyps else ""}

    def on_validation(self, record: dict[str, Any]) -> None:
        """Rank 0, after ``validate``: best score, patience, plateau LR, checkpoints, metrics, log."""
        p = self.progress
        score = {"bleu": record["dev_bleu"], "chrf": record["dev_chrf"],
                 "loss": -record["dev_loss"]}[self.config.train.eval_metric]  # higher is better
        if p.best_score is None and p.best_bleu >= 0:  # a run saved before eval_metric existed: BLEU
            p.best_score = p.best_bleu
        improved = p.best_score is None or score > p.best_score
        if improved:
            p.best_score, p.best_bleu, p.best_step, p.bad_evals = score, record["dev_bleu"], p.step, 0
        else:
            p.bad_evals += 1
        self.lr_schedule.on_validation(score)
        payload = self.payload()
        self.saver.save(payload, best=improved)
        self.saver.keep_weights(payload, p.step)
        lr = self.optimizer.param_groups[0]["lr"]
        self.write_metrics({"kind": "dev", "step": p.step, "epoch": p.epoch, "lr": lr, "tf_ratio": p.tf_ratio,
                            **{k: v for k, v in record.items() if k != "example"}, "best": improved})
        self.line.clear()
        self.log(f"step {p.step:>6} | dev loss {record['dev_loss']:.3f} ppl {record['dev_ppl']:.2f} | "
                 f"BLEU {record['dev_bleu']:.2f} chrF {record['dev_chrf']:.2f}"
                 f"{' (best)' if improved else ''} | lr {lr:.2e} | e.g. {record['example'][:60]!r}")

    def payload(self) -> dict[str, Any]:
        payload = training_payload(self.config, self.tokenizer, self.model, self.optimizer, self.lr_schedule,
                                   self.scaler, self.progress, self.device)
        if self.world.distributed and self.rank_rng is not None:
            payload["rank_rng"] = self.rank_rng  # so that each rank resumes with its own dropout masks
        if self.lexicon is not None:
            payload["lexicon"] = self.lexicon.state()
        return payload

    def _gather_rng(self) -> None:
        """Every rank, before rank 0 writes a checkpoint: all ranks' RNG states to rank 0."""
        if self.world.distributed:
            self.rank_rng = gather(self.world, rng_state(self.device))

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, p = self.config.train, self.progress
        self._announce()
        started = time.monotonic()  # the clock of this stretch; p.elapsed sums over resumes
        window = _Window(self.device)
        validated_at = p.step if p.step else -1
        reason = self._agree(self.limits_reached(started))
        with self._signals_caught():
            try:
                while reason is None:
                    for my_batches, group_tokens in self._epoch_steps():
                        # 1. train one step at this step's teacher-forcing ratio
                        p.tf_ratio = teacher_forcing_ratio(cfg, p.step)
                        loss, tokens = self.guarded_step(my_batches, group_tokens)
                        p.step += 1
                        p.tokens += tokens
                        window.add(loss, tokens)
                        # 2. report
                        if window.due(self.line.interval) or p.step % cfg.eval_every == 0:
                            self._report(window)
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
                        reason = self._agree(self.limits_reached(started))
                        if reason:
                            break
                    else:  # the epoch is over
                        p.epoch += 1
                        p.batch_in_epoch = 0
                        reason = self._agree(self.limits_reached(started))
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
        self.line.clear()
        if self.stop_signal:
            self.log(f"saved {self.run_dir / 'last.pt'}; continue with: "
                     f"translate train --run-dir {self.run_dir} --resume")
        self.log(f"done: {reason} at step {p.step}; best dev BLEU {p.best_bleu:.2f} at step {p.best_step}; "
                 f"checkpoints in {self.run_dir}")
        if self.train_log is not None:
            self.train_log.close()
        return TrainResult(self.run_dir, p, reason, {})

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

    def limits_reached(self, started: float) -> str | None:
        cfg, p = self.config.train, self.progress
        if self.stop_signal:
            return f"stopped by {self.stop_signal}"
        if cfg.max_steps and p.step >= cfg.max_steps:
            return f"reached max_steps={cfg.max_steps}"
        if cfg.max_epochs and p.epoch >= cfg.max_epochs:
            return f"reached max_epochs={cfg.max_epochs}"
        if cfg.max_minutes and p.elapsed + time.monotonic() - started >= cfg.max_minutes * 60:
            return f"reached max_minutes={cfg.max_minutes:g}"
        if cfg.patience and p.bad_evals >= cfg.patience:
            metric = {"bleu": "BLEU", "chrf": "chrF", "loss": "loss"}[cfg.eval_metric]
            return f"early stopping: no better dev {metric} in {cfg.patience} validations"
        return None

    def _announce(self) -> None:
        cfg = self.config.train
        if isinstance(self.data, StreamingData):  # a stream: no epoch to count ahead
            corpus = f"a streamed corpus, bucketed in pools of {self.data.pool:,} pairs"
        else:
            epoch_batches = self.data.epoch_batches(self.progress.epoch)
            corpus = (f"{len(self.data):,} training pairs, {len(epoch_batches):,} batches an epoch "
                      f"(padding {padding_fraction(self.data.lengths, epoch_batches):.1%})")
        precision = f" with {str(self.amp_dtype).split('.')[-1]}" if self.amp_dtype else ""
        self.log(f"{corpus}; {self.model.parameter_count():,} parameters; device {self.device}{precision}; "
                 f"run directory {self.run_dir}")
        batches = cfg.accumulate * self.world.size
        if batches > 1:
            self.log(f"{self.world.size} process(es) x accumulate {cfg.accumulate}: {batches} batches (up to "
                     f"{cfg.batch_tokens * batches:,} tokens) a step; peak lr {self.lr_schedule.peak:.2e} "
                     f"(train.lr_scaling={cfg.lr_scaling})")

    def _report(self, window: _Window) -> None:
        p = self.progress
        loss, tok_s = window.flush()
        positions, fed, wrong = (int(n) for n in self.fed_counts.tolist())
        self.fed_counts.zero_()
        fed_share, wrong_share = fed / max(positions, 1), wrong / max(positions, 1)
        lr = self.optimizer.param_groups[0]["lr"]
        self.line.show(f"step {p.step:>6} | epoch {p.epoch + 1} | loss {loss:.3f} | {tok_s:,.0f} tok/s | "
                       f"tf {p.tf_ratio:.3f} fed {fed_share:.3f} | lr {lr:.2e}")
        self.write_metrics({"kind": "train", "step": p.step, "epoch": p.epoch, "loss": round(loss, 4),
                            "tok_per_s": round(tok_s, 1), "tf_ratio": round(p.tf_ratio, 4),
                            "fed_model": round(fed_share, 4), "fed_not_gold": round(wrong_share, 4), "lr": lr})

    def _agree(self, reason: str | None) -> str | None:
        """Rank 0's stop decision and clock on every rank (the LR schedule reads the clock)."""
        if not self.world.distributed:
            return reason
        reason, self.progress.elapsed = broadcast(self.world, (reason, self.progress.elapsed))
        return reason

    def _share_lr_schedule(self) -> None:
        """After rank 0 validated (a plateau schedule may have lowered the LR), every rank takes its state."""
        if self.world.distributed:
            self.lr_schedule.load_state_dict(broadcast(self.world, self.lr_schedule.state_dict()))

    @contextlib.contextmanager
    def _signals_caught(self):
        """Ctrl-C and SIGTERM end the run after the current step, with a checkpoint."""
        def handler(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

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


class _Window:
    """Loss and tokens since the last report, kept on the device (no sync per step)."""

    def __init__(self, device: torch.device):
        self.loss, self.tokens = torch.zeros((), device=device), 0
        self.start = self.last = time.monotonic()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss += loss
        self.tokens += tokens

    def due(self, interval: float) -> bool:
        return time.monotonic() - self.last >= interval

    def flush(self) -> tuple[float, float]:
        """Mean loss per token and tokens a second since the last flush; starts a new window."""
        now = time.monotonic()
        mean = float(self.loss) / max(self.tokens, 1)
        tok_s = self.tokens / max(now - self.start, 1e-9)
        self.loss.zero_()
        self.tokens, self.start, self.last = 0, now, now
        return mean, tok_s
