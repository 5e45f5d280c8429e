"""Training: scheduled teacher forcing, Adam with an LR schedule, clipping, label smoothing,
validation by dev BLEU, best/last checkpoints, early stopping and exact resume.

Scheduled teacher forcing follows Bengio et al. (2015): each decoder input is the gold token
with probability ``ratio(step)`` and the model's own previous prediction otherwise, decided per
token or per sentence. ``sequential`` feeds predictions step by step as they are made;
``parallel`` is the two-pass approximation of Duckworth et al. (2019): a teacher-forced pass
without gradient predicts every position, the inputs are mixed, and a second teacher-forced
pass over the mixed inputs is trained, so the decoder RNN still runs over whole sentences.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_checkpoint, restore, save_checkpoint, step_checkpoints
from .config import Config, TrainConfig
from .corpus import StreamingData, first_sentences, load_pairs, sample_sentences, tokenize_corpus
from .data import Batch, Encoded, TrainingData, padding_fraction, read_parallel
from .distributed import barrier, broadcast, init_world, reduce_step, shutdown
from .errors import CheckpointError, ConfigError, DataError, MissingExtraError, TrainingError
from .evaluate import evaluate
from .model import Seq2Seq, build_model
from .runtime import amp_dtype, autocast_for, rng_state, select_device, set_rng_state
from .tokenizer import PAD, Tokenizer

MAX_NONFINITE = 5  # consecutive non-finite steps before the run stops
RESUMABLE_KEYS = ("max_steps", "max_epochs", "max_minutes", "patience", "eval_every", "keep_checkpoints", "device",
                  "threads")


# ---------------------------------------------------------------- teacher forcing

def teacher_forcing_ratio(cfg: TrainConfig, step: int) -> float:
    """Probability of feeding the gold token at ``step`` (0-based); 1.0 during the warm-up."""
    if step < cfg.tf_warmup:
        return 1.0
    s = step - cfg.tf_warmup
    if cfg.teacher_forcing == "constant":
        ratio = cfg.tf_start
    elif cfg.teacher_forcing == "linear":
        ratio = cfg.tf_start - s / cfg.tf_k  # tf_k steps for the ratio to fall by 1.0
    elif cfg.teacher_forcing == "exponential":
        ratio = cfg.tf_k ** s
    else:  # inverse sigmoid: k / (k + exp(s / k))
        ratio = cfg.tf_k / (cfg.tf_k + math.exp(min(s / cfg.tf_k, 700.0)))
    return max(cfg.tf_floor, min(1.0, ratio))


def gold_mask(shape: tuple[int, int], ratio: float, granularity: str, device: torch.device) -> torch.Tensor:
    """(batch, tgt_len) True where the gold token is fed; position 0 (BOS) is always gold."""
    batch, length = shape
    if granularity == "sentence":
        mask = (torch.rand(batch, 1, device=device) < ratio).expand(batch, length).clone()
    else:
        mask = torch.rand(batch, length, device=device) < ratio
    mask[:, 0] = True
    return mask


def model_tokens(logits: torch.Tensor, feed: str) -> torch.Tensor:
    """The model's own choice from logits (..., vocab): argmax or a sample of its distribution."""
    if feed == "sample":
        flat = logits.float().reshape(-1, logits.size(-1)).softmax(-1)
        return torch.multinomial(flat, 1).view(logits.shape[:-1])
    return logits.argmax(-1)


def scheduled_logits(model: Seq2Seq, batch: Batch, ratio: float, cfg: TrainConfig) -> torch.Tensor:
    """Decoder logits (batch, tgt_len, vocab) under teacher forcing with gold ratio ``ratio``."""
    memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    if ratio >= 1.0:
        logits, _, _ = model.decoder(batch.tgt_in, memory, state)
        return logits
    gold = gold_mask(tuple(batch.tgt_in.shape), ratio, cfg.tf_granularity, batch.tgt_in.device)
    if cfg.scheduled_sampling == "parallel":
        with torch.no_grad():
            first, _, _ = model.decoder(batch.tgt_in, memory, state)  # (batch, tgt_len, vocab)
        predicted = model_tokens(first[:, :-1], cfg.tf_feed)  # prediction for positions 1..
        mixed = batch.tgt_in.clone()
        mixed[:, 1:] = torch.where(gold[:, 1:], batch.tgt_in[:, 1:], predicted)
        logits, _, _ = model.decoder(mixed, memory, state)
        return logits
    steps = []
    prev = batch.tgt_in[:, 0]
    for t in range(batch.tgt_in.size(1)):
        if t > 0:
            prev = torch.where(gold[:, t], batch.tgt_in[:, t], model_tokens(steps[-1].detach(), cfg.tf_feed))
        logits, state, _ = model.decode_step(prev, memory, state)
        steps.append(logits)
    return torch.stack(steps, 1)


