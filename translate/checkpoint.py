"""Checkpoints: one file with weights, the resolved config, the tokenizer models, optimizer,
LR schedule, teacher-forcing state, RNG states and the data position.

Written atomically (temporary file in the same directory, fsync, ``os.replace``), so a run
killed at any moment leaves the previous file whole. Loaded with ``weights_only=True``, so a
checkpoint can never run code. ``CheckpointSaver`` writes a run's files and rotates the
step-N.pt weights kept for averaging; ``training_payload`` and ``restore_training_state`` are
the two halves of what a resumed run needs.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .config import Config
from .errors import CheckpointError, ConfigError, TokenizerError
from .model import Seq2Seq, build_model
from .runtime import rng_state, set_rng_state
from .schedules import LRSchedule
from .shortlist import Lexicon
from .tokenizer import Tokenizer

FORMAT = "translate-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` to ``path`` atomically; on failure the old file is untouched."""
    write_atomically(Path(path), lambda sink: torch.save({"format": FORMAT, "version": VERSION, **payload}, sink),
                     "checkpoint", "choose a writable --run-dir (the previous checkpoint is intact)")


def write_atomically(path: Path, write: Callable[[BinaryIO], None], what: str, advice: str,
                     mode: int | None = None) -> None:
    """``write`` fills a temporary file beside ``path``, which then replaces it (file and folder
    synced to disk), with ``mode`` when given: ``path`` is whole before and after, and the old one
    untouched on failure, said in one line (a CheckpointError naming ``what`` and ``advice``)."""
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False) as tmp:
            tmp_name = tmp.name
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        if mode is not None:
            os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
        tmp_name = None
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise CheckpointError(f"cannot write {what} {path}: {exc.strerror or exc}; free disk space or "
                              f"{advice}") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


EXPORT_FILES = ("model.safetensors", "config.json")  # what makes a folder a ``translate export``


def resolve(path: str | Path) -> Path:
    """A .pt file, an exported model folder (``translate export``), or a run directory (its
    best.pt, else last.pt)."""
    path = Path(path)
    if path.is_dir() and all((path / name).is_file() for name in EXPORT_FILES):
        return path
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no best.pt or last.pt in this run directory; train one with "
                              f"`translate train --run-dir {path}`")
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found; give a .pt file or a run directory")
    return path


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Reads a checkpoint. ``mmap`` maps the file instead of reading it: only the tensors that are
    used become resident, so loading a model for decoding leaves the optimizer's state on disk."""
    path = resolve(path)
    if path.is_dir():
        return _load_export(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # weights_only met a class or function: code could run
            raise CheckpointError(f"{path}: refused: the file holds objects other than weights and plain data "
                                  f"(possibly code); only load checkpoints written by translate") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file); use another checkpoint, "
                              f"e.g. last.pt or best.pt of the run") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}); check its permissions") from None
    except Exception as exc:  # a damaged file fails deep in the unpickler, with any error type
        reason = "truncated or corrupt" if path.stat().st_size else "empty"
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason}: {detail}); "
                              f"use another checkpoint, e.g. last.pt or best.pt of the run") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a translate checkpoint; give a file written by `translate train`")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('version')} is not supported "
                              f"(this translate reads version {VERSION})")
    return payload


