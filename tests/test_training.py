import json
import logging

import pytest
import torch

from translate import training
from translate.build import build_trainer, train
from translate.checkpoint import load_checkpoint, load_model, save_checkpoint
from translate.data import collate
from translate.errors import TrainingError
from translate.schedules import teacher_forcing_ratio
from translate.tokenizer import PAD
from translate.training import Trainer

from .conftest import cli_train_args, kill_after_first_checkpoint, package_messages, tiny


def params(run_dir):
    return load_checkpoint(run_dir / "last.pt")["model"]


@pytest.mark.parametrize("stop_at", [10, 7])  # at a validation, and between two
def test_resume_equals_uninterrupted(corpus, tiny_tokenizer_file, tmp_path, monkeypatch, stop_at):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 20, "train.eval_every": 5})
    whole = train(config, tmp_path / "whole")

    original = Trainer.train_step

    def stop(self, batches, group_tokens=None):
        result = original(self, batches, group_tokens)
        if self.progress.step + 1 >= stop_at:
            self.stop_signal = "SIGTERM"
        return result

    monkeypatch.setattr(Trainer, "train_step", stop)
    first = train(config, tmp_path / "split")
    assert first.progress.step == stop_at and first.stop_reason == "stopped by SIGTERM"
    monkeypatch.setattr(Trainer, "train_step", original)
    second = train(config, tmp_path / "split", resume=True)
    assert second.progress.step == 20
    weights, split = params(tmp_path / "whole"), params(tmp_path / "split")
    for name in weights:
        torch.testing.assert_close(split[name], weights[name], atol=1e-6, rtol=1e-5)
    lexicons = [load_checkpoint(tmp_path / run / "last.pt")["lexicon"] for run in ("whole", "split")]
    assert all(torch.equal(lexicons[0][key], lexicons[1][key]) for key in ("translations", "frequent"))
    # the stop validated nothing extra: the same validations, patience and best step
    assert dev_steps(tmp_path / "split") == dev_steps(tmp_path / "whole") == [5, 10, 15, 20]
    assert (second.progress.bad_evals, second.progress.best_step) == (whole.progress.bad_evals,
                                                                      whole.progress.best_step)


def ratios_and_resume(config, tmp_path, monkeypatch, stop_at):
    """Trains ``config`` whole, then stopped after ``stop_at`` steps and resumed; asserts that the
    two end with the same weights and returns the teacher-forcing ratio of each step taken."""
    whole = train(config, tmp_path / "whole")
    original, ratios = Trainer.train_step, []

    def stop(self, batches, group_tokens=None):
        ratios.append(self.progress.tf_ratio)
        result = original(self, batches, group_tokens)
        if self.progress.step + 1 >= stop_at:
            self.stop_signal = "SIGTERM"
        return result

    monkeypatch.setattr(Trainer, "train_step", stop)
    assert train(config, tmp_path / "split").progress.step == stop_at
    monkeypatch.setattr(Trainer, "train_step", lambda self, *a: ratios.append(self.progress.tf_ratio)
                        or original(self, *a))
    second = train(config, tmp_path / "split", resume=True)
    assert second.progress.step == whole.progress.step
    weights, split = params(tmp_path / "whole"), params(tmp_path / "split")
    for name in weights:
        torch.testing.assert_close(split[name], weights[name], atol=1e-6, rtol=1e-5)
    assert dev_steps(tmp_path / "split") == dev_steps(tmp_path / "whole")
    return ratios


def test_a_run_stopped_in_its_final_phase_resumes_as_if_uninterrupted(corpus, tiny_tokenizer_file, tmp_path,
                                                                       monkeypatch):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 16, "train.eval_every": 4,
                                                  "train.teacher_forcing": "linear", "train.tf_k": 300,
                                                  "train.tf_floor": 0.5, "train.tf_phase": 0.5})
    ratios = ratios_and_resume(config, tmp_path, monkeypatch, stop_at=11)  # stopped 3 steps into the phase
    assert ratios[:8] == [1.0] * 8  # teacher forcing before the phase, the tiny runs' warm-up of 5 steps no matter
    assert ratios[8:] == pytest.approx([1.0 - 0.5 * i / 8 for i in range(8)])  # 1 down towards 0.5 over the phase


