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
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import EXPORT_FORMAT, describe_source, load_model, provenance_chain
from .config import BUNDLED_DATA, shown_path
from .errors import CheckpointError
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


def export_model(checkpoint: str | Path, folder: str | Path, beam: int = 5, scores: bool = True) -> dict[str, Any]:
    """Writes the export of ``checkpoint`` into ``folder`` (created; files already there with the
    same names are replaced). With ``scores``, the card carries BLEU, chrF and TER on the model's
    test set (beam ``beam``). Returns what the card says, as data."""
    from safetensors.torch import save_file

    model, tokenizer, config, payload = load_model(checkpoint)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; give a folder to export into")
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tied = tied_weights(state)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items() if k not in tied},
              str(folder / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
    progress = dict(payload.get("progress", {}))
    init_from = payload.get("init_from")
    lexicon = Lexicon.of_checkpoint(payload)
    del payload
    if lexicon is not None:
        save_file({k: v.contiguous() for k, v in lexicon.state().items()}, str(folder / "lexicon.safetensors"),
                  metadata={"format": EXPORT_FORMAT})
    else:  # a file of an earlier export into this folder would be read as this model's
        (folder / "lexicon.safetensors").unlink(missing_ok=True)
    meta = {"format": EXPORT_FORMAT, "translate_version": __version__, "config": config.to_dict(),
            "tied": tied, "tokenizer_fingerprint": tokenizer.fingerprint, "progress": progress,
            "parameters": model.parameter_count()}
    if init_from:  # where a fine-tuned model started, kept when it is fine-tuned again from this folder
        meta["init_from"] = init_from
    (folder / "config.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    tokenizer.save(folder)
    card = {"parameters": model.parameter_count(), "scores": None}
    if scores:
        # as `translate eval` scores it by default (its precision included)
        translator = Translator(model, tokenizer, DecodeOptions(beam=beam), precision="auto", amp=config.train.amp,
                                lexicon=lexicon)
        test = test_set(config)
        result, _ = evaluate(translator, test.src, test.tgt)
        card["scores"] = {"test": test.origin, "sentences": len(test.src), "beam": beam,
                          "precision": translator.precision, **result}
    (folder / "README.md").write_text(model_card(config, meta, card), encoding="utf-8")
    return card


def fine_tuning_lines(config, init_from: dict[str, Any] | None) -> list[str]:
    """The card's lines on where a fine-tuned model started (and that model's own start), and on
    the corpus mixed into its training."""
    lines = []
    if config.data.mix and config.data.mix_ratio > 0:
        lines.append(f"- Mixed into each epoch: {config.data.mix_ratio:g} pair(s) of {shown_path(config.data.mix)} "
                     f"per training pair, a new random sample each epoch (mixed fine-tuning, Chu et al., 2017)")
    for depth, source in enumerate(provenance_chain(init_from)):
        lines.append(f"- {'Fine-tuned from' if depth == 0 else '  which was fine-tuned from'}: "
                     f"{describe_source(source)}, trained on {shown_path(source.get('train') or '?')}")
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
