"""Typed configuration: frozen dataclasses built from YAML and ``--set key=value`` overrides.

An unknown or ill-typed key is an error that names the valid keys, never silently ignored.
The resolved config is stored inside every checkpoint (``Config.to_dict``), so a checkpoint
alone can rebuild its model and tokenizer.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import math
import re
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DATA = PACKAGE_DIR / "bundled"  # the split of data/README.md, installed with the package


def shown_path(path: str | Path) -> str:
    """A path as messages show it: a relative one as given, an absolute one in the bundled split by
    name or under the working directory relative to it, any other as it is (so messages do not
    carry one machine's install paths)."""
    path = Path(path)
    if not path.is_absolute():  # as the user typed it
        return str(path)
    absolute = path.resolve() if path.exists() else path
    if absolute.is_relative_to(BUNDLED_DATA.resolve()):
        return f"the bundled {absolute.relative_to(BUNDLED_DATA.resolve()).as_posix()}"
    if path.is_absolute() and absolute.is_relative_to(Path.cwd()):
        return absolute.relative_to(Path.cwd()).as_posix()
    return str(path)


@dataclass(frozen=True)
class DataConfig:
    """The corpora and their languages."""

    # the training corpus (as --train): a TSV/CSV/JSON-lines file with one column per language, a prefix `PATH`
    # of plain-text files `PATH.<src_lang>` and `PATH.<tgt_lang>`, or a hub dataset (`NAME` or `NAME:CONFIG`)
    train: str = str(BUNDLED_DATA / "train.tsv")
    dev: str = str(BUNDLED_DATA / "dev.tsv")  # validated on during training (as --dev), in the same forms
    test: str = str(BUNDLED_DATA / "test.tsv")  # what `translate eval` scores by default
    src_lang: str = "spa"  # the source language: a column name or a file suffix
    tgt_lang: str = "eng"  # the target language: a column name or a file suffix
    max_len: int = 80  # training pairs with more pieces on either side are dropped
    num_proc: int = 0  # processes that tokenize the training corpus (0: one per CPU, up to 8)
    streaming: bool = False  # read the training corpus as a stream, never materialised
    # mixed fine-tuning (Chu et al., 2017): a second training corpus, in the forms of data.train (e.g. the data
    # a model given with train.init_from was trained on), of which each epoch trains on a fresh random sample
    mix: str | None = None
    # (data.mix) tokens of the mixed corpus per token of data.train in each epoch (as many pairs as that takes);
    # 1: Tatoeba keeps its test BLEU while a model learns the Bible (docs/training.md); 0: none
    mix_ratio: float = 1.0
    # more dev sets, in the forms of data.dev (or `PATH.{SRC,TGT}` for text files with other suffixes), decoded
    # and scored at every validation as the dev set is (as further --dev), logged under their file names
    extra_dev: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenizerConfig:
    """The SentencePiece tokenizer a run trains (or is given)."""

    type: Literal["unigram", "bpe"] = "unigram"  # SentencePiece's model type
    vocab_size: int = 8000  # pieces in the vocabulary (in each, when not joint)
    joint: bool = True  # one vocabulary for both languages
    character_coverage: float = 1.0  # the share of the corpus's characters the pieces cover (SentencePiece's)
    model: str | None = None  # an existing SentencePiece .model (joint) to use instead of training one
    max_sentences: int = 400_000  # sentences sampled to train the tokenizer


@dataclass(frozen=True)
class ModelConfig:
    """The network: encoder, attention and decoder."""

    cell: Literal["lstm", "gru"] = "lstm"  # the RNN cell of encoder and decoder
    embed_dim: int = 256  # embedding size
    hidden_dim: int = 384  # decoder size; a bidirectional encoder uses hidden_dim // 2 per direction
    layers: int = 1  # encoder and decoder layers
    bidirectional: bool = True  # a bidirectional encoder
    # the attention score: additive (bahdanau), luong-dot or luong-general
    attention: Literal["bahdanau", "luong-dot", "luong-general"] = "bahdanau"
    # luong: the RNN steps, then attends with its new state (Luong et al. 2015); bahdanau: attends with the
    # previous state, feeds the context into the RNN with the previous token, and predicts from a deep-output
    # readout (Bahdanau et al. 2015), stepping token by token in training
    decoder: Literal["luong", "bahdanau"] = "luong"
    # (luong decoder) feed the attentional vector to the RNN (Luong et al. 2015), stepping token by token in
    # training; choosing decoder=bahdanau without also setting this turns it off (that decoder feeds its
    # context instead)
    input_feeding: bool = True
    layer_norm: bool = False  # LayerNorm over the encoder's and decoder's RNN outputs
    dropout: float = 0.15  # dropout probability
    tie_embeddings: bool = True  # share the target embedding with the output layer (Press & Wolf 2017)
    bridge: bool = True  # start the decoder from the encoder's final states (through a tanh layer); false: zeros
    # above 0: every weight uniform in +-init_uniform (OpenNMT-py's param_init), padding embeddings
    # zero; 0: each layer's own PyTorch initialisation
    init_uniform: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """The training run: batches, optimiser, limits, validation, teacher forcing, devices."""

    batch_tokens: int = 1500  # padded tokens per batch (batches are bucketed by length)
    accumulate: int = 1  # batches whose gradients add up to one optimiser step (per process)
    lr: float = 3e-3  # Adam's peak learning rate, before lr_scaling
    # the LR grows with the batches a step sees (accumulate x processes): `lr * n ** 0.5` for sqrt
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    # linear: down to min_lr over max_steps, else over max_minutes; warmup-decay: up over lr_warmup steps, then
    # the inverse square root of the step (Vaswani et al. 2017); plateau: times lr_decay when the dev score has
    # not improved for more than lr_patience validations; constant: lr throughout
    lr_schedule: Literal["linear", "plateau", "warmup-decay", "constant"] = "linear"
    lr_warmup: int = 500  # (warmup-decay) steps of linear warm-up
    lr_decay: float = 0.5  # (plateau) the factor the rate is multiplied by
    lr_patience: int = 2  # (plateau) validations without improvement before the rate falls
    min_lr: float = 1e-5  # (linear, plateau) the rate never goes below this
    clip_norm: float = 1.0  # gradients are clipped to this norm
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy loss
    max_steps: int = 0  # stop after this many optimiser steps; 0: no limit
    max_epochs: int = 0  # stop after this many passes over the training data; 0: no limit
    max_minutes: float = 25.0  # stop after this many minutes of training; 0: no limit
    eval_every: int = 500  # steps between validations
    keep_checkpoints: int = 0  # also keep the weights of the last K validations as step-N.pt (for averaging)
    tensorboard: bool = False  # also write TensorBoard event files into RUN_DIR/tensorboard (needs the extra)
    # at the end of training, fit the confidence calibrator (confidence.py) on the dev set decoded as `translate
    # decode` decodes by default, into best.pt (else last.pt); `translate calibrate` fits it afterwards
    calibrate: bool = True
    eval_beam: int = 1  # beam of the dev decoding (5: pick best.pt as `translate eval` decodes by default)
    eval_metric: Literal["bleu", "chrf", "loss"] = "bleu"  # what makes a validation the best, and early stopping
    patience: int = 8  # validations without a better dev BLEU before stopping; 0: never
    seed: int = 1234  # the random seed of the run
    # the schedule of the gold token's probability after tf_warmup (docs/training.md); plain teacher forcing by
    # default: no schedule beat it at the default budget (docs/benchmarks.md, "Does scheduled teacher forcing pay?")
    teacher_forcing: Literal["constant", "linear", "exponential", "inverse_sigmoid"] = "constant"
    tf_start: float = 1.0  # constant ratio, and the start of the linear schedule
    tf_floor: float = 0.75  # no schedule goes below this
    tf_k: float = 300.0  # steps per unit fall (linear), base (exponential) or steepness (inverse sigmoid)
    tf_warmup: int = 1000  # steps of pure teacher forcing before the schedule starts
    tf_granularity: Literal["token", "sentence"] = "token"  # one draw per token, or one per sentence
    # the prediction chance also grows with the target position (Liu et al., 2021b); none: it does not
    tf_position: Literal["none", "linear", "exponential", "inverse_sigmoid"] = "none"
    tf_position_k: float = 10.0  # positions to full weight (linear), base (exponential), steepness (inverse sigmoid)
    # where predictions go: random (by the schedules above) or where the model is confident (Liu et al., 2021a)
    tf_select: Literal["random", "confidence"] = "random"
    tf_confidence: float = 0.9  # (confidence) a prediction where the gold token's probability is at least this
    tf_noise: float = 1.0  # (confidence) a random token where it is above this; 1.0: never
    # what is fed: the argmax, a sample at temperature tf_tau (Gumbel-max), or the sentence-level oracle
    # (the best by sentence BLEU of tf_oracle_beam beam candidates of the gold length; Zhang et al., 2019)
    tf_feed: Literal["argmax", "sample", "sentence"] = "argmax"
    tf_tau: float = 1.0  # (sample) the temperature
    tf_oracle_beam: int = 4  # (sentence) the beam candidates the oracle chooses from
    # parallel (Duckworth et al., 2019): passes without gradient predict every position, then one trained pass
    # reads the mixed inputs; sequential: exact, token by token
    scheduled_sampling: Literal["sequential", "parallel"] = "parallel"
    tf_passes: int = 1  # (parallel) passes that predict before the trained one (Duckworth et al., 2019)
    # a final phase: the share of the run's budget (of max_steps, else of max_minutes) at its end in which the
    # teacher-forcing schedule runs, stretched over the phase to reach tf_floor at its end (tf_warmup and the step
    # counts of tf_k do not apply); plain teacher forcing before it; 0: the schedule counts steps from the start
    tf_phase: float = 0.0
    # the training objective: mle (cross-entropy of the gold tokens, with the teacher-forcing keys above) or mrt,
    # minimum risk training (Shen et al., 2016): the expected risk over the model's own candidates, a fine-tuning
    # objective (docs/training.md); mrt uses no label smoothing and no teacher-forcing schedule
    objective: Literal["mle", "mrt"] = "mle"
    mrt_samples: int = 4  # (mrt) candidates sampled from the model per source sentence
    # (mrt) how the mrt_samples candidates are found: samples of the model's distribution (Shen et al. 2016), or
    # the n-best of a beam search that wide, without length penalty
    mrt_search: Literal["sample", "beam"] = "sample"
    mrt_reference: bool = False  # (mrt) the reference is a candidate too
    mrt_greedy: bool = False  # (mrt) the greedy translation is a candidate too
    mrt_alpha: float = 0.005  # (mrt) smoothness: Q(y|x) is proportional to p(y|x) ** mrt_alpha over the candidates
    # (mrt) the risk, 1 - metric / 100: sentence BLEU (sacrebleu, exponential smoothing) or chrF, on detokenized text
    mrt_metric: Literal["bleu", "chrf"] = "bleu"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when a GPU is visible, else the CPU
    # mixed precision. auto: bf16 on GPUs and CPUs with native bf16, fp16 (with loss scaling) on older
    # GPUs, none on other CPUs; bf16, fp16: that type (fp16 on CUDA only); off: full precision (docs/training.md)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    dist_timeout_minutes: float = 120.0  # (torchrun) how long a rank waits for the others (rank 0 prepares data)
    threads: int = 0  # CPU threads; 0: torch's default
    # fine-tune a trained model (as --init-from): a checkpoint, a run directory (its best.pt) or a folder of
    # `translate export`, whose weights, tokenizer and model.* / tokenizer.* config the run starts from (all but
    # model.dropout, which the run may set), with a fresh optimiser, LR schedule, step count and budget; none: a
    # model of its own from scratch
    init_from: str | None = None
    # (init_from) the vocabulary. keep: the source's tokenizer; adapt (--adapt-vocab): a new one trained on this
    # run's data (and its data.mix share) with the source's tokenizer.* settings, or tokenizer.model; pieces the
    # two share keep their trained rows, new ones start from the pieces the old tokenizer splits them into
    # (vocabulary.py): for a large new corpus, where the old pieces cut its words short (docs/training.md)
    init_vocab: Literal["keep", "adapt"] = "keep"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the dotted keys a source set (a YAML file, --set, a flag, ``override``), whatever their values: a resumed
    # run takes these from the command line even where they equal the defaults (not a key of any file)
    given: frozenset[str] = field(default=frozenset(), init=False, compare=False, repr=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (tuples as lists), as YAML and JSON write it."""
        return {section: {key: list(value) if isinstance(value, tuple) else value
                          for key, value in dataclasses.asdict(getattr(self, section)).items()}
                for section in SECTIONS}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """A config from plain data; every key ``raw`` holds counts as given."""
        given = frozenset(f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict)
                          for key in values) if isinstance(raw, dict) else frozenset()
        return cls._from_raw(raw)._given(given)

    @classmethod
    def _from_raw(cls, raw: dict[str, Any]) -> Config:
        model = raw.get("model") if isinstance(raw, dict) else None
        if isinstance(model, dict) and _bahdanau_alone(model.get("decoder"), "input_feeding" in model):
            raw = {**raw, "model": {**model, "input_feeding": False}}
        return _build(cls, raw, "")

    def _given(self, keys: frozenset[str]) -> Config:
        """This config, with ``keys`` as the keys its sources set (set once, on a new object)."""
        object.__setattr__(self, "given", frozenset(keys))
        return self

    def set_keys(self) -> frozenset[str]:
        """The keys a user set: those a source named (``given``), and those unlike the defaults (a
        config built with the dataclasses' constructors names none)."""
        defaults, values = Config().to_dict(), self.to_dict()
        return self.given | {f"{section}.{key}" for section, items in values.items() for key, value in items.items()
                             if value != defaults[section][key]}

    def override(self, pairs: dict[str, Any]) -> Config:
        """Returns a copy with dotted keys (``model.hidden_dim``) replaced, type-checked; they count
        as given (``given``), with those given before."""
        raw = self.to_dict()
        for key, value in pairs.items():
            section, _, name = key.partition(".")
            if section not in raw or not name:
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
            if name not in raw[section]:
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
            raw[section][name] = value
        if _bahdanau_alone(pairs.get("model.decoder"), "model.input_feeding" in pairs):
            raw["model"]["input_feeding"] = False
        config = Config._from_raw(raw)._given(self.given | frozenset(pairs))
        config.validate()
        return config

    def validate(self) -> None:
        m, t = self.model, self.train
        positive = {
            "model.embed_dim": m.embed_dim, "model.hidden_dim": m.hidden_dim, "model.layers": m.layers,
            "tokenizer.vocab_size": self.tokenizer.vocab_size, "train.batch_tokens": t.batch_tokens,
            "train.eval_every": t.eval_every, "train.eval_beam": t.eval_beam, "data.max_len": self.data.max_len,
            "train.accumulate": t.accumulate,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if m.bidirectional and m.hidden_dim % 2:
            raise ConfigError(f"model.hidden_dim must be even for a bidirectional encoder, got {m.hidden_dim}")
        if m.decoder == "bahdanau" and m.input_feeding:
            raise ConfigError("model.input_feeding belongs to the Luong decoder (the Bahdanau decoder already feeds "
                              "its context to the RNN); set model.input_feeding=false or model.decoder=luong")
        if not 0 <= m.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
        if not (math.isfinite(m.init_uniform) and m.init_uniform >= 0):
            raise ConfigError(f"model.init_uniform must be 0 (PyTorch's initialisation) or a positive bound, "
                              f"got {m.init_uniform}")
        if not 0 <= t.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
        if not 0 <= t.tf_floor <= 1 or not 0 <= t.tf_start <= 1:
            raise ConfigError("train.tf_start and train.tf_floor must be probabilities in [0, 1]")
        if t.teacher_forcing == "exponential" and not 0 < t.tf_k <= 1:
            raise ConfigError(f"train.tf_k must be in (0, 1] for the exponential schedule, got {t.tf_k}")
        if t.teacher_forcing == "inverse_sigmoid" and t.tf_k < 1:
            raise ConfigError(f"train.tf_k must be >= 1 for the inverse_sigmoid schedule, got {t.tf_k}")
        if t.tf_position == "exponential" and not 0 < t.tf_position_k < 1:
            raise ConfigError(f"train.tf_position_k must be in (0, 1) for the exponential position schedule, "
                              f"got {t.tf_position_k}")
        if t.tf_position in ("linear", "inverse_sigmoid") and t.tf_position_k <= 0:
            raise ConfigError(f"train.tf_position_k must be positive, got {t.tf_position_k}")
        if not 0 <= t.tf_confidence <= 1 or not 0 <= t.tf_noise <= 1:
            raise ConfigError("train.tf_confidence and train.tf_noise must be probabilities in [0, 1]")
        if not (math.isfinite(t.tf_tau) and t.tf_tau > 0):
            raise ConfigError(f"train.tf_tau must be a positive number, got {t.tf_tau}")
        if t.tf_oracle_beam < 1 or t.tf_passes < 1:
            raise ConfigError("train.tf_oracle_beam and train.tf_passes must be at least 1")
        if t.tf_feed == "sentence" and t.scheduled_sampling != "parallel":
            raise ConfigError("train.tf_feed=sentence chooses whole candidate sentences, so it needs "
                              "train.scheduled_sampling=parallel")
        self._validate_phase_and_objective()
        if t.teacher_forcing == "linear" and t.tf_k <= 0:
            raise ConfigError(f"train.tf_k must be positive for the linear schedule, got {t.tf_k}")
        if t.dist_timeout_minutes <= 0:
            raise ConfigError(f"train.dist_timeout_minutes must be positive, got {t.dist_timeout_minutes}")
        if t.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {t.lr}")
        if not (math.isfinite(self.data.mix_ratio) and self.data.mix_ratio >= 0):
            raise ConfigError(f"data.mix_ratio must be 0 or more (tokens of the mixed corpus per new token), "
                              f"got {self.data.mix_ratio}")
        if t.init_vocab == "adapt" and not t.init_from:
            raise ConfigError("train.init_vocab=adapt moves a trained model onto a new vocabulary; give the model "
                              "with --init-from, or drop train.init_vocab")
        if self.data.mix and self.data.streaming:
            raise ConfigError("data.mix samples the mixed corpus anew each epoch, which a stream cannot; "
                              "drop data.streaming (--streaming) or data.mix (--mix)")

    def _validate_phase_and_objective(self) -> None:
        """The final phase of scheduled teacher forcing and minimum risk training."""
        t = self.train
        if not 0 <= t.tf_phase <= 1:
            raise ConfigError(f"train.tf_phase must be a share of the budget in [0, 1], got {t.tf_phase}")
        if t.tf_phase > 0 and not (t.max_steps or t.max_minutes):
            raise ConfigError("train.tf_phase is a share of the run's budget: it needs train.max_steps or "
                              "train.max_minutes (--max-steps, --max-minutes)")
        if t.tf_phase > 0 and t.teacher_forcing in ("exponential", "inverse_sigmoid") and t.tf_floor <= 0:
            raise ConfigError(f"train.tf_phase stretches the {t.teacher_forcing} schedule to reach train.tf_floor "
                              f"at the phase's end, which it never does at 0; set train.tf_floor above 0")
        if t.objective == "mrt":
            if t.mrt_samples < 0 or t.mrt_samples + t.mrt_reference + t.mrt_greedy < 1:
                raise ConfigError("train.objective=mrt needs at least one candidate: train.mrt_samples >= 1, or "
                                  "train.mrt_reference or train.mrt_greedy")
            if not (math.isfinite(t.mrt_alpha) and t.mrt_alpha > 0):
                raise ConfigError(f"train.mrt_alpha must be a positive number, got {t.mrt_alpha}")
            if t.tf_phase > 0 or t.teacher_forcing != "constant" or t.tf_start < 1:
                raise ConfigError("train.objective=mrt trains on the model's own translations, with no "
                                  "teacher-forcing schedule: drop train.tf_phase and train.teacher_forcing")


def _bahdanau_alone(decoder: Any, sets_feeding: bool) -> bool:
    """Whether a source picks the Bahdanau decoder without saying anything of input feeding, which
    is on by default but belongs to the Luong decoder: then it is turned off, not an error."""
    return isinstance(decoder, str) and decoder.strip().lower() == "bahdanau" and not sets_feeding


SECTIONS = {"data": DataConfig, "tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig}


def valid_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# values that earlier versions wrote (and that --set may still give) for keys whose type changed since
ALIASES = {"train.amp": {True: "auto", False: "off", "true": "auto", "false": "off"}}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {prefix or 'top level'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            aliases = ALIASES.get(f"{prefix}{name}", {})
            if isinstance(value, (bool, str)):
                value = aliases.get(value.lower() if isinstance(value, str) else value, value)
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is tuple:  # tuple[str, ...]: a list, or one string of items separated by commas (not in `{,}`)
        items = ([item.strip() for item in re.split(r",(?![^{}]*\})", value) if item.strip()]
                 if isinstance(value, str) else value)
        if isinstance(items, (list, tuple)):
            return tuple(_coerce(item, args[0], key) for item in items)
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if isinstance(value, str) and hint in (int, float):
        try:
            value = float(value) if hint is float else int(value)
        except ValueError:
            pass
    elif isinstance(value, str) and hint is bool:
        value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
            value.strip().lower(), value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r}")


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Parses ``KEY=VALUE`` strings from ``--set``; values are typed later against the field."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (for example model.hidden_dim=256), got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then a YAML file, then ``--set`` overrides (later wins)."""
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found; check the --config path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" line {where.line + 1}" if where else ""
            raise ConfigError(f"config file {path}{line} is not valid YAML; fix the syntax") from None
        config = Config.from_dict(raw or {})
    config = config.override(overrides or {})
    return config


# the keys a resumed run may change: how long it runs and where, not what it trains
RESUMABLE_KEYS = ("max_steps", "max_epochs", "max_minutes", "patience", "eval_every", "keep_checkpoints", "device",
                  "threads", "dist_timeout_minutes")


def resume_config(given: Config, saved: Config) -> Config:
    """The config of a resumed run: the saved one, with the run's limits (and where it runs) taken
    from ``given`` where its user set them (``Config.set_keys``: an explicit value equal to the
    default counts). Any other key set to a value unlike the saved one is an error, not ignored."""
    given_raw, saved_raw, set_keys = given.to_dict(), saved.to_dict(), given.set_keys()
    defaults = Config().to_dict()
    changed = {}
    for section, values in given_raw.items():
        for key, value in values.items():
            if f"{section}.{key}" not in set_keys or value == saved_raw[section][key]:
                continue
            if saved.train.init_from and section in SOURCE_SECTIONS and value == defaults[section][key]:
                continue  # a fine-tuning run's model.* and tokenizer.* are its source's: as finetune_config judges
            if section == "train" and key in RESUMABLE_KEYS:
                changed[f"train.{key}"] = value
            else:
                raise ConfigError(f"{section}.{key}={value!r} differs from the run's saved value "
                                  f"{saved_raw[section][key]!r}; a resumed run keeps its config except "
                                  f"{', '.join('train.' + k for k in RESUMABLE_KEYS)}. Start a new --run-dir "
                                  f"to change it")
    return saved.override(changed)


# what a fine-tuning run takes from the model it starts from (train.init_from)
SOURCE_SECTIONS = ("model", "tokenizer")
# of those, what a fine-tuning run may set for itself: how it trains, not what the weights are
FINETUNE_MAY_CHANGE = ("model.dropout",)


def finetune_config(given: Config, source: Config) -> Config:
    """The config of a run that fine-tunes a trained model: ``given`` with the ``model.*`` and
    ``tokenizer.*`` of the model's ``source`` config. A key of those set to a value unlike both
    the default and the source's is an error, not ignored (``tokenizer.model`` is compared by
    the tokenizer it holds, in ``build``)."""
    defaults, given_raw, source_raw = Config().to_dict(), given.to_dict(), source.to_dict()
    raw, set_keys = dict(given_raw), given.set_keys()
    for section in SOURCE_SECTIONS:
        for key, value in given_raw[section].items():
            if (section, key) == ("tokenizer", "model"):
                continue  # (a new tokenizer with train.init_vocab=adapt, else checked in build)
            if f"{section}.{key}" in FINETUNE_MAY_CHANGE:
                continue
            if value != defaults[section][key] and value != source_raw[section][key]:
                raise ConfigError(f"{section}.{key}={value!r} conflicts with {source_raw[section][key]!r} of the model "
                                  f"given with --init-from (train.init_from); fine-tuning keeps that model's "
                                  f"{section}.* config: drop the override, or train from scratch without --init-from")
        raw[section] = {key: given_raw[section][key] if f"{section}.{key}" in FINETUNE_MAY_CHANGE and
                        f"{section}.{key}" in set_keys else value for key, value in source_raw[section].items()}
    if given.train.init_vocab == "adapt":  # the new tokenizer: the given one, else one this run trains
        raw["tokenizer"] = {**source_raw["tokenizer"], "model": given_raw["tokenizer"]["model"]}
    config = Config._from_raw(raw)._given(given.given)
    config.validate()
    return config


REFERENCE_INTRO = """# Configuration

<!-- Made by `python docs/configuration.py` from translate/config.py: edit the comments there, not this page. -->

Every key can go in a YAML file (`translate train --config FILE`) or on the command line
(`--set section.key=value`, repeatable; the command line wins over the file). An unknown or
ill-typed key is an error that lists the valid keys. The resolved configuration is saved in every
checkpoint and as `config.yaml` in the run directory. [`configs/default.yaml`](../configs/default.yaml)
writes every default out, to copy and edit. A resumed run keeps its configuration, except the keys
marked *resume may change*. How training uses them: [training.md](training.md)."""


def reference_markdown() -> str:
    """docs/configuration.md: every key with its type, its default and the comment written beside
    or above its field here, so that the page is made from the code and cannot drift from it."""
    meanings = _field_comments()
    lines = [REFERENCE_INTRO]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        lines += ["", f"## `{section}`", "", (cls.__doc__ or "").strip(), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = meanings.get((cls.__name__, f.name), "")
            if section == "train" and f.name in RESUMABLE_KEYS:
                meaning += " (*resume may change*)"
            meaning = meaning.replace("|", "\\|")  # a bar would end the table's cell
            lines.append(f"| `{section}.{f.name}` | {_shown_type(hints[f.name])} | {_shown_default(f.default)} | "
                         f"{meaning} |")
    return "\n".join(lines) + "\n"


def _field_comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the comment lines right above the field, then the comment beside it, read
    from this file's source (``ast`` for the fields' lines, ``tokenize`` for the comments)."""
    source = Path(__file__).read_text(encoding="utf-8")
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.string.lstrip("#").strip(), not token.line[:token.start[1]].strip())
    meanings = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in {c.__name__ for c in SECTIONS.values()}):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above, line = [], item.lineno - 1
                while line in comments and comments[line][1]:
                    above.insert(0, comments[line][0])
                    line -= 1
                text, alone = comments.get(item.lineno, ("", True))
                meanings[(node.name, item.target.id)] = " ".join(above + ([text] if not alone else []))
    return meanings


def _shown_type(hint: Any) -> str:
    """A field's type as the reference shows it: the choices of a Literal, "or none" for an Optional."""
    if typing.get_origin(hint) is Literal:
        return ", ".join(f"`{choice}`" for choice in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"list of {typing.get_args(hint)[0].__name__}"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("none" if arg is type(None) else arg.__name__ for arg in typing.get_args(hint))
    return hint.__name__


def _shown_default(value: Any) -> str:
    """A default as YAML would write it, with the bundled split's install paths by name."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(BUNDLED_DATA):
        return f"the bundled {Path(value).stem} split"
    return f"`{value}`"
