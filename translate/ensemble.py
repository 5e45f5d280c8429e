"""Several models decoded as one: ``Ensemble`` offers ``encode`` / ``decode_step`` / ``output_vocab``
as a ``Seq2Seq`` does, so the searches (greedy, beam, n-best), shortlists, int8 and forced-decoding
scores take it unchanged.

At each step it gives the mean of the models' log-probabilities (a log-linear ensemble, a product
of experts), which the searches normalise as they normalise one model's logits: OpenNMT-py and
Marian average log-probabilities too (fairseq and Sockeye's default average probabilities). Of
the two, the mean of log-probabilities commutes with what a search does to the logits: a
sentence's own shortlist (``allowed``) is a mask and a softmax over the columns left, and the
softmax of a mean of log-softmaxes over those columns is the one each model's renormalised
log-probabilities over them would give, so a sentence decodes as it would alone with any batch.
The attention is the mean of the models' (still a distribution over the source), for the page,
``attend``, unknown words carried through attention and the coverage penalty.

The models must share one tokenizer (its fingerprint): token ids mean the same to each. Each
model's own lexicon gives a shortlist; a sentence's shortlist is the union of them
(``EnsembleLexicon``), so no model's likely translation is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .checkpoint import load_model
from .decoder import DecoderState, Memory, OutputVocab
from .errors import CheckpointError
from .shortlist import Lexicon, Shortlist, union


class EnsembleMemory(NamedTuple):
    """Each model's ``Memory`` of one batch; ``mask`` is what the searches read of it."""

    parts: tuple[Memory, ...]

    @property
    def mask(self) -> torch.Tensor:
        return self.parts[0].mask  # (batch, src_len), the same for every model: one tokenizer

    def select(self, index: torch.Tensor) -> EnsembleMemory:
        return EnsembleMemory(tuple(part.select(index) for part in self.parts))


class EnsembleState(NamedTuple):
    """Each model's ``DecoderState``, reordered together."""

    parts: tuple[DecoderState, ...]

    def select(self, index: torch.Tensor) -> EnsembleState:
        return EnsembleState(tuple(part.select(index) for part in self.parts))


class EnsembleVocab(NamedTuple):
    """A shortlist's columns (``ids``, what the searches read) and each model's output layer over them."""

    ids: torch.Tensor  # (n,) token ids, sorted
    parts: tuple[OutputVocab, ...]


class Ensemble(nn.Module):
    """Models that share a tokenizer, decoded as one (see the module's docstring). An ``nn.Module``
    so that ``eval``, ``parameters`` and a bf16 copy reach every model."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = nn.ModuleList(models)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor
               ) -> tuple[EnsembleMemory, EnsembleState]:
        """src, mask: (batch, src_len); lengths: (batch,). Each model encodes the batch."""
        encoded = [model.encode(src, lengths, mask) for model in self.models]
        return EnsembleMemory(tuple(m for m, _ in encoded)), EnsembleState(tuple(s for _, s in encoded))

    def decode_step(self, prev: torch.Tensor, memory: EnsembleMemory, state: EnsembleState,
                    vocab: EnsembleVocab | None = None):
        """prev: (batch,) -> the models' mean log-probabilities (batch, vocab or n), the next state
        and the mean attention (batch, src_len). One model: its own logits and attention as they
        are, so that an ensemble of one decodes exactly as the model does."""
        vocabs = [None] * len(self.models) if vocab is None else vocab.parts
        if len(self.models) == 1:
            logits, step_state, weights = self.models[0].decode_step(prev, memory.parts[0], state.parts[0], vocabs[0])
            return logits, EnsembleState((step_state,)), weights
        total = weights_total = None
        states = []
        for model, part_memory, part_state, part_vocab in zip(self.models, memory.parts, state.parts, vocabs):
            logits, step_state, weights = model.decode_step(prev, part_memory, part_state, part_vocab)
            logp = logits.float().log_softmax(-1)  # (batch, vocab or n)
            total = logp if total is None else total.add_(logp)
            weights_total = weights.float() if weights_total is None else weights_total.add_(weights.float())
            states.append(step_state)
        count = len(self.models)
        return total.div_(count), EnsembleState(tuple(states)), weights_total.div_(count)

    def output_vocab(self, ids: torch.Tensor) -> EnsembleVocab:
        """What ``decode_step`` takes to score only the target tokens ``ids`` (n,), sorted."""
        return EnsembleVocab(ids, tuple(model.output_vocab(ids) for model in self.models))


class EnsembleLexicon(NamedTuple):
    """The models' lexicons as one: a sentence's shortlist is the union of its shortlists by each."""

    lexicons: tuple[Lexicon, ...]

    def shortlist(self, src: torch.Tensor, per_piece: int, frequent: int) -> Shortlist:
        """As ``Lexicon.shortlist``: src (batch, src_len) -> the union of the batch's ids, and per
        sentence the columns any model's lexicon allows it."""
        return union([lexicon.shortlist(src, per_piece, frequent) for lexicon in self.lexicons])

    @property
    def source_words(self) -> int:
        """The longest of the models' (``Lexicon.source_words``)."""
        return max(lexicon.source_words for lexicon in self.lexicons)

    @property
    def accented(self) -> torch.Tensor | None:
        """The pieces every model's ``Lexicon.accented`` holds (they share the tokenizer); None when one lacks them."""
        sets = [lexicon.accented for lexicon in self.lexicons]
        if any(ids is None for ids in sets):
            return None
        common = set.intersection(*(set(ids.tolist()) for ids in sets))
        return torch.tensor(sorted(common), dtype=torch.int32)

    @property
    def target_counts(self) -> torch.Tensor | None:
        """The models' ``Lexicon.target_counts`` summed (they share the tokenizer); None when one lacks them."""
        counts = [lexicon.target_counts for lexicon in self.lexicons]
        return None if any(c is None for c in counts) else torch.stack(counts).sum(0)


def ensemble_lexicon(lexicons: Sequence[Lexicon | None]) -> Lexicon | EnsembleLexicon | None:
    """One lexicon for the models: the first alone, or the union of all; None (the whole vocabulary,
    which any union with it is) when a model has none."""
    if any(lexicon is None for lexicon in lexicons):
        return None
    return lexicons[0] if len(lexicons) == 1 else EnsembleLexicon(tuple(lexicons))


def join_models(first: str | Path, fingerprint: str, model: nn.Module, lexicon: Lexicon | None, config: Any,
                others: Sequence[str | Path], device: torch.device
                ) -> tuple[Ensemble, Lexicon | EnsembleLexicon | None, list[Any]]:
    """``model`` (of ``first``, with its ``lexicon`` and ``config``) and the models of ``others``
    (checkpoints, run directories or exported folders, loaded on ``device``) as one ensemble, with
    the union of their lexicons and every model's config; a CheckpointError naming the two models
    where one does not share the tokenizer of ``first`` (its ``fingerprint``)."""
    models, lexicons, configs = [model], [lexicon], [config]
    for other in others:
        member, tokenizer, member_config, payload = load_model(other, device)
        if tokenizer.fingerprint != fingerprint:
            raise CheckpointError(f"{other} has another tokenizer (fingerprint {tokenizer.fingerprint[:12]}) than "
                                  f"{first} ({fingerprint[:12]}); an ensemble's models must share one tokenizer")
        vocab = (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
        lexicons.append(Lexicon.of_checkpoint(payload, vocab, str(other)))
        models.append(member)
        configs.append(member_config)
        del payload
    return Ensemble(models), ensemble_lexicon(lexicons), configs
