"""What changes over a training run: the teacher-forcing ratio and the learning rate.

Scheduled teacher forcing follows Bengio et al. (2015): ``teacher_forcing_ratio(step)`` is the
probability of feeding the decoder the gold token rather than the model's own prediction. Which
positions get a prediction (the masks, ``feeding.gold_mask`` and ``feeding.position_weight``) and
what is fed are ``feeding``'s part.

The learning rate has one mechanism for every ``train.lr_schedule``: ``LRSchedule.apply`` sets
the rate of the coming optimiser step from the run's step count and training time, and
``LRSchedule.on_validation`` lets the plateau schedule react to the dev score.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import TrainConfig

# ---------------------------------------------------------------- teacher forcing


def teacher_forcing_ratio(cfg: TrainConfig, step: int, elapsed: float = 0.0) -> float:
    """Probability of feeding the gold token at ``step`` (0-based) after ``elapsed`` seconds of
    training: 1.0 during the warm-up, or before the final phase (``tf_phase``), whose share done
    stretches the schedule over it (``phase_share``)."""
    if cfg.tf_phase > 0:
        share = phase_share(cfg, step, elapsed)
        return 1.0 if share is None else schedule_ratio(cfg, share * steps_to_floor(cfg))
    if step < cfg.tf_warmup:
        return 1.0
    return schedule_ratio(cfg, step - cfg.tf_warmup)


def phase_share(cfg: TrainConfig, step: int, elapsed: float) -> float | None:
    """How much of the final phase (the last ``tf_phase`` of ``max_steps``, else of ``max_minutes``,
    as the linear LR schedule reads the budget) is done at ``step`` after ``elapsed`` seconds, in
    [0, 1]; None before the phase. A function of the step and the run's clock, both restored by
    ``--resume``, so a resumed run crosses into the phase where an uninterrupted one does."""
    if cfg.max_steps:
        done = step / cfg.max_steps
    elif cfg.max_minutes:
        done = elapsed / (cfg.max_minutes * 60)
    else:  # (the config refuses a phase without a budget)
        return None
    start = 1.0 - cfg.tf_phase
    return None if done < start else min(1.0, (done - start) / cfg.tf_phase)


def steps_to_floor(cfg: TrainConfig) -> float:
    """The steps the step schedule takes from its start down to ``tf_floor`` (0 when it starts at
    or below it; ``constant`` never falls): the span that a final phase stretches over itself."""
    floor, k = cfg.tf_floor, cfg.tf_k
    if cfg.teacher_forcing == "linear":
        return max(0.0, (cfg.tf_start - floor) * k)
    if cfg.teacher_forcing == "exponential":
        return 0.0 if k >= 1 or floor >= 1 else math.log(floor) / math.log(k)
    if cfg.teacher_forcing == "inverse_sigmoid":  # k / (k + exp(s / k)) = floor
        return max(0.0, k * math.log(k * (1.0 - floor) / floor)) if floor < 1 else 0.0
    return 0.0


def schedule_ratio(cfg: TrainConfig, s: float) -> float:
    """The step schedule's ratio ``s`` steps after its start, never below ``tf_floor``."""
    if cfg.teacher_forcing == "constant":
        ratio = cfg.tf_start
    elif cfg.teacher_forcing == "linear":
        ratio = cfg.tf_start - s / cfg.tf_k  # tf_k steps for the ratio to fall by 1.0
    elif cfg.teacher_forcing == "exponential":
        ratio = cfg.tf_k ** s
    else:  # inverse sigmoid: k / (k + exp(s / k))
        ratio = cfg.tf_k / (cfg.tf_k + math.exp(min(s / cfg.tf_k, 700.0)))
    return max(cfg.tf_floor, min(1.0, ratio))


# ---------------------------------------------------------------- learning rate


def scaled_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """``train.lr`` for the batches one step sees (``accumulate`` x processes), by ``lr_scaling``:
    the square-root rule suits Adam (Hoffer et al., 2017); linear follows Goyal et al. (2017)."""
    n = cfg.accumulate * world_size
    return cfg.lr * {"sqrt": n**0.5, "linear": float(n), "none": 1.0}[cfg.lr_scaling]


class LRSchedule:
    """The learning rate of each optimiser step, by ``train.lr_schedule``:

    - ``constant``: the peak rate;
    - ``linear``: from the peak down to ``min_lr`` over the run, over ``max_steps`` when set, else
      over ``max_minutes`` of training time, so a time-limited run ends with a small rate;
    - ``warmup-decay``: a linear warm-up over ``lr_warmup`` steps, then the inverse square root
      of the step (Vaswani et al., 2017);
    - ``plateau``: the rate times ``lr_decay`` whenever dev BLEU has not improved (by a relative
      1e-4) for more than ``lr_patience`` validations, never below ``min_lr``.

    Only the plateau schedule has state (best BLEU, validations without improvement, its rate);
    the others are functions of the step and the training time.
    """

    THRESHOLD = 1e-4  # relative improvement that counts as better (plateau)

    def __init__(self, cfg: TrainConfig, peak: float):
        self.cfg, self.peak = cfg, peak
        self.best, self.bad, self.plateau_lr = -math.inf, 0, peak

    def lr(self, step: int, elapsed: float) -> float:
        """The rate for the optimiser step after ``step`` steps and ``elapsed`` seconds of training."""
        cfg = self.cfg
        if cfg.lr_schedule == "linear":
            if cfg.max_steps:
                done = step / cfg.max_steps
            elif cfg.max_minutes:
                done = elapsed / (cfg.max_minutes * 60)
            else:
                return self.peak
            return max(cfg.min_lr, self.peak * (1.0 - min(done, 1.0)))
        if cfg.lr_schedule == "warmup-decay":
            warmup = max(1, cfg.lr_warmup)
            return self.peak * min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))
        if cfg.lr_schedule == "plateau":
            return self.plateau_lr
        return self.peak

    def apply(self, optimizer: torch.optim.Optimizer, step: int, elapsed: float) -> float:
        """Sets the rate of the coming optimiser step; returns it."""
        lr = self.lr(step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def on_validation(self, score: float) -> None:
        """Counts a validation of ``train.eval_metric`` (higher is better; a loss comes negated) for
        the plateau schedule (the others ignore it)."""
        if self.cfg.lr_schedule != "plateau":
            return
        if math.isinf(self.best) or score > self.best + abs(self.best) * self.THRESHOLD:  # relative, either sign
            self.best, self.bad = score, 0
            return
        self.bad += 1
        if self.bad > self.cfg.lr_patience:
            self.plateau_lr = max(self.plateau_lr * self.cfg.lr_decay, self.cfg.min_lr)
            self.bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "plateau_lr": self.plateau_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "num_bad_epochs" in state:  # a run saved with torch's ReduceLROnPlateau
            last = state.get("_last_lr") or [self.peak]
            state = {"best": state["best"], "bad": state["num_bad_epochs"], "plateau_lr": last[0]}
        if "plateau_lr" in state:  # (torch's LambdaLR kept nothing the step count does not give)
            self.best, self.bad, self.plateau_lr = float(state["best"]), int(state["bad"]), float(state["plateau_lr"])
