import math
from dataclasses import replace

import pytest
import torch

from translate.config import load_config
from translate.errors import ConfigError
from translate.schedules import LRSchedule, teacher_forcing_ratio


def schedule(name, **extra):
    values = {"train.teacher_forcing": name, "train.tf_warmup": 10, "train.tf_floor": 0.2, **extra}
    return load_config(overrides=values).train


def test_warmup_is_pure_teacher_forcing():
    for name in ("constant", "linear", "exponential", "inverse_sigmoid"):
        cfg = schedule(name, **{"train.tf_k": 0.9 if name == "exponential" else 50, "train.tf_start": 0.8})
        assert all(teacher_forcing_ratio(cfg, s) == 1.0 for s in range(10))


def test_constant_schedule():
    cfg = schedule("constant", **{"train.tf_start": 0.6})
    assert {teacher_forcing_ratio(cfg, s) for s in range(10, 500, 7)} == {0.6}


def test_linear_schedule_falls_then_floors():
    cfg = schedule("linear", **{"train.tf_start": 1.0, "train.tf_k": 100})
    assert teacher_forcing_ratio(cfg, 10) == 1.0
    assert teacher_forcing_ratio(cfg, 60) == pytest.approx(0.5)
    assert teacher_forcing_ratio(cfg, 1000) == 0.2


def test_exponential_schedule():
    cfg = schedule("exponential", **{"train.tf_k": 0.99})
    assert teacher_forcing_ratio(cfg, 20) == pytest.approx(0.99 ** 10)
    assert teacher_forcing_ratio(cfg, 10_000) == 0.2


def test_inverse_sigmoid_schedule():
    cfg = schedule("inverse_sigmoid", **{"train.tf_k": 100})
    ratios = [teacher_forcing_ratio(cfg, s) for s in range(10, 3000, 10)]
    assert ratios == sorted(ratios, reverse=True)
    assert teacher_forcing_ratio(cfg, 110) == pytest.approx(100 / (100 + math.e))
    assert ratios[-1] == 0.2 and ratios[0] == pytest.approx(100 / 101)


def lr_config(name, **extra):
    values = {"train.lr_schedule": name, "train.lr": 0.01, "train.min_lr": 1e-4, **extra}
    return load_config(overrides=values).train


def optimizer():
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.01)


def test_linear_lr_by_steps_and_by_time():
    by_steps = LRSchedule(lr_config("linear", **{"train.max_steps": 100, "train.max_minutes": 0}), 0.01)
    assert [by_steps.lr(s, 0.0) for s in (0, 50, 99, 100, 500)] == pytest.approx([0.01, 0.005, 1e-4, 1e-4, 1e-4])
    by_time = LRSchedule(lr_config("linear", **{"train.max_steps": 0, "train.max_minutes": 10}), 0.01)
    assert by_time.lr(123, 150.0) == pytest.approx(0.01 * 0.75)  # a quarter of 10 minutes
    endless = LRSchedule(lr_config("linear", **{"train.max_steps": 0, "train.max_minutes": 0}), 0.01)
    assert endless.lr(10_000, 1e6) == 0.01


def test_constant_lr_and_apply_sets_every_group():
    schedule = LRSchedule(lr_config("constant"), 0.02)
    opt = optimizer()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 5.0})
    assert schedule.apply(opt, 1000, 1e5) == 0.02
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.02]


def test_warmup_decay_equals_torchs_lambda_lr():
    cfg = lr_config("warmup-decay", **{"train.lr_warmup": 50})
    schedule = LRSchedule(cfg, 0.01)
    reference_opt = optimizer()
    reference = torch.optim.lr_scheduler.LambdaLR(
        reference_opt, lambda s: min((s + 1) / 50, math.sqrt(50 / (s + 1))))
    for step in range(300):
        assert schedule.lr(step, 0.0) == pytest.approx(reference_opt.param_groups[0]["lr"]), step
        reference_opt.step()
        reference.step()


@pytest.mark.parametrize("patience,decay", [(0, 0.5), (2, 0.3)])
def test_plateau_equals_torchs_reduce_on_plateau(patience, decay):
    cfg = lr_config("plateau", **{"train.lr_patience": patience, "train.lr_decay": decay, "train.min_lr": 1e-3})
    schedule = LRSchedule(cfg, 0.01)
    reference_opt = optimizer()
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(reference_opt, mode="max", factor=decay,
                                                           patience=patience, min_lr=1e-3)
    bleus = [1.0, 2.0, 2.0, 2.00001, 1.5, 1.9, 3.0, 3.0, 2.0, 2.5, 2.9, 2.0, 1.0, 1.0, 0.5, 4.0, 4.0, 4.0, 4.0]
    for bleu in bleus:
        schedule.on_validation(bleu)
        reference.step(bleu)
        assert schedule.lr(0, 0.0) == pytest.approx(reference_opt.param_groups[0]["lr"]), bleu
    assert schedule.lr(0, 0.0) < 0.01  # it did reduce
    # a run saved by the earlier ReduceLROnPlateau resumes where it stood
    resumed = LRSchedule(cfg, 0.01)
    resumed.load_state_dict(reference.state_dict())
    assert resumed.state_dict() == pytest.approx(schedule.state_dict())


