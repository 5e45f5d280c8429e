import json

import pytest
from click.testing import CliRunner

from translate.build import train
from translate.cli import main
from translate.errors import CheckpointError
from translate.rundir import MetricsLog, ProgressLine, open_run_dir

from .conftest import cli_train_args, tiny


def test_refuses_to_overwrite_a_run(corpus, tiny_tokenizer_file, tmp_path):
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 2, "train.eval_every": 2})
    train(config, tmp_path / "run")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(config, tmp_path / "run")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(config, tmp_path / "empty", resume=True)




def test_writes_stay_inside_the_run_directory(corpus, tokenizer, tmp_path, hf_cache):
    """A run writes its run directory and the datasets cache, nothing else: not beside its data or
    tokenizer files, not above the run directory (whose path here climbs out and back in)."""
    import shutil

    data, tok = tmp_path / "data", tmp_path / "tok"
    data.mkdir()
    tok.mkdir()
    for name in ("train", "dev"):
        shutil.copy(corpus[name], data / f"{name}.tsv")
    tokenizer.save(tok)
    config = tiny(corpus, str(tok / "src.model"), **{"train.max_steps": 4, "train.eval_every": 2,
                                                     "data.train": str(data / "train.tsv"),
                                                     "data.dev": str(data / "dev.tsv"),
                                                     "data.test": str(tmp_path / ".." / "elsewhere.tsv")})
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    outside = set(tmp_path.parent.iterdir())
    run_dir = tmp_path / "nested" / ".." / "nested" / "run"
    train(config, run_dir)
    assert set(tmp_path.parent.iterdir()) == outside
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    changed = sorted(p.relative_to(tmp_path).as_posix() for p in after
                     if before.get(p) != after[p] and not p.is_relative_to(hf_cache))
    assert changed == [f"nested/run/{n}" for n in ("best.pt", "config.yaml", "last.pt", "metrics.jsonl", "src.model",
                                                   "tgt.model", "train.log")]
    assert any(hf_cache.rglob("*.arrow"))  # the cache is where the datasets cache was set to be


def test_unwritable_run_directory(corpus, tiny_tokenizer_file, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write to run directory"):
        train(tiny(corpus, tiny_tokenizer_file), tmp_path / "file" / "run")


def test_open_run_dir_new_and_resume(tmp_path):
    assert open_run_dir(tmp_path / "a" / "b", resume=False) is None and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the write probe leaves nothing
    with pytest.raises(CheckpointError, match="nothing to resume"):
        open_run_dir(tmp_path / "a" / "b", resume=True)


def test_metrics_log_appends_one_object_a_line(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"kind": "train", "step": 1, "loss": 2.5})
    log.close()
    log = MetricsLog(tmp_path)  # a resumed run appends
    log.write({"kind": "dev", "step": 2, "dev_bleu": 1.0})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_progress_line_logs_when_not_on_a_terminal(capsys):
    lines = []
    line = ProgressLine(lines.append, in_place=False)
    line.show("step 1")
    line.clear()
    assert lines == ["step 1"] and line.interval == 30.0 and capsys.readouterr().err == ""
    in_place = ProgressLine(lines.append, in_place=True)
    in_place.show("step 2")
    in_place.clear()
    assert lines == ["step 1"] and capsys.readouterr().err == "\r\033[Kstep 2\r\033[K"


def test_tensorboard_event_files(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = cli_train_args(corpus, tmp_path / "tb", **{"train.max_steps": 10, "train.tensorboard": "true",
                                                       "train.eval_every": 5})
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/tf_ratio", "dev/dev_bleu", "dev/dev_loss"} <= tags
    assert [e.step for e in events.Scalars("dev/dev_bleu")] == [5, 10]


def test_the_run_directory_keeps_its_config_and_log(corpus, tiny_tokenizer_file, tmp_path):
    from translate.config import load_config

    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 4, "train.eval_every": 2})
    train(config, tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.yaml") == config  # usable with --config
    first = (tmp_path / "run" / "train.log").read_text(encoding="utf-8").splitlines()
    assert any("dev loss" in line for line in first) and "done: reached max_steps=4" in first[-1]
    longer = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 6, "train.eval_every": 2})
    train(longer, tmp_path / "run", resume=True)
    assert load_config(tmp_path / "run" / "config.yaml").train.max_steps == 6
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8").splitlines()
    assert log[: len(first)] == first and any("resumed" in line for line in log[len(first):])
    assert "done: reached max_steps=6" in log[-1]