def test_a_finetuning_run_has_its_final_phase_in_its_own_budget(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    train(tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 4, "train.eval_every": 4}), tmp_path / "source")
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 8, "train.eval_every": 4,
                                                  "train.teacher_forcing": "constant", "train.tf_start": 0.6,
                                                  "train.tf_floor": 0.5, "train.tf_phase": 0.25,
                                                  "train.init_from": str(tmp_path / "source")})
    original, ratios = Trainer.train_step, []
    monkeypatch.setattr(Trainer, "train_step", lambda self, *a: ratios.append(self.progress.tf_ratio)
                        or original(self, *a))
    train(config, tmp_path / "finetuned")
    assert ratios == [1.0] * 6 + [0.6] * 2  # counted from the fine-tuning run's first step


def test_an_mrt_run_resumes_as_if_uninterrupted(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 6, "train.eval_every": 3,
                                                  "train.teacher_forcing": "constant", "train.objective": "mrt",
                                                  "train.mrt_samples": 2, "train.mrt_greedy": True})
    ratios_and_resume(config, tmp_path, monkeypatch, stop_at=4)
    logged = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] is None or 0 <= r["loss"] <= 1 for r in logged if r["kind"] == "train")  # a risk per token


def dev_steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"kind": "dev"' in line]


def test_the_result_says_what_the_run_reached(corpus, tiny_tokenizer_file, tmp_path):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 12, "train.eval_every": 5})
    result = train(config, tmp_path / "run")
    lines = (tmp_path / "run" / "train.log").read_text(encoding="utf-8").splitlines()
    devs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"kind": "dev"' in line]
    assert [dev["step"] for dev in devs] == [5, 10, 12]  # the last one as the run ends
    assert (result.steps, result.epochs, result.stop_reason, result.stopped_by) == (12, 0, "reached max_steps=12",
                                                                                    None)
    final = {key: devs[-1][key] for key in ("dev_loss", "dev_ppl", "dev_bleu", "dev_chrf")}
    assert {key: result.final_dev[key] for key in final} == final
    best = [dev for dev in devs if dev["best"]][-1]
    assert (result.best_step, result.best_bleu) == (best["step"], best["dev_bleu"])
    assert result.last_checkpoint == tmp_path / "run" / "last.pt"
    assert result.best_checkpoint == tmp_path / "run" / "best.pt"
    assert load_checkpoint(result.best_checkpoint)["progress"]["step"] == best["step"]
    assert lines[-1].split(" ", 2)[2] == result.summary() == (f"done: reached max_steps=12 at step 12; best dev BLEU "
                                                              f"{best['dev_bleu']:.2f} at step {best['step']}; "
                                                              f"checkpoints in {tmp_path / 'run'}")


def test_a_result_knows_the_signal_that_stopped_its_run(tmp_path):
    from translate.checkpoint import Progress
    from translate.training import TrainResult

    assert TrainResult(tmp_path, Progress(), "stopped by SIGINT").stopped_by == "SIGINT"
    unvalidated = TrainResult(tmp_path, Progress(), "stopped by SIGTERM")
    assert unvalidated.stopped_by == "SIGTERM" and unvalidated.final_dev is unvalidated.best_checkpoint is None
    assert TrainResult(tmp_path, Progress(), "early stopping: no better dev BLEU in 3 validations").stopped_by is None