def _load_export(folder: Path) -> dict[str, Any]:
    """An exported model folder read back as the payload of a checkpoint with no training state:
    weights from safetensors (no pickle at all), config and progress from config.json, the
    SentencePiece models from their files."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        weights = load_file(folder / "model.safetensors")
        tokenizer = {side: (folder / f"{side}.model").read_bytes() for side in ("src", "tgt")}
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: not a readable exported model ({exc}); export it again with "
                              f"translate export") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{folder}: config.json is not a translate export; give a folder written by "
                              f"translate export")
    tied = meta.get("tied", {})
    kinds = {"config": dict, "tied": dict, "progress": dict, "init_from": (dict, type(None))}
    wrong = [key for key, kind in kinds.items() if key in meta and not isinstance(meta[key], kind)]
    if wrong or not all(isinstance(copy, str) and isinstance(source, str) and source in weights
                        for copy, source in tied.items()):
        raise CheckpointError(f"{folder}: config.json is damaged ({', '.join(wrong) or 'tied'} not as translate "
                              f"export writes it); export the model again")
    for copy, source in tied.items():  # weights shared in the model are stored once
        weights[copy] = weights[source]
    lexicon = None
    if (folder / "lexicon.safetensors").exists():  # (exports of earlier versions have none)
        try:
            lexicon = load_file(folder / "lexicon.safetensors")
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{folder}: lexicon.safetensors is not readable ({exc}); export it again with "
                                  f"translate export") from None
    return {"format": FORMAT, "version": VERSION, "config": meta.get("config"), "tokenizer": tokenizer,
            "tokenizer_fingerprint": meta.get("tokenizer_fingerprint"), "model": weights,
            "progress": meta.get("progress", {}), "lexicon": lexicon, "init_from": meta.get("init_from"),
            "calibrator": meta.get("calibrator")}  # (confidence.Calibrator's state; None: none fitted)


EXPORT_FORMAT = "translate-export"


def restore_tokenizer(payload: dict[str, Any]) -> Tokenizer:
    """The tokenizer a checkpoint carries, checked against its recorded fingerprint."""
    try:
        tokenizer = Tokenizer(bytes(payload["tokenizer"]["src"]), bytes(payload["tokenizer"]["tgt"]))
    except (KeyError, TypeError, TokenizerError) as exc:
        raise CheckpointError(f"checkpoint is incomplete or damaged ({exc}); use another checkpoint") from None
    if payload.get("tokenizer_fingerprint", tokenizer.fingerprint) != tokenizer.fingerprint:
        raise CheckpointError("checkpoint's tokenizer does not match its recorded fingerprint; the file is damaged")
    return tokenizer


def restore(payload: dict[str, Any], device: torch.device | str = "cpu") -> tuple[Seq2Seq, Tokenizer, Config]:
    """Rebuilds the model and tokenizer from a checkpoint alone."""
    try:
        config = Config.from_dict(payload["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint is incomplete or damaged ({exc}); use another checkpoint") from None
    tokenizer = restore_tokenizer(payload)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit its config and vocabulary "
                              f"({str(exc).splitlines()[0][:100]}); the file is damaged") from None
    return model.to(device).eval(), tokenizer, config


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Seq2Seq, Tokenizer, Config, dict]:
    payload = load_checkpoint(path, mmap=True)
    model, tokenizer, config = restore(payload, device)
    return model, tokenizer, config, payload


@dataclass(frozen=True)
class Source:
    """The trained model a fine-tuning run starts from (``train.init_from``): its config, tokenizer
    and weights, and where they came from (``provenance``, saved in the run's checkpoints)."""

    config: Config
    tokenizer: Tokenizer
    weights: dict[str, torch.Tensor]
    provenance: dict[str, Any]


def load_source(path: str | Path) -> Source:
    """The model at ``path`` (a checkpoint, a run directory's best.pt or an exported folder), read
    and checked as every command reads one, for ``train.init_from``."""
    try:
        resolved = resolve(path)
        payload = load_checkpoint(resolved)
        model, tokenizer, config = restore(payload)
    except CheckpointError as exc:
        raise CheckpointError(f"--init-from {exc}") from None
    weights_file = resolved / "model.safetensors" if resolved.is_dir() else resolved
    progress = payload.get("progress") or {}
    best = progress.get("best_bleu")
    provenance = {
        "path": str(resolved.absolute()), "sha256": file_sha256(weights_file),
        "step": progress.get("step"), "epoch": progress.get("epoch"),
        "minutes": round(progress.get("elapsed", 0.0) / 60, 1),
        "best_dev_bleu": best if best is not None and best >= 0 else None, "best_step": progress.get("best_step"),
        "train": config.data.train, "tokenizer_fingerprint": tokenizer.fingerprint,
        "init_from": payload.get("init_from"),  # the source's own source, and so on
    }
    return Source(config, tokenizer, model.state_dict(), provenance)


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance_chain(init_from: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A checkpoint's ``init_from`` as a list: the model it was fine-tuned from, that one's, and so on."""
    chain = []
    while init_from:
        chain.append(init_from)
        init_from = init_from.get("init_from")
    return chain


def describe_source(source: dict[str, Any]) -> str:
    """One line for people: the path, its training and its best dev BLEU."""
    bleu = source.get("best_dev_bleu")
    scored = f", best dev BLEU {bleu:.2f}" if bleu is not None else ""
    return (f"{source['path']} (step {source.get('step') or 0:,}{scored}; sha256 "
            f"{str(source.get('sha256', ''))[:12]})")


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on
    best_bleu: float = -1.0  # dev BLEU of the best validation
    best_score: float | None = None  # the best validation's train.eval_metric (loss negated: higher is better)
    best_step: int = 0
    bad_evals: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumes
    tokens: int = 0  # target tokens trained on
    tf_ratio: float = 1.0
    nonfinite_steps: int = 0
    skipped_batches: int = 0  # batches that did not fit in memory


# what a resumed run needs beyond the weights
TRAINING_STATE = ("optimizer", "lr_schedule", "scaler", "rng", "rank_rng", "precision")

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # autocast types by train.amp's names


def precision_name(dtype: torch.dtype | None) -> str:
    """``PRECISIONS``' name of an autocast type (``off``: full precision)."""
    return next(name for name, value in PRECISIONS.items() if value == dtype)


def training_payload(config: Config, tokenizer: Tokenizer, model: nn.Module, optimizer: torch.optim.Optimizer,
                     lr_schedule: LRSchedule, scaler: torch.amp.GradScaler, progress: Progress,
                     device: torch.device, rank_rng: list[dict[str, Any]] | None = None,
                     lexicon: Lexicon | None = None, init_from: dict[str, Any] | None = None,
                     amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Everything a run needs to go on exactly where it stands, for ``save_checkpoint``: with
    ``rank_rng`` (every rank's RNG state, under torchrun) each rank resumes with its own dropout
    masks; ``lexicon`` gives the run's decoding shortlists; ``init_from``, the provenance of the
    model a fine-tuning run started from (``Source.provenance``); ``amp_dtype``, the autocast type
    it trains in on ``device``, which a resumed run keeps (saved as ``precision``: the device
    type and a ``PRECISIONS`` name)."""
    payload = {
        "config": config.to_dict(),
        "tokenizer": {"src": tokenizer.src_proto, "tgt": tokenizer.tgt_proto},
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": asdict(progress),
        "rng": rng_state(device),
        "precision": {"device": device.type, "amp": precision_name(amp_dtype)},
    }
    if rank_rng is not None:
        payload["rank_rng"] = rank_rng
    if lexicon is not None:
        payload["lexicon"] = lexicon.state()
    if init_from is not None:
        payload["init_from"] = init_from
    return payload


def restore_training_state(payload: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           lr_schedule: LRSchedule, scaler: torch.amp.GradScaler, device: torch.device) -> Progress:
    """Loads what ``training_payload`` saved into a freshly built run; returns its progress."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    lr_schedule.load_state_dict(payload.get("lr_schedule", payload.get("scheduler", {})))
    if payload.get("scaler") and scaler.is_enabled():  # a run saved in bf16 or fp32 has no loss scale to go on with
        scaler.load_state_dict(payload["scaler"])
    set_rng_state(payload["rng"], device)
    return saved_progress(payload["progress"])


def saved_progress(saved: dict[str, Any]) -> Progress:
    """A checkpoint's ``Progress``, brought up to date where an earlier version saved it."""
    progress = Progress(**saved)
    if progress.best_score is None and progress.best_bleu >= 0:  # saved before train.eval_metric: best by BLEU
        progress.best_score = progress.best_bleu
    return progress


class CheckpointSaver:
    """Writes a run's checkpoints: ``last.pt``, ``best.pt``, and with ``keep`` > 0 the weights of
    the last ``keep`` validations as ``step-N.pt`` (for ``translate average``; older ones go)."""

    def __init__(self, run_dir: str | Path, keep: int = 0):
        self.run_dir, self.keep = Path(run_dir), keep
        self.last, self.best = self.run_dir / "last.pt", self.run_dir / "best.pt"

    def save(self, payload: dict[str, Any], best: bool = False) -> None:
        save_checkpoint(self.last, payload)
        if best:
            save_checkpoint(self.best, payload)

    def keep_weights(self, payload: dict[str, Any], step: int) -> None:
        """This validation's weights (no training state) as step-N.pt; the oldest beyond ``keep`` go."""
        if self.keep <= 0:
            return
        weights = {key: value for key, value in payload.items() if key not in TRAINING_STATE}
        save_checkpoint(self.run_dir / f"step-{step}.pt", weights)
        for old in step_checkpoints(self.run_dir)[:-self.keep]:
            old.unlink(missing_ok=True)


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's ``step-N.pt`` files (``train.keep_checkpoints``), oldest first."""
    run_dir = Path(run_dir)
    found = []
    for path in run_dir.glob("step-*.pt"):
        number = path.stem.removeprefix("step-")
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """A checkpoint whose weights are the mean of ``paths``' weights (Junczys-Dowmunt et al., 2016;
    Vaswani et al., 2017): a cheap ensemble in one model. All must share config and tokenizer."""
    if not paths:
        raise CheckpointError("no checkpoints to average; train with --set train.keep_checkpoints=K")
    first = load_checkpoint(paths[0])
    total = {name: value.double() if value.is_floating_point() else value for name, value in first["model"].items()}
    for path in paths[1:]:
        payload = load_checkpoint(path)
        if (payload.get("tokenizer_fingerprint") != first.get("tokenizer_fingerprint")
                or payload["config"]["model"] != first["config"]["model"]):
            raise CheckpointError(f"{path}: another model or vocabulary than {paths[0]}; average checkpoints "
                                  f"of one run only")
        for name, value in payload["model"].items():
            if value.is_floating_point():
                total[name] += value.double()
    averaged = {name: (value / len(paths)).to(first["model"][name].dtype) if value.is_floating_point() else value
                for name, value in total.items()}
    newest = load_checkpoint(paths[-1])
    kept = {key: newest[key] for key in ("config", "tokenizer", "tokenizer_fingerprint", "progress", "lexicon",
                                         "init_from")
            if key in newest}
    return {**kept, "model": averaged, "averaged_from": [str(p) for p in paths]}


def _source_words(state: dict[str, Any] | None) -> int | None:
    """A lexicon state's ``source_words``; None without a lexicon or a count (older checkpoints)."""
    words = Lexicon.from_state(state).source_words if state else 0
    return words or None


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """What a checkpoint holds, for people: config, vocabularies, size, progress."""
    resolved = resolve(path)
    payload = load_checkpoint(resolved)
    model, tokenizer, config = restore(payload)
    progress = payload.get("progress", {})
    return {
        "checkpoint": str(resolved),
        "parameters": model.parameter_count(),
        "src_vocab": tokenizer.src_vocab_size, "tgt_vocab": tokenizer.tgt_vocab_size,
        "joint_vocab": tokenizer.joint, "tokenizer_fingerprint": tokenizer.fingerprint,
        "step": progress.get("step"), "epoch": progress.get("epoch"), "tokens": progress.get("tokens"),
        "best_dev_bleu": progress.get("best_bleu"), "best_step": progress.get("best_step"),
        "training_minutes": round(progress.get("elapsed", 0.0) / 60, 1),
        "tf_ratio": progress.get("tf_ratio"),
        "averaged_from": payload.get("averaged_from"),
        "shortlist_lexicon": bool(payload.get("lexicon")),
        # words that 99.9% of its training sources hold at most (Lexicon.source_words); None: not counted
        "source_words": _source_words(payload.get("lexicon")),
        "confidence_calibrator": bool(payload.get("calibrator")),  # (confidence.py)
        "init_from": payload.get("init_from"),  # the model it was fine-tuned from, with that one's own
        "config": config.to_dict(),
    }
