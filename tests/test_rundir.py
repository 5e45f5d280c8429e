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
    train(config, tmp_path / "run", log=lambda s: None)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(config, tmp_path / "run", log=lambda s: None)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(config, tmp_path / "empty", resume=True, log=lambda s: None)




def test_writes_stay_inside_the_run_directory(corpus, tiny_tokenizer_file, tmp_path):
    run_dir = tmp_path / "nested" / "run"
    sneaky = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 4, "train.eval_every": 2,
                                                   "data.test": str(tmp_path / ".." / "elsewhere.tsv")})
    before = set(tmp_path.parent.iterdir())
    train(sneaky, run_dir, log=lambda s: None)
    assert set(tmp_path.parent.iterdir()) == before
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    expected = {f"nested/run/{n}" for n in ("best.pt", "last.pt", "metrics.jsonl", "src.model", "tgt.model")}
    assert expected <= set(written) and set(written) - expected <= {"src.model", "tgt.model"}




def test_unwritable_run_directory(corpus, tiny_tokenizer_file, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write to run directory"):
        train(tiny(corpus, tiny_tokenizer_file), tmp_path / "file" / "run", log=lambda s: None)


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