def test_checkpoint_carries_config_tokenizer_and_ratio(corpus, tiny_tokenizer_file, tmp_path):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 12, "train.eval_every": 6})
    result = train(config, tmp_path / "run")
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
    trainer = build_trainer(config, tmp_path / "run")
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

    subprocess.run(cli_train(corpus, tiny_tokenizer_file, tmp_path / "whole"), check=True, capture_output=True)
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(cli_train(corpus, tiny_tokenizer_file, killed), killed)
    step = load_checkpoint(killed / "last.pt")["progress"]["step"]  # loadable after SIGKILL
    load_checkpoint(killed / "best.pt")
    assert 0 < step < 300
    resumed = subprocess.run(cli_train(corpus, tiny_tokenizer_file, killed, "--resume"), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole, split = params(tmp_path / "whole"), params(killed)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5)


def test_out_of_memory_batch_is_skipped(corpus, tiny_tokenizer_file, tmp_path, monkeypatch, caplog):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 6, "train.eval_every": 6})
    trainer = build_trainer(config, tmp_path / "run")
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
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("out of memory on a batch" in line for line in warnings) == 2
    assert (tmp_path / "run" / "last.pt").is_file()


def test_other_runtime_errors_are_not_swallowed(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    trainer = build_trainer(tiny(corpus, tiny_tokenizer_file), tmp_path / "run")

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(training, "scheduled_logits", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        trainer.run()


def test_resume_rejects_changed_model_keys(corpus, tiny_tokenizer_file, tmp_path):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 2, "train.eval_every": 2})
    train(config, tmp_path / "run")
    changed = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 4, "model.hidden_dim": 64})
    with pytest.raises(Exception, match=r"model.hidden_dim=64 differs from the run's saved value 32"):
        train(changed, tmp_path / "run", resume=True)
    longer = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 4, "train.eval_every": 2})
    assert train(longer, tmp_path / "run", resume=True).progress.step == 4


def test_resume_takes_limits_set_to_their_defaults(corpus, tiny_tokenizer_file, tmp_path):
    """``--resume --max-minutes 25`` on a run saved with 60 trains for 25 minutes, though 25 is the
    default; so do ``train.device=auto`` after ``cpu`` and ``train.max_steps=0`` (through the
    command line, then the library)."""
    from click.testing import CliRunner

    from translate.cli import main
    from translate.config import Config, load_config

    run_dir = tmp_path / "run"
    first = CliRunner().invoke(main, cli_train_args(corpus, run_dir, **{
        "tokenizer.model": tiny_tokenizer_file, "train.max_steps": 2, "train.eval_every": 2,
        "train.max_minutes": 60, "train.device": "cpu"}))
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["train", "--run-dir", str(run_dir), "--resume", "--max-minutes", "25",
                                      "--max-epochs", "1", "--set", "train.device=auto", "--set",
                                      "train.max_steps=0"])
    assert again.exit_code == 0, again.output
    saved = load_checkpoint(run_dir / "last.pt")
    cfg = saved["config"]["train"]
    assert (cfg["max_minutes"], cfg["device"], cfg["max_steps"], cfg["max_epochs"]) == (25.0, "auto", 0, 1)
    assert "reached max_epochs=1" in again.output and saved["progress"]["epoch"] == 1  # max_steps=2 is gone
    for minutes in (60.0, Config().train.max_minutes):  # the library: a config's overrides are what its user set
        train(load_config(overrides={"train.max_minutes": minutes}), run_dir, resume=True)
        assert load_checkpoint(run_dir / "last.pt")["config"]["train"]["max_minutes"] == minutes


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
    assert proc.returncode == 143, err  # 128 + SIGTERM, as a shell reports it (Ctrl-C: 130)
    assert "stopped by SIGTERM" in err and f"translate train --run-dir {run_dir} --resume" in err
    assert "Traceback" not in err
    step = load_checkpoint(run_dir / "last.pt")["progress"]["step"]
    assert 0 < step < 100000


