import dataclasses

import pytest

from translate.config import Config, load_config, parse_overrides, valid_keys
from translate.errors import ConfigError

REQUIRED_KEYS = ["model.cell", "model.embed_dim", "model.hidden_dim", "model.layers", "model.bidirectional",
                 "model.attention", "model.input_feeding", "model.dropout", "model.tie_embeddings",
                 "tokenizer.vocab_size", "train.batch_tokens", "train.lr", "train.max_steps",
                 "train.teacher_forcing", "train.eval_every", "train.seed", "train.scheduled_sampling"]


def test_required_keys_exist():
    assert set(REQUIRED_KEYS) <= set(valid_keys())


def test_overrides_are_typed():
    config = load_config(overrides=parse_overrides(["model.hidden_dim=256", "train.lr=1e-3",
                                                    "model.bidirectional=false", "model.cell=gru"]))
    assert config.model.hidden_dim == 256 and config.train.lr == 1e-3
    assert config.model.bidirectional is False and config.model.cell == "gru"


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().model.hidden_dim = 3


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.hiden_dim'; valid keys: .*model\.hidden_dim"):
        load_config(overrides={"model.hiden_dim": "3"})
    with pytest.raises(ConfigError, match="unknown config key 'nosuch'"):
        load_config(overrides={"nosuch": "3"})


@pytest.mark.parametrize("key,value,message", [
    ("model.layers", "two", "model.layers must be of type int"),
    ("model.cell", "rnn", "model.cell must be one of lstm, gru"),
    ("model.bidirectional", "maybe", "model.bidirectional must be of type bool"),
    ("train.lr", "-1", "train.lr must be positive"),
    ("model.dropout", "1.5", r"model.dropout must be in \[0, 1\)"),
    ("model.hidden_dim", "33", "must be even"),
])
def test_ill_typed_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={key: value})


def test_yaml_file_and_override_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_dim: 128\n  cell: gru\ntrain:\n  lr: 0.005\n")
    config = load_config(path, {"train.lr": "0.001"})
    assert (config.model.hidden_dim, config.model.cell, config.train.lr) == (128, "gru", 0.001)


def test_yaml_unknown_key_and_bad_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hiden: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.hiden'"):
        load_config(path)
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["model.hidden_dim"])


def test_round_trip_through_dict():
    config = load_config(overrides={"model.attention": "luong-general", "train.seed": "7"})
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("given,mode", [(True, "auto"), (False, "off"), ("true", "auto"), ("false", "off"),
                                        ("fp16", "fp16"), ("bf16", "bf16"), ("auto", "auto"), ("off", "off")])
def test_amp_takes_its_modes_and_the_booleans_of_earlier_versions(given, mode):
    assert Config.from_dict({"train": {"amp": given}}).train.amp == mode
    assert load_config(overrides={"train.amp": str(given)}).train.amp == mode


def test_amp_rejects_other_values():
    with pytest.raises(ConfigError, match="train.amp must be one of auto, bf16, fp16, off"):
        load_config(overrides={"train.amp": "fp8"})


@pytest.mark.parametrize("values,message", [
    ({"train.teacher_forcing": "linear", "train.tf_k": 0}, "tf_k must be positive for the linear"),
    ({"train.dist_timeout_minutes": 0}, "dist_timeout_minutes must be positive"),
    ({"train.init_vocab": "adapt"}, "init_vocab=adapt moves a trained model onto a new vocabulary; give the model"),
])
def test_values_that_would_fail_later_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=values)


@pytest.mark.parametrize("name", ["tiny-cpu", "default", "gpu-large"])
def test_the_presets_load(name):
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    config = load_config(preset)
    if name == "default":
        assert config == Config()  # the defaults written out: kept in step with the code
    if name == "tiny-cpu":
        assert config.model.hidden_dim < Config().model.hidden_dim and config.train.max_minutes == 1


def test_messages_show_paths_as_a_user_knows_them(tmp_path, monkeypatch):
    from translate.config import BUNDLED_DATA, shown_path

    assert shown_path(BUNDLED_DATA / "test.tsv") == "the bundled test.tsv"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.tsv").write_text("spa\teng\n")
    assert shown_path(tmp_path / "data" / "x.tsv") == "data/x.tsv"  # relative to where the user is
    assert shown_path("data/x.tsv") == "data/x.tsv"
    assert shown_path("/elsewhere/y.tsv") == "/elsewhere/y.tsv"


def test_resume_takes_the_limits_a_user_set_even_at_their_defaults(tmp_path):
    """A resumed run keeps its saved config but for the keys its user set; a key set to its default
    value is set all the same (``--max-minutes 25`` on a run saved with 60 trains for 25)."""
    from translate.config import TrainConfig, resume_config

    saved = Config.from_dict(load_config(overrides={"train.max_minutes": 60, "train.device": "cpu",
                                                    "train.max_steps": 500}).to_dict())
    defaults = Config().train
    given = load_config(overrides={"train.max_minutes": defaults.max_minutes, "train.device": defaults.device,
                                   "train.max_steps": defaults.max_steps})
    resumed = resume_config(given, saved)
    assert (resumed.train.max_minutes, resumed.train.device, resumed.train.max_steps) == (25.0, "auto", 0)
    untouched = resume_config(load_config(overrides={"train.max_steps": 600}), saved).train
    assert (untouched.max_minutes, untouched.device, untouched.max_steps) == (60.0, "cpu", 600)
    path = tmp_path / "c.yaml"  # a YAML file sets what it names
    path.write_text("train:\n  max_minutes: 25\n")
    assert resume_config(load_config(path), saved).train.max_minutes == 25
    # a config made with the constructors names no key: those unlike the defaults count as set
    assert resume_config(Config(train=TrainConfig(max_minutes=30)), saved).train.max_minutes == 30
    assert resume_config(Config(), saved) == saved
    # a key a resume may not change, set to its default against another saved value, is refused
    small = Config.from_dict(load_config(overrides={"model.hidden_dim": 256}).to_dict())
    with pytest.raises(ConfigError, match="model.hidden_dim=384 differs from the run's saved value 256"):
        resume_config(load_config(overrides={"model.hidden_dim": 384}), small)
    # a fine-tuning run's model.* and tokenizer.* are its source's: the defaults are no conflict, as
    # when it started (finetune_config)
    tuned = Config.from_dict(load_config(overrides={"model.hidden_dim": 256, "tokenizer.model": "src.model",
                                                    "train.init_from": "source.pt"}).to_dict())
    again = load_config(overrides={"model.hidden_dim": 384, "tokenizer.model": None, "train.init_from": "source.pt",
                                   "train.max_minutes": 25})
    assert resume_config(again, tuned).model.hidden_dim == 256 and resume_config(again, tuned).train.max_minutes == 25
    with pytest.raises(ConfigError, match="model.hidden_dim=128 differs"):
        resume_config(again.override({"model.hidden_dim": 128}), tuned)


def test_the_keys_given_are_not_config_keys():
    config = load_config(overrides={"train.lr": "0.001"}).override({"model.cell": "gru"})
    assert config.given == {"train.lr", "model.cell"} and "given" not in config.to_dict()
    assert config == Config.from_dict(config.to_dict())  # compared by value, not by what set it
    with pytest.raises(ConfigError, match="unknown config key 'given'"):
        Config.from_dict({"given": ["train.lr"]})
