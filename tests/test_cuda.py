"""Training and decoding on CUDA: mixed precision with and without loss scaling, a resume across
devices and precisions, and NCCL across two GPUs. Skipped where there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from translate import runtime
from translate.build import build_trainer, train
from translate.checkpoint import load_checkpoint
from translate.data import collate
from translate.translator import DecodeOptions, Translator

from .test_distributed import EXACT, _free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def native_bf16() -> bool:
    return torch.cuda.is_available() and runtime.cuda_has_bf16(torch.device("cuda"))


def test_cuda_training_step_and_decoding(tiny_config, tmp_path):
    config = tiny_config.override({"train.device": "cuda", "train.max_steps": 3})
    result = train(config, tmp_path / "cuda", progress_bar=False)
    assert result.progress.step == 3
    translator = Translator.load(tmp_path / "cuda", DecodeOptions(beam=3), device=torch.device("cuda"))
    out = translator.translate(["El gato come pan."])
    assert isinstance(out[0][0].text, str)


@pytest.mark.parametrize("amp", ["fp16", pytest.param("bf16", marks=pytest.mark.skipif(
    not native_bf16(), reason="needs a GPU with native bf16"))])
def test_mixed_precision_steps_train(tiny_config, tmp_path, amp):
    config = tiny_config.override({"train.device": "cuda", "train.amp": amp})
    trainer = build_trainer(config, tmp_path / amp, progress_bar=False)
    assert trainer.amp_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batches = trainer.data.epoch_batches(0)
    trained = 0
    for i in range(12):  # fp16 starts at a loss scale of 2^16, which may overflow a few steps first
        _, tokens = trainer.train_step(collate(trainer.data.src, trainer.data.tgt, batches[i % len(batches)]))
        trained += tokens > 0
    assert trained >= 6 and trainer.progress.nonfinite_steps == 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    trainer.metrics.close()


def test_a_cpu_run_resumes_on_the_gpu_in_fp16(tiny_config, tmp_path, monkeypatch):
    """A run begun on the CPU (bf16 or full precision: no loss scale saved) goes on under fp16 with
    a fresh loss scaler on a GPU without native bf16 (forced here, so that any GPU tests it)."""
    run_dir = tmp_path / "run"
    config = tiny_config.override({"train.max_steps": 3, "train.eval_every": 3, "train.device": "cpu"})
    train(config, run_dir, progress_bar=False)
    monkeypatch.setattr(runtime, "cuda_has_bf16", lambda device: False)
    longer = config.override({"train.max_steps": 8, "train.device": "cuda"})
    result = train(longer, run_dir, resume=True, progress_bar=False)
    assert result.progress.step == 8
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["scaler"] and saved["scaler"]["scale"] > 0  # fp16 now has a loss scale to save


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_nccl_processes_equal_one_process_with_the_same_batches(tiny_config, tmp_path):
    config = tiny_config.override({**EXACT, "train.device": "cuda"})
    single = train(config.override({"train.accumulate": 2}), tmp_path / "single",
                   progress_bar=False)
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "translate", "train",
           "--run-dir", str(tmp_path / "ddp"), "--config", str(config_file)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_checkpoint(tmp_path / "single" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == single.progress.step
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=1e-3, atol=1e-4, msg=name)
