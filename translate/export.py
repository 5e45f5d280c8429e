"""A model to share: ``translate export`` writes a folder in the layout people share translation
models in (as on the Hugging Face hub): the weights as ``model.safetensors`` (no pickle, so
loading it can run no code), ``config.json`` (the resolved config, training progress and
tokenizer fingerprint), the SentencePiece models, the lexicon for decoding shortlists as
``lexicon.safetensors``, and a ``README.md`` model card with the
model's scores. Every command that takes a checkpoint takes such a folder
(``checkpoint.load_checkpoint`` reads it back).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import EXPORT_FORMAT, describe_source, load_model, provenance_chain
from .config import BUNDLED_DATA, shown_path
from .corpus import Parallel
from .errors import CheckpointError, DataError
from .evaluate import evaluate, test_set
from .shortlist import Lexicon
from .translator import DecodeOptions, Translator

BUNDLED_LICENCE = ("the bundled split of Tatoeba Spanish-English sentence pairs (tatoeba.org, via "
                   "manythings.org/anki), licensed CC-BY 2.0 FR; each pair's attribution is in the corpus file")


def tied_weights(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor is another key's (tied embeddings): copy -> the first key holding it."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    tied = {}
    for key, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
                    tuple(tensor.shape))
        if identity in first:
            tied[key] = first[identity]
        else:
            first[identity] = key
    return tied


EXPORT_WRITES = ("model.safetensors", "config.json", "src.model", "tgt.model", "lexicon.safetensors", "README.md")


def export_model(checkpoint: str | Path, folder: str | Path, beam: int = 5, scores: bool = True,
                 test: str | None = None) -> dict[str, Any]:
    """Writes the export of ``checkpoint`` as ``folder``: complete or not at all. The files are
    written into a new folder beside it and renamed into place at the end, so an export that fails
    leaves no part behind, and one over an earlier export replaces it whole (a folder that holds
    other files is refused, so that none of them is lost). With ``scores``, the card carries BLEU,
    chrF and TER (beam ``beam``) on ``test``, or else on the model's test set where one in its
    languages is to be had (``card_test_set``); ``note`` in what is returned says why there are
    none when there are not. Returns what the card says, as data."""
    folder = Path(folder)
    _check_target(folder)
    model, tokenizer, config, payload = load_model(checkpoint)
    lexicon = Lexicon.of_checkpoint(payload, (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size), str(checkpoint))
    progress = dict(payload.get("progress", {}))
    init_from = payload.get("init_from")
    calibrator = payload.get("calibrator")  # (confidence.py), kept in config.json as it is
    del payload
    card: dict[str, Any] = {"parameters": model.parameter_count(), "scores": None, "note": None}
    if scores:
        chosen, card["note"] = card_test_set(config, test)
        if chosen is not None:
            # as `translate eval` scores it by default (its precision included)
            translator = Translator(model, tokenizer, DecodeOptions(beam=beam), precision="auto",
                                    amp=config.train.amp, lexicon=lexicon)
            result, _ = evaluate(translator, chosen.src, chosen.tgt)
            card["scores"] = {"test": shown_path(chosen.origin), "sentences": len(chosen.src), "beam": beam,
                              "precision": translator.precision, **result}
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # as a folder made with mkdir, not mkdtemp's owner-only
    except OSError as exc:
        raise CheckpointError(f"cannot write into {shown_path(folder.parent)} ({exc.strerror}); choose a writable "
                              f"folder") from None
    try:
        meta = _write_files(staging, model, tokenizer, config, lexicon, progress, init_from, calibrator)
        (staging / "README.md").write_text(model_card(config, meta, card), encoding="utf-8")
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def card_test_set(config, test: str | None) -> tuple[Parallel | None, str | None]:
    """The test set of the card's scores: ``test`` when given (its errors are the user's to see),
    else the model's (``evaluate.test_set``) where it has the model's language columns; None and
    a note why when there is none."""
    if test is not None:
        return test_set(config, test), None
    try:
        return test_set(config), None
    except DataError:
        data = config.data
        return None, (f"no test set in {data.src_lang}/{data.tgt_lang} to score the model on (its data.test, or "
                      f"the bundled spa/eng split); the card has no scores: give one with --test")


def _check_target(folder: Path) -> None:
    """A folder that an export may take the place of: none yet, an empty one or an earlier export."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{shown_path(folder)} is a file; give a folder to export into")
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_WRITES)
        if others:
            raise CheckpointError(f"{shown_path(folder)} holds files an export does not write ({', '.join(others[:3])}"
                                  f"{', ...' if len(others) > 3 else ''}); give a new or empty folder")