def linear_lr(cfg: TrainConfig, progress: Progress, peak: float | None = None) -> float:
    """Decays the LR (``peak``, else ``train.lr``) linearly to ``min_lr`` over the run: over
    ``max_steps`` when set, else over ``max_minutes`` of training time, so a time-limited run ends
    with a small LR."""
    peak = cfg.lr if peak is None else peak
    if cfg.max_steps:
        done = progress.step / cfg.max_steps
    elif cfg.max_minutes:
        done = progress.elapsed / (cfg.max_minutes * 60)
    else:
        return peak
    return max(cfg.min_lr, peak * (1.0 - min(done, 1.0)))


def scaled_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """``train.lr`` for the batches one step sees (``accumulate`` x processes), by ``lr_scaling``:
    the square-root rule suits Adam (Hoffer et al., 2017); linear follows Goyal et al. (2017)."""
    n = cfg.accumulate * world_size
    return cfg.lr * {"sqrt": n ** 0.5, "linear": float(n), "none": 1.0}[cfg.lr_scaling]


class ScheduledForward(nn.Module):
    """The training forward pass as a module of its own, so DistributedDataParallel can wrap it
    (DDP synchronises gradients for what runs through a wrapped module's ``forward``)."""

    def __init__(self, model: Seq2Seq, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: Batch, ratio: float) -> torch.Tensor:
        return scheduled_logits(self.model, batch, ratio, self.cfg)


def is_oom(exc: BaseException) -> bool:
    """True for an allocation failure, however torch reports it (CUDA or CPU allocator)."""
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over real target tokens. logits: (batch, len, vocab); target: (batch, len)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), target.reshape(-1), ignore_index=PAD,
                           label_smoothing=label_smoothing, reduction="sum")


# ---------------------------------------------------------------- the run

@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on
    best_bleu: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumes
    tokens: int = 0  # target tokens trained on
    tf_ratio: float = 1.0
    nonfinite_steps: int = 0
    skipped_batches: int = 0  # batches that did not fit in memory


@dataclass
class TrainResult:
    run_dir: Path
    progress: Progress
    stop_reason: str
    dev: dict[str, Any]


def make_adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel where this torch has one for the device (CPU since torch 2.4):
    one pass over all parameters instead of a dozen elementwise ops each (measured: the optimiser
    step took a tenth of a CPU training step before)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)


