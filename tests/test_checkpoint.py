import json
import os

import pytest
import torch
from click.testing import CliRunner

from translate.build import train
from translate.checkpoint import (
    CheckpointSaver,
    Progress,
    load_checkpoint,
    load_model,
    restore_training_state,
    save_checkpoint,
    step_checkpoints,
)
from translate.cli import main
from translate.errors import CheckpointError

from .conftest import tiny


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "config": {}})
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "config": {}})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "translate-checkpoint", "version": 1, "model": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.ones(1000)}, "config": {}})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a translate checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no best.pt or last.pt"):
        load_checkpoint(tmp_path)




def test_checkpoint_with_mismatched_tokenizer(corpus, tiny_tokenizer_file, tmp_path):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 2, "train.eval_every": 2})
    train(config, tmp_path / "run")
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    payload["tokenizer_fingerprint"] = "0" * 16
    save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in payload.items() if k not in ("format", "version")})
    with pytest.raises(CheckpointError, match="tokenizer does not match"):
        load_model(tmp_path / "bad.pt")


def test_saver_writes_last_best_and_rotates_step_weights(tmp_path):
    saver = CheckpointSaver(tmp_path, keep=2)
    for step in (10, 20, 30):
        payload = {"model": {"w": torch.full((2,), float(step))}, "config": {}, "optimizer": {"state": {}},
                   "lr_schedule": {}, "scaler": {}, "rng": {}, "progress": {"step": step}}
        saver.save(payload, best=step == 20)
        saver.keep_weights(payload, step)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-20.pt", "step-30.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["step"] == 30
    assert load_checkpoint(tmp_path / "best.pt")["progress"]["step"] == 20
    light = load_checkpoint(tmp_path / "step-30.pt")
    assert set(light) == {"format", "version", "model", "config", "progress"}
    CheckpointSaver(tmp_path / "none", keep=0).keep_weights(payload, 40)  # keeps nothing, writes nothing
    assert not (tmp_path / "none").exists()


def test_progress_round_trips_through_a_checkpoint(tmp_path):
    from dataclasses import asdict

    progress = Progress(step=7, epoch=1, best_bleu=3.5, elapsed=12.25, tf_ratio=0.9)
    save_checkpoint(tmp_path / "p.pt", {"progress": asdict(progress)})
    assert Progress(**load_checkpoint(tmp_path / "p.pt")["progress"]) == progress


def test_keep_checkpoints_keeps_the_newest(run_with_steps):
    assert sorted(p.name for p in run_with_steps.glob("step-*.pt")) == ["step-20.pt", "step-30.pt"]
    light = load_checkpoint(run_with_steps / "step-20.pt")
    assert "optimizer" not in light and light["progress"]["step"] == 20
    load_model(run_with_steps / "step-20.pt")  # decodable on its own


def test_average_is_the_mean_of_the_weights(run_with_steps, tmp_path):
    out = tmp_path / "avg.pt"
    result = CliRunner().invoke(main, ["average", str(run_with_steps), "--last", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "averaged 2 checkpoints (step-20.pt, step-30.pt)" in result.output
    a, b = (load_checkpoint(run_with_steps / f"step-{n}.pt")["model"] for n in (20, 30))
    averaged = load_checkpoint(out)["model"]
    for name, value in averaged.items():
        torch.testing.assert_close(value, (a[name] + b[name]) / 2, msg=name)
    model, _, _, _ = load_model(out)
    decoded = CliRunner().invoke(main, ["decode", str(out), "--beam", "2"], input="El gato come pan.\n")
    assert decoded.exit_code == 0 and decoded.output.strip()


def test_average_without_step_checkpoints_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["average", str(tmp_path)])
    assert result.exit_code == 2 and "train.keep_checkpoints" in result.output and "Traceback" not in result.output


def test_info_text_and_json(run_with_steps):
    text = CliRunner().invoke(main, ["info", str(run_with_steps)])
    assert text.exit_code == 0, text.output
    assert "parameters" in text.output and "best dev BLEU" in text.output
    assert "lstm" in text.output and "luong decoder" in text.output
    raw = CliRunner().invoke(main, ["info", str(run_with_steps / "last.pt"), "--json"])
    details = json.loads(raw.output)
    assert details["step"] == 30 and details["parameters"] > 0 and details["config"]["train"]["keep_checkpoints"] == 2
    assert details["src_vocab"] == details["tgt_vocab"] and details["joint_vocab"] is True
    assert details["shortlist_lexicon"] is True and "shortlists      from its lexicon" in text.output
    assert details["source_words"] > 0 and f"sources {details['source_words']} words or fewer" in text.output


def test_resuming_with_fp16_a_run_that_had_no_loss_scale(tmp_path):
    """A run trained on CPU or in bf16 saved an empty scaler state; resumed where fp16 is chosen,
    the scaler starts afresh instead of failing to load it."""
    from translate.config import load_config
    from translate.runtime import rng_state
    from translate.schedules import LRSchedule

    cpu = torch.device("cpu")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    schedule = LRSchedule(load_config().train, 1e-3)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_schedule": schedule.state_dict(),
               "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "rng": rng_state(cpu),
               "progress": {"step": 3}}
    assert payload["scaler"] == {}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    progress = restore_training_state(payload, model, optimizer, schedule, scaler, cpu)
    assert progress.step == 3 and scaler.get_scale() == 1024.0


def test_progress_saved_before_eval_metric_is_brought_up_to_date():
    """An earlier version chose the best validation by BLEU and saved no ``best_score``."""
    from translate.checkpoint import saved_progress

    old = {"step": 40, "best_bleu": 7.5, "best_step": 30}
    assert saved_progress(old).best_score == 7.5
    assert saved_progress({"step": 0}).best_score is None  # no validation yet
    assert saved_progress({**old, "best_score": -2.0}).best_score == -2.0  # train.eval_metric=loss