def _write_files(folder: Path, model, tokenizer, config, lexicon: Lexicon | None, progress: dict[str, Any],
                 init_from: dict[str, Any] | None, calibrator: dict[str, Any] | None = None) -> dict[str, Any]:
    """The weights, lexicon, config.json and SentencePiece models, into ``folder``; returns config.json's content."""
    from safetensors.torch import save_file

    state = model.state_dict()
    tied = tied_weights(state)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items() if k not in tied},
              str(folder / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
    if lexicon is not None:
        save_file({k: v.contiguous() for k, v in lexicon.state().items()}, str(folder / "lexicon.safetensors"),
                  metadata={"format": EXPORT_FORMAT})
    meta = {"format": EXPORT_FORMAT, "translate_version": __version__, "config": config.to_dict(),
            "tied": tied, "tokenizer_fingerprint": tokenizer.fingerprint, "progress": progress,
            "parameters": model.parameter_count()}
    if init_from:  # where a fine-tuned model started, kept when it is fine-tuned again from this folder
        meta["init_from"] = init_from
    if calibrator is not None:  # the confidence calibrator (confidence.py)
        meta["calibrator"] = calibrator
    (folder / "config.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    tokenizer.save(folder)
    return meta


def _replace_folder(staging: Path, folder: Path) -> None:
    """``staging`` renamed to ``folder``; an earlier export there is set aside first and removed
    after, or put back if the rename fails, so ``folder`` is never a mix of the two."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
    os.replace(folder, aside / folder.name)
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(aside / folder.name, folder)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def fine_tuning_lines(config, init_from: dict[str, Any] | None) -> list[str]:
    """The card's lines on where a fine-tuned model started (and that model's own start), and on
    the corpus mixed into its training."""
    lines = []
    if config.data.mix and config.data.mix_ratio > 0:
        lines.append(f"- Mixed into each epoch: {config.data.mix_ratio:g} token(s) of {shown_path(config.data.mix)} "
                     f"per training token, a new random sample each epoch (mixed fine-tuning, Chu et al., 2017)")
    for depth, source in enumerate(provenance_chain(init_from)):
        lines.append(f"- {'Fine-tuned from' if depth == 0 else '  which was fine-tuned from'}: "
                     f"{describe_source(source)}, trained on {shown_path(source.get('train') or '?')}")
    if init_from and config.train.init_vocab == "adapt":
        lines.append("- Vocabulary: adapted to the fine-tuning data (a tokenizer of its own, the rows of the pieces "
                     "it shares with the model it started from carried over)")
    return lines


def model_card(config, meta: dict[str, Any], card: dict[str, Any]) -> str:
    m, t, data, progress = config.model, config.tokenizer, config.data, meta["progress"]
    trained_on = BUNDLED_LICENCE if Path(data.train).resolve() == (BUNDLED_DATA / "train.tsv").resolve() \
        else f"{shown_path(data.train)} (its licence is that corpus's own; translate does not record it)"
    lines = [
        f"# {data.src_lang} → {data.tgt_lang} translation model",
        "",
        f"An RNN attention model trained with [translate](https://pypi.org/project/translate-rnn/) "
        f"{meta['translate_version']}.",
        "",
        "## Model",
        "",
        f"- Languages: `{data.src_lang}` → `{data.tgt_lang}`",
        f"- Architecture: {'bidirectional ' if m.bidirectional else ''}{m.cell.upper()} encoder, {m.decoder} "
        f"decoder with {m.attention} attention{' and input feeding' if m.input_feeding else ''}, "
        f"{m.layers} layer(s), embeddings {m.embed_dim}, hidden size {m.hidden_dim}"
        f"{', tied output embeddings' if m.tie_embeddings else ''}; {card['parameters']:,} parameters",
        f"- Tokenizer: SentencePiece {t.type}, {'joint' if t.joint else 'separate'} vocabulary of {t.vocab_size:,}",
        f"- Training data: {trained_on}",
        f"- Training: {progress.get('step', 0):,} steps, {progress.get('elapsed', 0.0) / 60:.1f} minutes; best "
        f"dev BLEU {progress.get('best_bleu', -1.0):.2f} at step {progress.get('best_step', 0):,}",
        *fine_tuning_lines(config, meta.get("init_from")),
        "",
    ]
    if card["scores"]:
        s = card["scores"]
        lines += [
            "## Scores",
            "",
            f"On {s['test']} ({s['sentences']:,} sentences), beam {s['beam']}, decoded in "
            f"{s['precision']}, from `translate eval`:",
            "",
            "| BLEU | chrF | TER |",
            "|---|---|---|",
            f"| {s['bleu']:.2f} | {s['chrf']:.2f} | {s['ter']:.2f} |",
            "",
            f"sacrebleu signatures: {s['signature']}",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```",
        "pip install translate-rnn",
        "echo 'El gato come pan.' | translate decode THIS_FOLDER",
        "translate eval THIS_FOLDER --src test.src --ref test.ref",
        "```",
        "",
        "Files: `model.safetensors` (weights), `config.json` (configuration and training progress), "
        "`src.model` / `tgt.model` (SentencePiece), `lexicon.safetensors` (the lexicon of decoding shortlists).",
        "",
    ]
    return "\n".join(lines)
