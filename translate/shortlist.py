"""Vocabulary selection for decoding (Jean et al., 2015; L'Hostis et al., 2016): a search scores
only the target pieces that are likely translations of some source piece of the sentence, and the
most frequent pieces, instead of the whole vocabulary. On a CPU the output layer is most of a
decoding step, and a sentence's shortlist is a small part of the vocabulary.

Each sentence has a shortlist of its own, so that its translation does not depend on the sentences
batched with it (in ``translate serve``, other clients' requests): a batch's output layer is taken
over the union of its sentences' shortlists, once, and each sentence's probabilities are
normalised over its own (``Shortlist.allowed``), as Marian's lexical shortlists normalise over
theirs.

The lexicon is IBM Model 1 (Brown et al., 1993), fitted by EM on the tokenized training pairs
when a run starts and saved in every checkpoint: for each source piece, its likeliest target
pieces by t(target | source), the source EOS standing in for the model's empty word. It also keeps
how long the training sources were (``source_words``), for how long a clause decoding leaves whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .encoded import EncodedCorpus
from .errors import CheckpointError
from .tokenizer import EOS, PAD, SPECIAL

TOP = 64  # translations kept per source piece: the most a decode can ask for


class Shortlist(NamedTuple):
    """A batch's shortlists: the columns its output layer scores and which of them each sentence may produce."""

    ids: torch.Tensor  # (n,) int64 target ids, sorted, from the special tokens on: the union of the sentences'
    allowed: torch.Tensor  # (batch, n) bool: the columns of each sentence's own shortlist


def union(lists: Sequence[Shortlist]) -> Shortlist:
    """One batch's shortlists as one: the union of their columns, and per sentence each column any
    of them allows it."""
    ids = torch.cat([one.ids for one in lists]).unique()  # (n,) sorted
    allowed = torch.zeros(lists[0].allowed.size(0), ids.numel(), dtype=torch.bool)  # (batch, n)
    for one in lists:
        allowed[:, torch.searchsorted(ids, one.ids)] |= one.allowed
    return Shortlist(ids, allowed)