def test_long_training_pairs_are_dropped_with_a_count(corpus, tiny_tokenizer_file, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="translate")
    config = tiny(corpus, tiny_tokenizer_file, **{"data.max_len": 6, "train.max_steps": 1, "train.eval_every": 1})
    trainer = build_trainer(config, tmp_path / "run")
    dropped = [line for line in package_messages(caplog) if line.startswith("dropped ")]
    assert len(dropped) == 1 and "of 600 training pairs longer than 6 pieces" in dropped[0]
    n_dropped = int(dropped[0].split()[1].replace(",", ""))
    assert 0 < n_dropped < 600 and len(trainer.data) == 600 - n_dropped
    trainer.metrics.close()


def test_fp16_overflow_steps_belong_to_the_loss_scaler(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    """A loss scale that makes the gradients overflow skips the update and halves the scale; that
    is the scaler calibrating, not a non-finite step, so a run survives more than five in a row."""
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 8, "train.eval_every": 100})
    trainer = build_trainer(config, tmp_path / "run")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    real = training.sequence_loss  # a finite loss whose scaled gradients overflow at every step here
    monkeypatch.setattr(training, "sequence_loss", lambda *a, **k: real(*a, **k) * 1e20)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batches = trainer.data.epoch_batches(0)
    skipped = 0
    for i in range(8):
        _, tokens = trainer.train_step(collate(trainer.data.src, trainer.data.tgt, batches[i]))
        skipped += tokens == 0
        if tokens == 0:
            assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert skipped == 8 and trainer.progress.nonfinite_steps == 0
    assert trainer.scaler.get_scale() == 2.0 ** 92  # halved at each overflow
    trainer.metrics.close()


def test_a_non_finite_loss_still_counts_under_the_loss_scaler(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 30})
    trainer = build_trainer(config, tmp_path / "run")
    trainer.scaler = torch.amp.GradScaler("cpu")
    real = training.sequence_loss
    monkeypatch.setattr(training, "sequence_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainingError, match="non-finite steps in a row"):
        trainer.run()


@pytest.mark.parametrize("metric", ["bleu", "chrf", "loss"])
def test_the_eval_metric_picks_the_best_validation(corpus, tiny_tokenizer_file, tmp_path, metric):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.eval_metric": metric})
    trainer = build_trainer(config, tmp_path / "run")
    records = [{"dev_loss": 3.0, "dev_ppl": 20.1, "dev_bleu": 5.0, "dev_chrf": 30.0},
               {"dev_loss": 2.0, "dev_ppl": 7.4, "dev_bleu": 4.0, "dev_chrf": 29.0},  # best loss only
               {"dev_loss": 2.5, "dev_ppl": 12.2, "dev_bleu": 4.5, "dev_chrf": 31.0}]  # best chrF only
    best = {"bleu": 1, "chrf": 3, "loss": 2}[metric]
    for step, record in enumerate(records, 1):
        trainer.progress.step = step
        trainer.on_validation({**record, "example": ""})
    p = trainer.progress
    assert p.best_step == best and p.best_bleu == records[best - 1]["dev_bleu"]
    assert p.bad_evals == 3 - best
    assert load_checkpoint(tmp_path / "run" / "best.pt")["progress"]["best_step"] == best
    trainer.metrics.close()


def test_a_run_saved_before_eval_metric_keeps_its_best_bleu(corpus, tiny_tokenizer_file, tmp_path):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 2, "train.eval_every": 2})
    train(config, tmp_path / "run")
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    del payload["progress"]["best_score"]  # an older checkpoint: its best was chosen by BLEU
    payload["progress"].update(best_bleu=7.0, best_step=3, step=4)
    save_checkpoint(tmp_path / "run" / "last.pt", payload)
    trainer = build_trainer(config, tmp_path / "run", resume=True)
    assert trainer.progress.best_score == 7.0  # brought up to date as the checkpoint loads
    trainer.on_validation({"dev_loss": 1.0, "dev_ppl": 2.7, "dev_bleu": 6.0, "dev_chrf": 40.0, "example": ""})
    assert trainer.progress.best_step == 3 and trainer.progress.bad_evals == 1
    trainer.metrics.close()


