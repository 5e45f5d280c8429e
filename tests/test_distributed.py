"""Gradient accumulation and data-parallel training (torchrun, gloo on CPU) give the same model
as one process that takes the same combined batches."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from translate.build import build_trainer, train
from translate.checkpoint import load_checkpoint
from translate.config import load_config
from translate.data import collate

from .conftest import env_with_repo

# no dropout and pure teacher forcing: nothing random is left to differ between the runs
EXACT = {"model.dropout": 0.0, "train.tf_warmup": 1000, "train.max_steps": 4, "train.eval_every": 1000,
         "train.lr_schedule": "constant", "train.amp": False}


def test_accumulated_batches_equal_one_merged_batch(tiny_config, tmp_path):
    config = tiny_config.override(EXACT)
    one = build_trainer(config, tmp_path / "one", progress_bar=False)
    two = build_trainer(config, tmp_path / "two", progress_bar=False)
    two.model.load_state_dict(one.model.state_dict())
    for step in range(3):
        first, second = one.data.epoch_batches(0)[2 * step: 2 * step + 2]
        both = np.concatenate([first, second])
        loss_a, tokens_a = one.train_step([collate(one.data.src, one.data.tgt, first),
                                           collate(one.data.src, one.data.tgt, second)])
        loss_b, tokens_b = two.train_step(collate(two.data.src, two.data.tgt, both))
        assert tokens_a == tokens_b == one.data.target_tokens(both)
        assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-4)
    for (name, a), b in zip(one.model.state_dict().items(), two.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_lr_scaling_and_accumulate_config(tiny_config):
    from translate.errors import ConfigError
    from translate.schedules import scaled_lr

    cfg = tiny_config.override({"train.accumulate": 4}).train
    assert scaled_lr(cfg) == pytest.approx(cfg.lr * 2)
    assert scaled_lr(cfg, world_size=2) == pytest.approx(cfg.lr * 8 ** 0.5)
    linear = tiny_config.override({"train.accumulate": 4, "train.lr_scaling": "linear"})
    assert scaled_lr(linear.train, 2) == pytest.approx(cfg.lr * 8)
    with pytest.raises(ConfigError, match="train.accumulate must be positive"):
        load_config(overrides={"train.accumulate": 0})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir: Path, config_file: Path, *extra: str, steps: int) -> subprocess.CompletedProcess:
    """``translate train`` in two gloo CPU processes under torchrun; fails unless the run ends at
    ``steps`` with its checkpoint saved."""
    env = env_with_repo(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "translate", "train",
           "--run-dir", str(run_dir), "--config", str(config_file), "--set", "train.device=cpu", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    # strict: a process that aborts as it tears down (gloo's "terminate called without an active
    # exception") is a failed run to its user, though it saved
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGABRT" not in done.stderr and "terminate called" not in done.stderr, done.stderr[-3000:]
    assert load_checkpoint(run_dir / "last.pt")["progress"]["step"] == steps
    return done


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_batches(tiny_config, tmp_path):
    # one process taking 2 batches a step (accumulate 2) ...
    config = tiny_config.override(EXACT)
    single = train(config.override({"train.accumulate": 2}), tmp_path / "single",
                   progress_bar=False)
    assert single.progress.step == EXACT["train.max_steps"]
    # ... and torchrun with 2 CPU processes taking one batch each, through the command line,
    # stopped half way and resumed
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    for extra, steps in ((["--max-steps", "2"], 2), (["--resume"], EXACT["train.max_steps"])):
        done = _torchrun(tmp_path / "ddp", config_file, *extra, steps=steps)
        assert "2 process(es) x accumulate 1" in done.stdout + done.stderr
    assert "resumed" in done.stderr
    a = load_checkpoint(tmp_path / "single" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == EXACT["train.max_steps"]
    assert a["progress"]["tokens"] == b["progress"]["tokens"]
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    # only rank 0 wrote files: one metrics stream, no stray copies
    names = {run: sorted(p.name for p in (tmp_path / run).iterdir()) for run in ("ddp", "single")}
    assert names["ddp"] == names["single"]


def test_the_process_group_waits_as_long_as_the_config_says(monkeypatch):
    """Rank 0 alone trains the tokenizer and tokenizes the corpus while the others wait in a
    collective: the group's timeout is train.dist_timeout_minutes, not the backend's default."""
    from datetime import timedelta

    import torch.distributed as dist

    from translate import distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: seen.update(backend=backend, **kwargs))
    world = distributed.init_world("cpu", timeout_minutes=90)
    assert world.rank == 1 and world.size == 2
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=90)}


@pytest.mark.slow
def test_every_rank_resumes_with_its_own_random_state(tiny_config, tmp_path):
    """With dropout and scheduled sampling each rank draws its own random numbers; a torchrun run
    stopped half way and resumed equals one never stopped only if every rank's state comes back."""
    config = tiny_config.override({**EXACT, "model.dropout": 0.3, "train.tf_warmup": 0,
                                   "train.teacher_forcing": "constant", "train.tf_start": 0.5,
                                   "train.eval_every": 2})
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")

    _torchrun(tmp_path / "whole", config_file, steps=4)
    _torchrun(tmp_path / "split", config_file, "--max-steps", "2", steps=2)
    assert len(load_checkpoint(tmp_path / "split" / "last.pt")["rank_rng"]) == 2
    _torchrun(tmp_path / "split", config_file, "--resume", steps=4)
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == EXACT["train.max_steps"]
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_process_group_is_left_once_the_trainer_is_gone(tiny_config, tmp_path, monkeypatch):
    """``train`` leaves the process group in every case (a run that finished, failed, or could not
    start), and only after the trainer, whose DistributedDataParallel holds the group, is gone: a
    group left to interpreter exit can abort the process (gloo)."""
    import weakref

    from translate import build
    from translate.errors import ConfigError

    built, left = [], []
    real_build = build.build_trainer

    def tracked(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        built.append(weakref.ref(trainer))
        return trainer

    monkeypatch.setattr(build, "build_trainer", tracked)
    monkeypatch.setattr(build, "leave", lambda finished=True: left.append((finished, built[-1]() if built else None)))
    train(tiny_config.override({"train.max_steps": 1, "train.eval_every": 1}), tmp_path / "run", progress_bar=False)
    assert left == [(True, None)]
    monkeypatch.setattr(build.Trainer, "run", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(tiny_config, tmp_path / "failed", progress_bar=False)
    assert left[-1] == (False, None)
    monkeypatch.setattr(build, "build_trainer", lambda *args, **kwargs: (_ for _ in ()).throw(ConfigError("no")))
    with pytest.raises(ConfigError):
        train(tiny_config, tmp_path / "never", progress_bar=False)
    assert left[-1] == (False, None) and len(left) == 3


def test_leaving_destroys_the_group_after_the_barrier_even_when_it_fails(monkeypatch):
    import torch.distributed as dist

    from translate import distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.leave()
    distributed.leave(finished=False)  # after a failure the others may never reach a barrier
    assert calls == ["barrier", "destroy", "destroy"]

    def broken():
        raise RuntimeError("connection closed by peer")

    monkeypatch.setattr(dist, "barrier", broken)
    with pytest.raises(RuntimeError, match="closed by peer"):
        distributed.leave()
    assert calls[-1] == "destroy"
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    distributed.leave()  # not in a group: nothing to do
    assert len(calls) == 4