class Trainer:
    """Owns one training run in ``run_dir``. ``log`` receives human-readable lines."""

    def __init__(self, config: Config, run_dir: str | Path, resume: bool = False,
                 log: Callable[[str], None] = print, progress_bar: bool | None = None):
        self.run_dir = Path(run_dir)
        # under torchrun: one process per device; rank 0 alone logs, validates and writes files
        self.world = init_world(config.train.device)
        self.log = log if self.world.main else (lambda line: None)
        self.bar = (sys.stderr.isatty() if progress_bar is None else progress_bar) and self.world.main
        self.stop_signal: str | None = None
        payload = broadcast(self.world, self._prepare_run_dir(resume) if self.world.main else None)
        if payload is not None:
            config = self._resume_config(config, Config.from_dict(payload["config"]))
        self.config = config
        cfg = config.train
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = select_device(cfg.device)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", self.world.local_rank)
        torch.manual_seed(cfg.seed + self.world.rank)  # each rank its own dropout masks
        random.seed(cfg.seed + self.world.rank)

        data = config.data
        # Arrow, memory-mapped (or a stream with data.streaming)
        train = load_pairs(data.train, data.src_lang, data.tgt_lang, "train", streaming=data.streaming)
        dev = read_parallel(data.dev, data.src_lang, data.tgt_lang, "dev")
        self.dev_src, self.dev_ref = dev.src, dev.tgt
        if payload is not None:
            _, self.tokenizer, _ = restore(payload)
        elif not self.world.main:  # rank 0 trains or loads it, then sends it to the others
            self.tokenizer = Tokenizer(*broadcast(self.world, None))
        elif config.tokenizer.model:
            self.tokenizer = Tokenizer.load(config.tokenizer.model)
        else:
            tok = config.tokenizer
            self.log(f"training a SentencePiece {tok.type} tokenizer ({'joint' if tok.joint else 'separate'} "
                     f"vocabulary of {tok.vocab_size}) on "
                     f"{'the first pairs of the stream' if data.streaming else f'{len(train):,} pairs'}")
            if data.streaming:  # the stream's first pairs
                sample_src, sample_tgt = first_sentences(train, data.src_lang, data.tgt_lang, tok.max_sentences)
            else:
                sample_src = sample_sentences(train, data.src_lang, tok.max_sentences, cfg.seed)
                sample_tgt = sample_sentences(train, data.tgt_lang, tok.max_sentences, cfg.seed + 1)
            self.tokenizer = Tokenizer.train(sample_src, sample_tgt, tok.vocab_size, tok.type, tok.joint,
                                             tok.character_coverage, tok.max_sentences, cfg.seed)
        if payload is None and self.world.main:
            broadcast(self.world, (self.tokenizer.src_proto, self.tokenizer.tgt_proto))
        if self.world.main:
            self.tokenizer.save(self.run_dir)

        if data.streaming:
            self.data = StreamingData(train, self.tokenizer, data.src_lang, data.tgt_lang, cfg.batch_tokens,
                                      cfg.seed, data.max_len)
        else:
            # tokenized once into files beside the Arrow cache (rank 0 first; the others reuse them)
            if not self.world.main:
                barrier(self.world)
            # no worker processes once a process group exists: forking a process that holds gloo/NCCL
            # threads and sockets is unsafe (a child's exit can break the group's connections)
            workers = 1 if self.world.distributed else data.num_proc
            src_ids, tgt_ids = tokenize_corpus(train, self.tokenizer, data.src_lang, data.tgt_lang, workers, self.log)
            if self.world.main:
                barrier(self.world)
            pairs = len(train)
            del train  # the Arrow table is done with: training reads the tokenized files
            self.data = TrainingData(src_ids, tgt_ids, cfg.batch_tokens, cfg.seed, data.max_len)
            if not len(self.data):
                raise DataError(f"{data.train}: no pair is at most data.max_len={data.max_len} pieces long; "
                                f"raise data.max_len")
            if self.data.dropped:
                self.log(f"dropped {self.data.dropped:,} of {pairs:,} training pairs longer than "
                         f"{data.max_len} pieces")
        dev_tgt = Encoded(self.tokenizer.encode_tgt(dev.tgt))
        self.dev_data = TrainingData(Encoded(self.tokenizer.encode_src(dev.src)), dev_tgt, cfg.batch_tokens, cfg.seed)

        self.model = build_model(config.model, self.tokenizer.src_vocab_size, self.tokenizer.tgt_vocab_size)
        self.model.to(self.device)
        self.peak_lr = scaled_lr(cfg, self.world.size)
        self.optimizer = make_adam(self.model, self.peak_lr)
        self.scheduler = self._make_scheduler()
        self.amp_dtype = amp_dtype(self.device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.progress = Progress()
        if payload is not None:
            self._load_state(payload)
        self.forward: nn.Module = ScheduledForward(self.model, cfg)
        if self.world.distributed:  # wrapping broadcasts rank 0's parameters to every rank
            self.forward = DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.metrics = (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") if self.world.main else None
        self.tensorboard = self._tensorboard() if cfg.tensorboard and self.world.main else None

    # -- set-up -------------------------------------------------------------------------------

    def _prepare_run_dir(self, resume: bool) -> dict[str, Any] | None:
        last = self.run_dir / "last.pt"
        if resume:
            if not last.is_file():
                raise CheckpointError(f"{self.run_dir}: nothing to resume (no last.pt); drop --resume to start "
                                      f"a new run there")
            return load_checkpoint(last)
        if last.exists() or (self.run_dir / "best.pt").exists():
            raise CheckpointError(f"{self.run_dir} already holds a run; continue it with --resume or choose "
                                  f"another --run-dir")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(f"cannot write to run directory {self.run_dir}: {exc.strerror}; "
                                  f"choose a writable --run-dir") from None
        return None

    def _resume_config(self, given: Config, saved: Config) -> Config:
        """On resume the saved config wins; only the run's limits (and where it runs) may change.
        Any other key the user set to a value unlike the saved one is an error, not ignored."""
        defaults, given_raw, saved_raw = Config().to_dict(), given.to_dict(), saved.to_dict()
        changed = {}
        for section, values in given_raw.items():
            for key, value in values.items():
                if value == defaults[section][key] or value == saved_raw[section][key]:
                    continue
                if section == "train" and key in RESUMABLE_KEYS:
                    changed[f"train.{key}"] = value
                else:
                    raise ConfigError(f"{section}.{key}={value!r} differs from the run's saved value "
                                      f"{saved_raw[section][key]!r}; a resumed run keeps its config except "
                                      f"{', '.join('train.' + k for k in RESUMABLE_KEYS)}. Start a new --run-dir "
                                      f"to change it")
        return saved.override(changed)

    def _make_scheduler(self):
        cfg = self.config.train
        if cfg.lr_schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max", factor=cfg.lr_decay, patience=cfg.lr_patience, min_lr=cfg.min_lr)
        if cfg.lr_schedule in ("linear", "constant"):  # linear: set every step by ``linear_lr``
            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        if cfg.lr_schedule == "warmup-decay":  # linear warm-up, then inverse square root (Vaswani et al., 2017)
            warmup = max(1, cfg.lr_warmup)
            return torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: min((s + 1) / warmup, math.sqrt(warmup / (s + 1))))
        raise ConfigError(f"unknown train.lr_schedule {cfg.lr_schedule!r}")

    def _load_state(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if "scaler" in payload:
            self.scaler.load_state_dict(payload["scaler"])
        self.progress = Progress(**payload["progress"])
        set_rng_state(payload["rng"], self.device)
        if self.world.rank:  # the saved state is rank 0's; the others draw their own masks
            torch.manual_seed(self.config.train.seed + self.world.rank + 7919 * self.progress.step)
        self.log(f"resumed {self.run_dir} at step {self.progress.step} (epoch {self.progress.epoch + 1}, "
                 f"best dev BLEU {max(self.progress.best_bleu, 0):.2f})")

    # -- checkpoints --------------------------------------------------------------------------

    def payload(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "tokenizer": {"src": self.tokenizer.src_proto, "tgt": self.tokenizer.tgt_proto},
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "rng": rng_state(self.device),
        }

    def save(self, name: str) -> None:
        if self.world.main:
            save_checkpoint(self.run_dir / name, self.payload())

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("kind", "step", "epoch", "best") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.tensorboard.flush()

    def _tensorboard(self):
        """A TensorBoard writer into RUN_DIR/tensorboard (``tensorboard --logdir RUN_DIR``)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingExtraError("train.tensorboard needs the tensorboard package; install it with "
                              "pip install 'translate[tensorboard]' or set train.tensorboard=false") from None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    # -- the loop -----------------------------------------------------------------------------

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
                    logits = self.forward(batch, self.progress.tf_ratio)
                loss = sequence_loss(logits, batch.tgt_out, cfg.label_smoothing)
                self.scaler.scale(loss * scale).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
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
        if cfg.lr_schedule == "linear":
            for group in self.optimizer.param_groups:
                group["lr"] = linear_lr(cfg, self.progress, self.peak_lr)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if cfg.lr_schedule == "warmup-decay":
            self.scheduler.step()
        return total, group_tokens

    def guarded_step(self, batches: Batch | Sequence[Batch], group_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """``train_step``, but a step that runs out of memory (GPU or CPU) is skipped with a
        warning instead of ending a long run (in a single process: under torchrun the other ranks
        would wait for this one forever, so the run stops with advice instead)."""
        batches = [batches] if isinstance(batches, Batch) else list(batches)
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
        self._clear_bar()
        self.log(f"warning: step {self.progress.step + 1}: out of memory on a batch of {batch.size} sentences "
                 f"({batch.src.size(1)} x {batch.tgt_in.size(1)} tokens); skipped it "
                 f"({self.progress.skipped_batches} so far). Lower train.batch_tokens if this repeats")
        return torch.zeros((), device=self.device), 0

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
        # decoded as `translate eval` decodes, so the two BLEU figures agree; one batch at a time,
        # since two at once would add their memory to training's peak (+250 MB with the bench/peers settings)
        scores, hyps = evaluate(self.model, self.tokenizer, self.dev_src, self.dev_ref,
                                beam=self.config.train.eval_beam, amp=self.config.train.amp, inter_threads=1)
        loss = total / max(tokens, 1)
        return {"dev_loss": round(loss, 4), "dev_ppl": round(math.exp(min(loss, 50)), 2),
                "dev_bleu": scores["bleu"], "dev_chrf": scores["chrf"], "example": hyps[0] if hyps else ""}

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
            return f"early stopping: no better dev BLEU in {cfg.patience} validations"
        return None

    def on_validation(self, record: dict[str, Any]) -> None:
        p, cfg = self.progress, self.config.train
        improved = record["dev_bleu"] > p.best_bleu
        if improved:
            p.best_bleu, p.best_step, p.bad_evals = record["dev_bleu"], p.step, 0
        else:
            p.bad_evals += 1
        if cfg.lr_schedule == "plateau":
            self.scheduler.step(record["dev_bleu"])
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        if cfg.keep_checkpoints > 0 and self.world.main:
            self._keep_step_checkpoint(cfg.keep_checkpoints)
        lr = self.optimizer.param_groups[0]["lr"]
        self.write_metrics({"kind": "dev", "step": p.step, "epoch": p.epoch, "lr": lr, "tf_ratio": p.tf_ratio,
                            **{k: v for k, v in record.items() if k != "example"}, "best": improved})
        self._clear_bar()
        self.log(f"step {p.step:>6} | dev loss {record['dev_loss']:.3f} ppl {record['dev_ppl']:.2f} | "
                 f"BLEU {record['dev_bleu']:.2f} chrF {record['dev_chrf']:.2f}"
                 f"{' (best)' if improved else ''} | lr {lr:.2e} | e.g. {record['example'][:60]!r}")

    def _keep_step_checkpoint(self, keep: int) -> None:
        """Weights (no optimiser state) of this validation as step-N.pt; the oldest beyond ``keep`` go."""
        payload = self.payload()
        for key in ("optimizer", "scheduler", "scaler", "rng"):
            payload.pop(key)
        save_checkpoint(self.run_dir / f"step-{self.progress.step}.pt", payload)
        for old in step_checkpoints(self.run_dir)[:-keep]:
            old.unlink(missing_ok=True)

    def _clear_bar(self) -> None:
        if self.bar:
            sys.stderr.write("\r\033[K")

    def _show(self, loss: float, tok_s: float) -> None:
        p = self.progress
        line = (f"step {p.step:>6} | epoch {p.epoch + 1} | loss {loss:.3f} | {tok_s:,.0f} tok/s | "
                f"tf {p.tf_ratio:.3f} | lr {self.optimizer.param_groups[0]['lr']:.2e}")
        if self.bar:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        else:
            self.log(line)

    def run(self) -> TrainResult:
        cfg, p = self.config.train, self.progress
        n_params = self.model.parameter_count()
        if isinstance(self.data, StreamingData):
            corpus = f"a streamed corpus, bucketed in pools of {self.data.pool:,} pairs"
        else:
            epoch_batches = self.data.epoch_batches(p.epoch)
            corpus = (f"{len(self.data):,} training pairs, {len(epoch_batches):,} batches an epoch "
                      f"(padding {padding_fraction(self.data.lengths, epoch_batches):.1%})")
        self.log(f"{corpus}; {n_params:,} parameters; "
                 f"device {self.device}{' with ' + str(self.amp_dtype).split('.')[-1] if self.amp_dtype else ''}; "
                 f"run directory {self.run_dir}")
        if cfg.accumulate * self.world.size > 1:
            self.log(f"{self.world.size} process(es) x accumulate {cfg.accumulate}: "
                     f"{cfg.accumulate * self.world.size} batches (up to {cfg.batch_tokens * cfg.accumulate * self.world.size:,} "
                     f"tokens) a step; peak lr {self.peak_lr:.2e} (train.lr_scaling={cfg.lr_scaling})")
        started = time.monotonic()
        window_loss, window_tokens, window_start = torch.zeros((), device=self.device), 0, time.monotonic()
        last_show = time.monotonic()
        validated_at = p.step if p.step else -1
        reason = self._agree(self.limits_reached(started))
        old_handlers = self._catch_signals()
        try:
            while reason is None:
                # a step takes `group` consecutive batches: `accumulate` for each process, in rank
                # order, so any world size trains on the same sequence
                group = cfg.accumulate * self.world.size
                mine = slice(self.world.rank * cfg.accumulate, (self.world.rank + 1) * cfg.accumulate)
                from_start, stepped = p.batch_in_epoch == 0, False
                for position, my_batches, group_tokens in self.data.steps(p.epoch, p.batch_in_epoch, group, mine):
                    stepped = True
                    p.tf_ratio = teacher_forcing_ratio(cfg, p.step)
                    loss, tokens = self.guarded_step(my_batches, group_tokens)
                    p.step += 1
                    p.batch_in_epoch = position
                    p.tokens += tokens
                    window_loss += loss
                    window_tokens += tokens
                    now = time.monotonic()
                    if now - last_show >= (1.0 if self.bar else 30.0) or p.step % cfg.eval_every == 0:
                        seconds = now - window_start
                        mean = float(window_loss) / max(window_tokens, 1)
                        tok_s = window_tokens / max(seconds, 1e-9)
                        self._show(mean, tok_s)
                        self.write_metrics({"kind": "train", "step": p.step, "epoch": p.epoch, "loss": round(mean, 4),
                                            "tok_per_s": round(tok_s, 1), "tf_ratio": round(p.tf_ratio, 4),
                                            "lr": self.optimizer.param_groups[0]["lr"]})
                        window_loss.zero_()
                        window_tokens, window_start, last_show = 0, now, now
                    if p.step % cfg.eval_every == 0:
                        if self.world.main:
                            self.on_validation(self.validate())
                        self._share_lr()
                        validated_at = p.step
                    p.elapsed += time.monotonic() - started
                    started = time.monotonic()
                    reason = self._agree(self.limits_reached(started))
                    if reason:
                        break
                else:
                    if from_start and not stepped:
                        raise DataError(f"{self.config.data.train}: not one optimiser step fits in an epoch "
                                        f"({group} batch(es) a step); use a larger corpus or lower "
                                        f"train.accumulate or the number of processes")
                    p.epoch += 1
                    p.batch_in_epoch = 0
                    reason = self._agree(self.limits_reached(started))
            if validated_at != p.step and self.world.main:
                self.on_validation(self.validate())
            else:
                self.save("last.pt")  # on rank 0
        finally:
            self._restore_signals(old_handlers)
            if self.metrics is not None:
                self.metrics.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        self._clear_bar()
        if self.stop_signal:
            self.log(f"saved {self.run_dir / 'last.pt'}; continue with: translate train --run-dir {self.run_dir} --resume")
        self.log(f"done: {reason} at step {p.step}; best dev BLEU {p.best_bleu:.2f} at step {p.best_step}; "
                 f"checkpoints in {self.run_dir}")
        return TrainResult(self.run_dir, p, reason, {})

    def _agree(self, reason: str | None) -> str | None:
        """Rank 0's stop decision and clock on every rank (the LR schedule reads the clock)."""
        if not self.world.distributed:
            return reason
        reason, self.progress.elapsed = broadcast(self.world, (reason, self.progress.elapsed))
        return reason

    def _share_lr(self) -> None:
        """After rank 0 validated (a plateau schedule may have lowered the LR), every rank takes its LR."""
        if self.world.distributed:
            lrs = broadcast(self.world, [g["lr"] for g in self.optimizer.param_groups])
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr

    def _catch_signals(self):
        def handler(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    def _restore_signals(self, old) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def train(config: Config, run_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print,
          progress_bar: bool | None = None) -> TrainResult:
    """Trains (or resumes) a model in ``run_dir``; see ``Trainer``. Under torchrun every process
    calls this; the process group is left when training ends."""
    trainer = Trainer(config, run_dir, resume, log, progress_bar)
    try:
        return trainer.run()
    finally:
        shutdown(trainer.world)