def test_label_smoothing_follows_its_definition():
    """Szegedy et al. (2016): (1 - e) x NLL of the gold token + e x the mean NLL over the vocabulary,
    summed over real target tokens (PAD is ignored)."""
    from translate.training import sequence_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9)
    target = torch.tensor([[5, 6, 7, PAD], [4, 8, PAD, PAD]])
    for eps in (0.0, 0.1, 0.3):
        expected = 0.0
        for b in range(2):
            for t in range(4):
                if target[b, t] == PAD:
                    continue
                logp = logits[b, t].log_softmax(-1)
                expected += (1 - eps) * -logp[target[b, t]] + eps * -logp.mean()
        torch.testing.assert_close(sequence_loss(logits, target, eps), expected)


def test_gradients_are_clipped_to_clip_norm(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.clip_norm": 0.05})
    trainer = build_trainer(config, tmp_path / "run")
    norms = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", step)
    batches = trainer.data.epoch_batches(0)
    for i in range(3):
        trainer.train_step(collate(trainer.data.src, trainer.data.tgt, batches[i]))
    assert len(norms) == 3 and all(n <= 0.05 * (1 + 1e-4) for n in norms)
    assert max(norms) > 0.049  # a random model's gradients are far larger: they were clipped, not small
    trainer.metrics.close()


def test_early_stopping_after_patience_validations_without_a_better_score(corpus, tiny_tokenizer_file, tmp_path,
                                                                          monkeypatch):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 100, "train.eval_every": 2,
                                                  "train.patience": 3})
    trainer = build_trainer(config, tmp_path / "run")
    scores = iter([5.0, 6.0, 6.0, 5.5, 6.0, 9.0])  # best at the 2nd validation, then 3 without better
    monkeypatch.setattr(trainer, "validate", lambda: {"dev_loss": 1.0, "dev_ppl": 2.7, "dev_bleu": next(scores),
                                                      "dev_chrf": 1.0, "example": ""})
    result = trainer.run()
    assert result.stop_reason == "early stopping: no better dev BLEU in 3 validations"
    assert result.progress.step == 10 and result.progress.best_step == 4



def test_validation_decodes_as_eval_does_by_default(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    """best.pt is chosen by the BLEU a user gets from `translate eval`, so validation decodes in
    eval's default precision, from the weights of the step it validates."""
    from translate import translator as translator_module
    from translate.translator import Translator

    trainer = build_trainer(tiny(corpus, tiny_tokenizer_file), tmp_path / "run")
    for default in ("int8", "fp32"):
        monkeypatch.setattr(translator_module, "CPU_PRECISION", default)
        as_eval = Translator(trainer.model, trainer.tokenizer, precision="auto")
        assert trainer.validator.translator().precision == as_eval.precision
    monkeypatch.setattr(translator_module, "CPU_PRECISION", "int8")
    first = trainer.validator.translator()
    if first.precision == "int8":  # a copy: made again at each validation, so it sees the new weights
        x = torch.randn(3, trainer.model.decoder.output.in_features)
        before = first.model.decoder.output(x)
        with torch.no_grad():
            trainer.model.decoder.output.weight.mul_(2)
        assert not torch.allclose(trainer.validator.translator().model.decoder.output(x), before, atol=1e-3)


def test_a_resumed_run_keeps_the_precision_it_saved(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    """train.amp=auto on a CPU is a timing (runtime.cpu_bf16_pays); a run resumed when the timing
    says otherwise keeps the precision its checkpoint saved, so exact resume does not switch it."""
    from translate import runtime

    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 2, "train.eval_every": 2, "train.amp": "auto",
                                                   "train.device": "cpu"})
    for pays, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda pays=pays: pays)
        result = train(config, tmp_path / f"pays-{pays}")
        saved = load_checkpoint(result.last_checkpoint)["precision"]
        assert saved == {"device": "cpu", "amp": "bf16" if pays else "off"}
        monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda pays=pays: not pays)  # the timing now says otherwise
        trainer = build_trainer(config.override({"train.max_steps": 3}), tmp_path / f"pays-{pays}", resume=True)
        assert trainer.amp_dtype is expected
        trainer.run()
        assert load_checkpoint(result.last_checkpoint)["precision"] == saved
    # a new run decides anew; an explicit train.amp is what it says
    assert build_trainer(config, tmp_path / "new").amp_dtype is torch.bfloat16
    assert build_trainer(config.override({"train.amp": "off"}), tmp_path / "off").amp_dtype is None