def test_schedules_other_than_plateau_ignore_validations():
    schedule = LRSchedule(lr_config("warmup-decay"), 0.01)
    before = schedule.lr(700, 0.0)
    for _ in range(20):
        schedule.on_validation(0.0)
    assert schedule.lr(700, 0.0) == before


def test_state_round_trip():
    cfg = lr_config("plateau", **{"train.lr_patience": 0})
    schedule = LRSchedule(cfg, 0.01)
    for bleu in (3.0, 2.0, 1.0):
        schedule.on_validation(bleu)
    copy = LRSchedule(cfg, 0.01)
    copy.load_state_dict(schedule.state_dict())
    assert copy.state_dict() == schedule.state_dict() and copy.lr(0, 0.0) == schedule.lr(0, 0.0) < 0.01


def test_default_is_plain_teacher_forcing():
    # bench/exposure_bias.py measured no schedule beating it at the default budget (docs/benchmarks.md);
    # configs/default.yaml follows through test_config.test_the_presets_load
    cfg = load_config().train
    assert all(teacher_forcing_ratio(cfg, s) == 1.0 for s in (0, 999, 1000, 5000, 10**6))


def phase(name, share, **extra):
    values = {"train.teacher_forcing": name, "train.tf_phase": share, "train.tf_warmup": 1000, "train.tf_floor": 0.5,
              "train.max_steps": 100, **extra}
    return load_config(overrides=values).train


def reaches(cfg, floor):
    """The steps the plain step schedule (no phase, no warm-up) takes to reach ``floor``, by bisection."""
    plain = replace(cfg, tf_phase=0.0, tf_warmup=0, tf_floor=0.0)
    low, high = 0.0, 1e7
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if teacher_forcing_ratio(plain, middle) > floor else (low, middle)
    return high


def test_before_the_phase_is_teacher_forcing_whatever_the_warm_up():
    cfg = phase("linear", 0.2, **{"train.tf_k": 10})
    assert [teacher_forcing_ratio(cfg, s) for s in range(80)] == [1.0] * 80
    assert teacher_forcing_ratio(cfg, 85) < 1.0  # inside the phase, though tf_warmup is 1000 steps


@pytest.mark.parametrize("name,k", [("linear", 300.0), ("exponential", 0.99), ("inverse_sigmoid", 300.0)])
def test_the_phase_stretches_the_schedule_to_reach_the_floor_at_its_end(name, k):
    cfg = phase(name, 0.25, **{"train.tf_k": k, "train.tf_start": 0.9})
    span = reaches(cfg, 0.5)
    for step in range(75, 101):  # the phase: steps 75 .. 100 of 100, share (step - 75) / 25
        plain = replace(cfg, tf_phase=0.0, tf_warmup=0)
        assert teacher_forcing_ratio(cfg, step) == pytest.approx(teacher_forcing_ratio(plain, (step - 75) / 25 * span),
                                                                 abs=1e-9), step
    ratios = [teacher_forcing_ratio(cfg, s) for s in range(75, 101)]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] == pytest.approx(0.5)
    assert ratios[0] == teacher_forcing_ratio(replace(cfg, tf_phase=0.0, tf_warmup=0), 0)


def test_a_time_budget_phase_follows_the_clock():
    cfg = phase("linear", 0.5, **{"train.max_steps": 0, "train.max_minutes": 10, "train.tf_start": 1.0})
    assert teacher_forcing_ratio(cfg, 10_000, 299.0) == 1.0  # steps do not count; the clock does
    assert teacher_forcing_ratio(cfg, 5, 300.0) == 1.0  # the phase starts at the schedule's start
    assert teacher_forcing_ratio(cfg, 5, 450.0) == pytest.approx(0.75)
    assert teacher_forcing_ratio(cfg, 5, 600.0) == teacher_forcing_ratio(cfg, 5, 9000.0) == 0.5


def test_a_constant_phase_switches_its_ratio_on():
    cfg = phase("constant", 0.1, **{"train.tf_start": 0.7})
    assert teacher_forcing_ratio(cfg, 89) == 1.0
    assert teacher_forcing_ratio(cfg, 90) == teacher_forcing_ratio(cfg, 99) == 0.7


@pytest.mark.parametrize("values,message", [
    ({"train.tf_phase": 1.5}, r"share of the budget in \[0, 1\]"),
    ({"train.tf_phase": 0.2, "train.max_steps": 0, "train.max_minutes": 0, "train.max_epochs": 3},
     "needs train.max_steps"),
    ({"train.tf_phase": 0.2, "train.teacher_forcing": "exponential", "train.tf_k": 0.9, "train.tf_floor": 0.0},
     "above 0"),
])
def test_bad_phases_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=values)
