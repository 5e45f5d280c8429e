"""Vocabulary adaptation for fine-tuning (``train.init_vocab=adapt``): a trained model's weights
moved onto a new tokenizer fitted on the new domain (Sato et al., 2020, on why a domain wants a
vocabulary of its own), keeping the rows of shared pieces as Lakew et al. (2018) do and starting
a new piece from its old pieces' mean as Gee et al. (2022) do.

A source's tokenizer splits the words of another domain into many short pieces, so a model that
keeps it learns that domain from longer, harder sequences than a model trained on it from scratch
with its own. Here every piece the two vocabularies share keeps its trained rows (embeddings,
output projection and bias), and a new piece starts as the mean of the rows of the pieces the old
tokenizer splits its text into: the encoder, attention and decoder keep all they learned.
"""

from __future__ import annotations

import sentencepiece as spm
import torch

from .tokenizer import SPECIAL, UNK, WORD_START, Tokenizer

# the weights indexed by a source piece / a target piece, first dimension the vocabulary
SRC_ROWS = ("encoder.embed.weight",)
TGT_ROWS = ("decoder.embed.weight", "decoder.output.weight", "decoder.output.bias")


def carried_rows(old: spm.SentencePieceProcessor, new: spm.SentencePieceProcessor) -> list[list[int]]:
    """For each id of ``new``, the ids of ``old`` whose rows it starts from: its own where ``old``
    has the same piece (the special tokens always), else the pieces ``old`` splits its text into
    (a lone word-start mark left out), else UNK."""
    rows = []
    for i in range(new.get_piece_size()):
        piece = new.id_to_piece(i)
        same = i if i < SPECIAL else old.piece_to_id(piece)
        if i < SPECIAL or same != UNK:
            rows.append([same])
            continue
        parts = [j for j in old.encode(piece.replace(WORD_START, " ")) if old.id_to_piece(j) != WORD_START]
        rows.append(parts or [UNK])
    return rows


def shared_pieces(old: Tokenizer, new: Tokenizer) -> tuple[int, int]:
    """How many target pieces of ``new`` the old vocabulary holds, and how many ``new`` has (the
    special tokens left out)."""
    pieces = [new.tgt.id_to_piece(i) for i in range(SPECIAL, new.tgt_vocab_size)]
    return sum(1 for piece in pieces if old.tgt.piece_to_id(piece) != UNK), len(pieces)


def adapt_weights(weights: dict[str, torch.Tensor], old: Tokenizer, new: Tokenizer) -> dict[str, torch.Tensor]:
    """``weights`` (a model's state dict under ``old``) for the same model under ``new``: the
    vocabulary-indexed tensors rebuilt row by row (``carried_rows``), the others as they are."""
    plans = {"src": carried_rows(old.src, new.src)}
    plans["tgt"] = plans["src"] if old.joint and new.joint else carried_rows(old.tgt, new.tgt)
    adapted = dict(weights)
    for side, names in (("src", SRC_ROWS), ("tgt", TGT_ROWS)):
        for name in names:
            if name in weights:
                table = weights[name]  # (old vocab, ...)
                adapted[name] = torch.stack([table[ids].mean(0) for ids in plans[side]])  # (new vocab, ...)
    return adapted