def test_every_rank_trains_in_the_precision_rank_0_decided(monkeypatch):
    from translate import build, runtime
    from translate.distributed import World
    from translate.errors import ConfigError

    cpu = torch.device("cpu")
    sent = []
    monkeypatch.setattr(build, "broadcast", lambda world, value: sent.append(value) or ("ok", "bf16"))
    monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda: pytest.fail("only rank 0 times the CPU"))
    assert build.training_precision(World(rank=1, size=2), cpu, "auto") is torch.bfloat16 and sent == [None]
    monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda: False)
    monkeypatch.setattr(build, "broadcast", lambda world, value: sent.append(value) or value)
    assert build.training_precision(World(rank=0, size=2), cpu, "auto") is None and sent[-1] == ("ok", "off")
    # a saved decision holds on the device type it was made for, not on another
    assert build.training_precision(World(), cpu, "auto", {"device": "cpu", "amp": "bf16"}) is torch.bfloat16
    assert build.training_precision(World(), cpu, "auto", {"device": "cuda", "amp": "fp16"}) is None
    # rank 0's error is every rank's
    monkeypatch.setattr(build, "broadcast", lambda world, value: ("error", "train.amp=fp16 needs a CUDA GPU"))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        build.training_precision(World(rank=1, size=2), cpu, "auto")


def test_fp16_gradients_that_stay_nan_stop_the_run(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    """A finite loss whose gradients are NaN: the loss scaler halves its scale at each such step,
    which is no non-finite step while the scale is above 1; below it they count, and the run stops
    after MAX_NONFINITE in a row instead of skipping steps until its limit."""
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 40, "train.eval_every": 100})
    trainer = build_trainer(config, tmp_path / "run")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    trainer.model.decoder.output.bias.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingError, match="5 non-finite steps in a row"):
        trainer.run()
    # 8, 4, 2: the scaler's calibration; then five steps at scale 1 and below
    assert trainer.progress.step == 3 + training.MAX_NONFINITE - 1  # (the last raises before it is counted)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_skipped_steps_leave_the_progress_window_and_metrics_stay_json(corpus, tiny_tokenizer_file, tmp_path,
                                                                       monkeypatch):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 6, "train.eval_every": 2})
    trainer = build_trainer(config, tmp_path / "run")
    real = training.sequence_loss
    nan_steps = {1, 3, 4}  # step 2's report covers steps 1-2, step 4's only skipped steps

    def loss(*args, **kwargs):
        return real(*args, **kwargs) * (float("nan") if trainer.progress.step + 1 in nan_steps else 1.0)

    monkeypatch.setattr(training, "sequence_loss", loss)
    trainer.run()

    def no_constants(name):
        raise AssertionError(f"{name} in metrics.jsonl: not JSON")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    reports = {r["step"]: r for r in (json.loads(line, parse_constant=no_constants) for line in lines)
               if r["kind"] == "train"}
    assert reports[2]["loss"] is not None and reports[2]["loss"] > 0  # step 2's own loss, no NaN mixed in
    assert reports[4]["loss"] is None and reports[4]["tok_per_s"] == 0  # nothing trained in that window
    assert reports[6]["loss"] > 0 and trainer.progress.nonfinite_steps == 0