@dataclass(frozen=True)
class Lexicon:
    translations: torch.Tensor  # (src_vocab, TOP) int32 target ids, likeliest first; -1 past a piece's last
    frequent: torch.Tensor  # (tgt_vocab,) int32 target ids, most frequent in the training targets first
    # words of the training sources: 99.9% of them are no longer (SOURCE_SHARE); 0: not known (older checkpoints)
    source_words: int = 0
    # (tgt_vocab,) int64 how often each target piece occurs in the fitted targets (the letters the target
    # language is written in: names.TargetLetters); None: not known (older checkpoints)
    target_counts: torch.Tensor | None = None
    # (n,) int32 the whole-word source pieces with a written accent, ñ or ü that the training sources write more
    # often than their plain spelling (casual.accented_pieces, for text typed without accents); None: not known
    accented: torch.Tensor | None = None

    def shortlist(self, src: torch.Tensor, per_piece: int, frequent: int) -> Shortlist:
        """The target ids each sentence may produce: src (batch, src_len) source ids, PAD after a
        sentence's end. A sentence's shortlist is the special tokens, the ``frequent`` most frequent
        pieces and the ``per_piece`` likeliest translations of each of its own source pieces; the
        ids are sorted and so start with the special tokens (column i is token i for i < 4, as the
        searches expect)."""
        if not 1 <= per_piece <= self.translations.size(1):
            raise ValueError(f"per_piece must be from 1 to {self.translations.size(1)}, not {per_piece}")
        src = src.cpu()
        pieces = src.clamp(max=self.translations.size(0) - 1)  # (batch, src_len)
        candidates = self.translations[pieces, :per_piece].long()  # (batch, src_len, per_piece), -1 for none
        candidates = candidates.masked_fill((src == PAD).unsqueeze(2), -1).flatten(1)  # (batch, src_len*per_piece)
        common = torch.cat([torch.arange(SPECIAL), self.frequent[:frequent].long()])  # every sentence's
        ids = torch.cat([common, candidates[candidates >= 0]]).unique()  # (n,) sorted
        allowed = torch.zeros(src.size(0), ids.numel(), dtype=torch.bool)  # (batch, n)
        allowed[:, torch.searchsorted(ids, common)] = True
        columns = torch.searchsorted(ids, candidates.clamp(min=0)).masked_fill_(candidates < 0, PAD)
        allowed.scatter_(1, columns, True)  # PAD's column, where there is no candidate, is every sentence's anyway
        return Shortlist(ids, allowed)

    def check(self, src_vocab: int, tgt_vocab: int, origin: str = "checkpoint") -> Lexicon:
        """Itself, when it fits a model with these vocabularies; else a CheckpointError: an id out
        of range would index past the output layer (on a GPU, a device-side assert that breaks the
        process for every later request)."""
        t, f = self.translations, self.frequent
        if t.dim() != 2 or t.size(0) != src_vocab or not 1 <= t.size(1) <= TOP or f.dim() != 1:
            raise CheckpointError(f"{origin}: its lexicon does not fit the model's vocabulary (translations "
                                  f"{tuple(t.shape)}, frequent {tuple(f.shape)} for {src_vocab:,} source and "
                                  f"{tgt_vocab:,} target pieces); export the model again")
        counts = self.target_counts
        if counts is not None and (counts.dim() != 1 or counts.numel() != tgt_vocab):
            raise CheckpointError(f"{origin}: its lexicon's target counts do not fit the {tgt_vocab:,} target "
                                  f"pieces ({tuple(counts.shape)}); export the model again")
        accented = self.accented
        if accented is not None and accented.numel() and (int(accented.min()) < 0 or int(accented.max()) >= src_vocab):
            raise CheckpointError(f"{origin}: its lexicon's accented words hold source ids outside the vocabulary "
                                  f"of {src_vocab:,} pieces; export the model again")
        for name, ids, low in (("translations", t, -1), ("frequent", f, 0)):
            if ids.numel() and (int(ids.min()) < low or int(ids.max()) >= tgt_vocab):
                raise CheckpointError(f"{origin}: its lexicon's {name} hold target ids outside the vocabulary "
                                      f"of {tgt_vocab:,} pieces ({int(ids.min())} to {int(ids.max())}); "
                                      f"export the model again")
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of it."""
        state = {"translations": self.translations, "frequent": self.frequent,
                 "source_words": torch.tensor([self.source_words], dtype=torch.int32)}
        if self.target_counts is not None:
            state["target_counts"] = self.target_counts
        if self.accented is not None:
            state["accented"] = self.accented
        return state

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Lexicon:
        words, counts, accented = state.get("source_words"), state.get("target_counts"), state.get("accented")
        return cls(state["translations"].to(torch.int32), state["frequent"].to(torch.int32),
                   0 if words is None else int(words.reshape(-1)[0]),
                   None if counts is None else counts.to(torch.int64),
                   None if accented is None else accented.to(torch.int32).reshape(-1))

    @classmethod
    def of_checkpoint(cls, payload: dict, vocab: tuple[int, int] | None = None,
                      origin: str = "checkpoint") -> Lexicon | None:
        """A checkpoint's lexicon, checked (``check``) against the model's (source, target)
        ``vocab`` sizes when given; None for one written before lexicons were saved."""
        state = payload.get("lexicon")
        if not state:
            return None
        try:
            lexicon = cls.from_state(state)
        except (KeyError, TypeError, AttributeError, RuntimeError):
            raise CheckpointError(f"{origin}: its lexicon is incomplete or damaged; export the model again") from None
        return lexicon if vocab is None else lexicon.check(*vocab, origin)


def build_lexicon(src: EncodedCorpus, tgt: EncodedCorpus, src_vocab: int, tgt_vocab: int, iterations: int = 5,
                  max_links: int = 20_000_000, max_len: int = 200, seed: int = 0,
                  word_starts: np.ndarray | None = None) -> Lexicon:
    """IBM Model 1 on (a random sample of) the tokenized pairs with both sides 1 to ``max_len``
    pieces long, up to ``max_links`` source x target position pairs, and up to a quarter as many
    again for pairs that hold source pieces the sample lacks (``_sample``; about 1.3 GB of working
    memory at the most), ``iterations`` rounds of EM from uniform t(target | source); keeps each
    source piece's ``TOP`` likeliest translations. ``word_starts`` ((src_vocab,) True for a piece
    that starts a word) counts the sample's source words (``source_words``)."""
    src_len, tgt_len = np.asarray(src.lengths, dtype=np.int64), np.asarray(tgt.lengths, dtype=np.int64)
    usable = np.flatnonzero((src_len > 0) & (tgt_len > 0) & (src_len <= max_len) & (tgt_len <= max_len))
    order = usable[np.random.default_rng(seed).permutation(len(usable))]
    chosen = _sample(src, order, (src_len[order] + 1) * tgt_len[order], src_vocab, max_links)
    sources, targets, positions = [], [], []  # per link: source id, target id, which target token
    target_tokens = []
    words = []  # per chosen source: its words (with word_starts)
    token = 0
    for i in chosen:
        s = np.append(np.asarray(src[i], dtype=np.int32), np.int32(EOS))  # EOS: the empty word
        if word_starts is not None:
            words.append(int(np.count_nonzero(word_starts[s[:-1]])))
        t = np.asarray(tgt[i], dtype=np.int32)
        target_tokens.append(t)
        sources.append(np.tile(s, len(t)))
        targets.append(np.repeat(t, len(s)))
        positions.append(np.repeat(np.arange(token, token + len(t), dtype=np.int64), len(s)))
        token += len(t)
    counts = np.bincount(np.concatenate(target_tokens or [np.zeros(0, np.int32)]), minlength=tgt_vocab)[:tgt_vocab]
    frequent = np.lexsort((np.arange(tgt_vocab), -counts)).astype(np.int32)  # most frequent first, ties by id
    target_counts = torch.from_numpy(counts.astype(np.int64))
    del target_tokens
    translations = np.full((src_vocab, TOP), -1, dtype=np.int32)
    if token:
        s_ids, t_ids = np.concatenate(sources), np.concatenate(targets)
        position = np.concatenate(positions)
        del sources, targets, positions
        pairs, link_pair = np.unique(s_ids.astype(np.int64) * tgt_vocab + t_ids, return_inverse=True)
        del s_ids, t_ids
        pair_src, pair_tgt = pairs // tgt_vocab, pairs % tgt_vocab
        prob = np.ones(len(pairs), dtype=np.float32)  # t(target | source), uniform to start
        for _ in range(iterations):
            share = prob[link_pair]
            share /= np.bincount(position, weights=share, minlength=token)[position].astype(np.float32)
            counts = np.bincount(link_pair, weights=share, minlength=len(pairs))
            prob = (counts / np.bincount(pair_src, weights=counts, minlength=src_vocab)[pair_src]).astype(np.float32)
        ranked = np.lexsort((pair_tgt, -prob, pair_src))  # by source, likeliest first (ties: lower id)
        ranked_src = pair_src[ranked]
        rank = np.arange(len(ranked)) - np.searchsorted(ranked_src, ranked_src)
        keep = rank < TOP
        translations[ranked_src[keep], rank[keep]] = pair_tgt[ranked][keep]
    source_words = int(np.ceil(np.percentile(words, SOURCE_SHARE))) if words else 0
    return Lexicon(torch.from_numpy(translations), torch.from_numpy(frequent), source_words, target_counts)


SOURCE_SHARE = 99.9  # percent of the training sources that Lexicon.source_words covers


def _sample(src: EncodedCorpus, order: np.ndarray, links: np.ndarray, src_vocab: int, max_links: int) -> list[int]:
    """The pairs to fit the lexicon on: those of ``order`` (shuffled) up to ``max_links`` links
    (``links``, each pair's), then, where that leaves pairs out, those of the rest, in their order,
    that hold a source piece no pair chosen so far holds, up to ``max_links // 4`` links more: a
    piece seldom seen (a name, a number in a big corpus) gets translations of its own too, rather
    than none."""
    cut = int(np.searchsorted(np.cumsum(links), max_links, side="right"))
    chosen = order[:cut].tolist()
    if cut == len(order):
        return chosen
    seen = np.zeros(src_vocab, dtype=bool)
    for i in chosen:
        seen[np.asarray(src[i])] = True
    budget = max_links // 4
    for i, cost in zip(order[cut:].tolist(), links[cut:].tolist()):
        pieces = np.asarray(src[i])
        if cost <= budget and not seen[pieces].all():
            chosen.append(i)
            seen[pieces] = True
            budget -= cost
    return chosen
