"""Model tools: checkpoint info and averaging."""

import json

import pytest
import torch
from click.testing import CliRunner

from translate.checkpoint import load_checkpoint, load_model
from translate.cli import main

from .conftest import tiny_overrides


@pytest.fixture(scope="module")
def run_with_steps(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("avg") / "run"
    args = ["train", "--train", str(corpus["train"]), "--dev", str(corpus["dev"]), "--run-dir", str(run_dir),
            "--max-steps", "30"]
    for key, value in {**tiny_overrides(corpus), "train.eval_every": 10, "train.keep_checkpoints": 2}.items():
        if key not in ("data.train", "data.dev", "train.max_steps"):
            args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return run_dir


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
    assert "parameters" in text.output and "best dev BLEU" in text.output and "lstm" in text.output
    raw = CliRunner().invoke(main, ["info", str(run_with_steps / "last.pt"), "--json"])
    details = json.loads(raw.output)
    assert details["step"] == 30 and details["parameters"] > 0 and details["config"]["train"]["keep_checkpoints"] == 2
    assert details["src_vocab"] == details["tgt_vocab"] and details["joint_vocab"] is True


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("translate, version ")


def test_quiet_and_verbose_training(corpus, tmp_path):
    base = ["train", "--train", str(corpus["train"]), "--dev", str(corpus["dev"]), "--max-steps", "2"]
    for key, value in tiny_overrides(corpus).items():
        if key not in ("data.train", "data.dev", "train.max_steps"):
            base += ["--set", f"{key}={value}"]
    quiet = CliRunner().invoke(main, ["--quiet", *base, "--run-dir", str(tmp_path / "q")])
    assert quiet.exit_code == 0, quiet.output
    assert "done:" in quiet.output and "training pairs" not in quiet.output
    verbose = CliRunner().invoke(main, ["--verbose", *base, "--run-dir", str(tmp_path / "v")])
    assert verbose.exit_code == 0 and "configuration:" in verbose.output and "hidden_dim: 32" in verbose.output
    normal = CliRunner().invoke(main, [*base, "--run-dir", str(tmp_path / "n")])
    assert "training pairs" in normal.output and "configuration:" not in normal.output


def test_plot_and_attend_write_pngs(run_with_steps, tmp_path):
    curves = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(run_with_steps), "-o", str(curves)])
    assert result.exit_code == 0, result.output
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000
    heat = tmp_path / "attn.png"
    result = CliRunner().invoke(main, ["attend", str(run_with_steps), "El gato come pan.", "-o", str(heat)])
    assert result.exit_code == 0, result.output
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(main, ["plot", str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert missing.exit_code == 2 and "no metrics file" in missing.output


def test_tensorboard_event_files(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "--train", str(corpus["train"]), "--dev", str(corpus["dev"]), "--max-steps", "10",
            "--run-dir", str(tmp_path / "tb"), "--set", "train.tensorboard=true", "--set", "train.eval_every=5"]
    for key, value in tiny_overrides(corpus).items():
        if key not in ("data.train", "data.dev", "train.max_steps", "train.eval_every"):
            args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/tf_ratio", "dev/dev_bleu", "dev/dev_loss"} <= tags
    assert [e.step for e in events.Scalars("dev/dev_bleu")] == [5, 10]
