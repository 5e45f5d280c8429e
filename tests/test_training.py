import json

import pytest
import torch

from translate import training
from translate.build import build_trainer, train
from translate.checkpoint import load_checkpoint, load_model
from translate.errors import TrainingError
from translate.schedules import teacher_forcing_ratio
from translate.training import Trainer

from .conftest import cli_train_args, tiny


def params(run_dir):
    return load_checkpoint(run_dir / "last.pt")["model"]


def test_resume_equals_uninterrupted(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 20, "train.eval_every": 5})
    train(config, tmp_path / "whole", log=lambda s: None)

    original = Trainer.train_step

    def stop_after_ten(self, batches, group_tokens=None):
        result = original(self, batches, group_tokens)
        if self.progress.step + 1 >= 10:
            self.stop_signal = "SIGTERM"
        return result

    monkeypatch.setattr(Trainer, "train_step", stop_after_ten)
    first = train(config, tmp_path / "split", log=lambda s: None)
    assert first.progress.step == 10 and first.stop_reason == "stopped by SIGTERM"
    monkeypatch.setattr(Trainer, "train_step", original)
    second = train(config, tmp_path / "split", resume=True, log=lambda s: None)
    assert second.progress.step == 20
    whole, split = params(tmp_path / "whole"), params(tmp_path / "split")
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5)


def test_checkpoint_carries_config_tokenizer_and_ratio(corpus, tiny_tokenizer_file, tmp_path):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 12, "train.eval_every": 6})
    result = train(config, tmp_path / "run", log=lambda s: None)
    model, tokenizer, saved, payload = load_model(tmp_path / "run" / "last.pt")
    assert saved == config and payload["progress"]["step"] == 12
    assert payload["progress"]["tf_ratio"] == pytest.approx(teacher_forcing_ratio(config.train, 11))
    assert payload["progress"]["tf_ratio"] < 1.0 and result.progress.best_bleu >= 0
    assert tokenizer.fingerprint == payload["tokenizer_fingerprint"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"kind": "dev"' in line for line in lines) and any('"tf_ratio"' in line for line in lines)
    reports = [json.loads(line) for line in lines if '"kind": "train"' in line]
    assert all(0 <= r["fed_not_gold"] <= r["fed_model"] <= 1 for r in reports)
    assert reports and reports[-1]["fed_model"] > 0  # the schedule has left pure teacher forcing


def test_non_finite_steps_are_skipped_then_stop(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 30})
    trainer = build_trainer(config, tmp_path / "run", log=lambda s: None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    monkeypatch.setattr(training, "sequence_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match="non-finite steps in a row"):
        trainer.run()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def cli_train(corpus, tokenizer_file, run_dir, *extra):
    import sys

    args = cli_train_args(corpus, run_dir, **{"tokenizer.model": tokenizer_file, "train.max_steps": 300,
                                               "train.eval_every": 20})
    return [sys.executable, "-m", "translate", *args, *extra]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(corpus, tiny_tokenizer_file, tmp_path):
    import subprocess
    import time

    subprocess.run(cli_train(corpus, tiny_tokenizer_file, tmp_path / "whole"), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_train(corpus, tiny_tokenizer_file, killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    step = load_checkpoint(killed / "last.pt")["progress"]["step"]  # loadable after SIGKILL
    load_checkpoint(killed / "best.pt")
    assert 0 < step <= 300
    resumed = subprocess.run(cli_train(corpus, tiny_tokenizer_file, killed, "--resume"), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole, split = params(tmp_path / "whole"), params(killed)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5)


def test_out_of_memory_batch_is_skipped(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 6, "train.eval_every": 6})
    lines = []
    trainer = build_trainer(config, tmp_path / "run", log=lines.append)
    real = training.scheduled_logits
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (2, 4):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "scheduled_logits", flaky)
    result = trainer.run()
    assert result.progress.step == 6 and result.progress.skipped_batches == 2
    assert sum("out of memory on a batch" in line for line in lines) == 2
    assert (tmp_path / "run" / "last.pt").is_file()


def test_other_runtime_errors_are_not_swallowed(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    trainer = build_trainer(tiny(corpus, tiny_tokenizer_file), tmp_path / "run", log=lambda s: None)

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(training, "scheduled_logits", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        trainer.run()


def test_resume_rejects_changed_model_keys(corpus, tiny_tokenizer_file, tmp_path):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 2, "train.eval_every": 2})
    train(config, tmp_path / "run", log=lambda s: None)
    changed = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 4, "model.hidden_dim": 64})
    with pytest.raises(Exception, match=r"model.hidden_dim=64 differs from the run's saved value 32"):
        train(changed, tmp_path / "run", resume=True, log=lambda s: None)
    longer = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 4, "train.eval_every": 2})
    assert train(longer, tmp_path / "run", resume=True, log=lambda s: None).progress.step == 4


@pytest.mark.slow
def test_sigterm_saves_and_says_how_to_resume(corpus, tiny_tokenizer_file, tmp_path):
    import signal
    import subprocess
    import time

    run_dir = tmp_path / "run"
    args = cli_train(corpus, tiny_tokenizer_file, run_dir, "--set", "train.max_steps=100000")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGTERM" in err and f"translate train --run-dir {run_dir} --resume" in err
    assert "Traceback" not in err
    step = load_checkpoint(run_dir / "last.pt")["progress"]["step"]
    assert 0 < step < 100000


def test_long_training_pairs_are_dropped_with_a_count(corpus, tiny_tokenizer_file, tmp_path):
    lines = []
    config = tiny(corpus, tiny_tokenizer_file, **{"data.max_len": 6, "train.max_steps": 1, "train.eval_every": 1})
    trainer = build_trainer(config, tmp_path / "run", log=lines.append)
    dropped = [line for line in lines if line.startswith("dropped ")]
    assert len(dropped) == 1 and "of 600 training pairs longer than 6 pieces" in dropped[0]
    n_dropped = int(dropped[0].split()[1].replace(",", ""))
    assert 0 < n_dropped < 600 and len(trainer.data) == 600 - n_dropped
    trainer.metrics.close()
