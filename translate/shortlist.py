"""Vocabulary selection for decoding (Jean et al., 2015; L'Hostis et al., 2016): a search scores
only the target pieces that are likely translations of some source piece in its batch, and the
most frequent pieces, instead of the whole vocabulary. On a CPU the output layer is most of a
decoding step, and a batch's shortlist is a small part of the vocabulary.

The lexicon is IBM Model 1 (Brown et al., 1993), fitted by EM on the tokenized training pairs
when a run starts and saved in every checkpoint: for each source piece, its likeliest target
pieces by t(target | source), the source EOS standing in for the model's empty word. A step's
probabilities are normalised over the shortlist, as Marian's lexical shortlists do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .encoded import EncodedCorpus
from .tokenizer import EOS, SPECIAL

TOP = 64  # translations kept per source piece: the most a decode can ask for


@dataclass(frozen=True)
class Lexicon:
    translations: torch.Tensor  # (src_vocab, TOP) int32 target ids, likeliest first; -1 past a piece's last
    frequent: torch.Tensor  # (tgt_vocab,) int32 target ids, most frequent in the training targets first

    def shortlist(self, src: torch.Tensor, per_piece: int, frequent: int) -> torch.Tensor:
        """The target ids a batch may produce: src (batch, src_len) source ids -> (n,) int64, sorted
        and so starting with the special tokens (column i is token i for i < 4, as the searches
        expect): the ``frequent`` most frequent pieces and the ``per_piece`` likeliest
        translations of every source piece in the batch."""
        if not 1 <= per_piece <= self.translations.size(1):
            raise ValueError(f"per_piece must be from 1 to {self.translations.size(1)}, not {per_piece}")
        pieces = src.reshape(-1).cpu().unique().clamp(max=self.translations.size(0) - 1)
        candidates = self.translations[pieces, :per_piece].reshape(-1)
        specials = torch.arange(SPECIAL, dtype=torch.int32)
        ids = torch.cat([specials, self.frequent[:frequent], candidates[candidates >= 0]])
        return ids.unique().long()  # sorted

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of it."""
        return {"translations": self.translations, "frequent": self.frequent}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Lexicon:
        return cls(state["translations"].to(torch.int32), state["frequent"].to(torch.int32))

    @classmethod
    def of_checkpoint(cls, payload: dict) -> Lexicon | None:
        """A checkpoint's lexicon; None for one written before lexicons were saved."""
        return cls.from_state(payload["lexicon"]) if payload.get("lexicon") else None


def build_lexicon(src: EncodedCorpus, tgt: EncodedCorpus, src_vocab: int, tgt_vocab: int, iterations: int = 5,
                  max_links: int = 20_000_000, max_len: int = 200, seed: int = 0) -> Lexicon:
    """IBM Model 1 on (a random sample of) the tokenized pairs with both sides 1 to ``max_len``
    pieces long, up to ``max_links`` source x target position pairs (about 1 GB of working memory
    at the most), ``iterations`` rounds of EM from uniform t(target | source); keeps each source
    piece's ``TOP`` likeliest translations."""
    src_len, tgt_len = np.asarray(src.lengths, dtype=np.int64), np.asarray(tgt.lengths, dtype=np.int64)
    usable = np.flatnonzero((src_len > 0) & (tgt_len > 0) & (src_len <= max_len) & (tgt_len <= max_len))
    order = usable[np.random.default_rng(seed).permutation(len(usable))]
    links = (src_len[order] + 1) * tgt_len[order]
    chosen = order[: int(np.searchsorted(np.cumsum(links), max_links, side="right"))]
    sources, targets, positions = [], [], []  # per link: source id, target id, which target token
    target_tokens = []
    token = 0
    for i in chosen:
        s = np.append(np.asarray(src[i], dtype=np.int32), np.int32(EOS))  # EOS: the empty word
        t = np.asarray(tgt[i], dtype=np.int32)
        target_tokens.append(t)
        sources.append(np.tile(s, len(t)))
        targets.append(np.repeat(t, len(s)))
        positions.append(np.repeat(np.arange(token, token + len(t), dtype=np.int64), len(s)))
        token += len(t)
    counts = np.bincount(np.concatenate(target_tokens or [np.zeros(0, np.int32)]), minlength=tgt_vocab)[:tgt_vocab]
    frequent = np.lexsort((np.arange(tgt_vocab), -counts)).astype(np.int32)  # most frequent first, ties by id
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
    return Lexicon(torch.from_numpy(translations), torch.from_numpy(frequent))

