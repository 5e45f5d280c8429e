"""Training and decoding batches: token-budget batches with length bucketing, padded and masked,
and the grouping of an epoch's batches into optimiser steps, for a tokenized corpus held in
memory or on disk (``encoded.py``) or read as a stream.

Mask convention everywhere: ``mask`` is True on real tokens and False on padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .encoded import Encoded, EncodedCorpus
from .tokenizer import BOS, EOS, PAD, Tokenizer


@dataclass(frozen=True)
class Batch:
    src: torch.Tensor  # (batch, src_len) ids with EOS, PAD after it
    src_lengths: torch.Tensor  # (batch,) on the CPU, for packing
    src_mask: torch.Tensor  # (batch, src_len) True on real tokens
    tgt_in: torch.Tensor | None  # (batch, tgt_len) BOS y1 .. yn, PAD after
    tgt_out: torch.Tensor | None  # (batch, tgt_len) y1 .. yn EOS, PAD after
    indices: list[int]  # the sentences' positions in the corpus

    @property
    def size(self) -> int:
        return self.src.size(0)

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        move = lambda t: None if t is None else t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.src), self.src_lengths, move(self.src_mask), move(self.tgt_in),
                     move(self.tgt_out), self.indices)


def collate(src: EncodedCorpus, tgt: EncodedCorpus | None, indices: Sequence[int],
            max_src_len: int | None = None) -> Batch:
    """Pads one batch; source gets EOS, target gets BOS (input) and EOS (output)."""
    src_seqs = [src[i] if max_src_len is None else src[i][: max_src_len - 1] for i in indices]
    src_lengths = torch.tensor([len(s) + 1 for s in src_seqs], dtype=torch.long)
    src_ids = torch.full((len(indices), int(src_lengths.max())), PAD, dtype=torch.long)
    for row, seq in enumerate(src_seqs):
        src_ids[row, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        src_ids[row, len(seq)] = EOS
    src_mask = src_ids != PAD
    tgt_in = tgt_out = None
    if tgt is not None:
        tgt_seqs = [tgt[i] for i in indices]
        width = max(len(t) for t in tgt_seqs) + 1
        tgt_in = torch.full((len(indices), width), PAD, dtype=torch.long)
        tgt_out = torch.full((len(indices), width), PAD, dtype=torch.long)
        for row, seq in enumerate(tgt_seqs):
            ids = torch.from_numpy(seq.astype(np.int64))
            tgt_in[row, 0] = BOS
            tgt_in[row, 1: len(seq) + 1] = ids
            tgt_out[row, : len(seq)] = ids
            tgt_out[row, len(seq)] = EOS
    return Batch(src_ids, src_lengths, src_mask, tgt_in, tgt_out, list(indices))


def token_batches(lengths: np.ndarray, batch_tokens: int, rng: np.random.Generator | None = None,
                  pool_batches: int = 50) -> list[np.ndarray]:
    """Groups sentence indices into batches of at most ``batch_tokens`` padded tokens.

    ``lengths`` is each example's padded length (the longer side); 0 leaves an example out. With
    ``rng`` the corpus is shuffled, then sorted by length inside pools of ``pool_batches``
    batches (length bucketing: little padding, yet random batches), and the batches are
    shuffled; without it, batches follow length order (for decoding). Works on the lengths alone
    (a few bytes a sentence), never on the sentences, and loops over batches, not sentences.
    """
    n = len(lengths)
    index_type = np.int32 if n < 2 ** 31 else np.int64
    kept = lengths > 0
    order = np.arange(n, dtype=index_type) if kept.all() else np.flatnonzero(kept).astype(index_type)
    del kept
    if rng is not None:
        rng.shuffle(order)  # the same permutation as rng.permutation, without an int64 copy
    count = len(order)
    mean = max(1.0, float(lengths.sum(dtype=np.float64)) / count) if count else 1.0
    pool = max(1, int(pool_batches * batch_tokens / mean)) if rng is not None else max(count, 1)
    batches: list[np.ndarray] = []
    for start in range(0, count, pool):
        chunk = order[start: start + pool]
        chunk[:] = chunk[np.argsort(lengths[chunk], kind="stable")]  # in place: batches are views of order
        sizes = lengths[chunk].astype(np.int64)  # ascending
        i, m = 0, len(chunk)
        while i < m:
            # the longest run chunk[i:j] whose padded size sizes[j-1] * (j - i) fits; at least one
            lo, hi = i + 1, min(m, i + max(1, batch_tokens // int(sizes[i])))
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if sizes[mid - 1] * (mid - i) <= batch_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            batches.append(chunk[i:lo])
            i = lo
    if rng is not None:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def padding_fraction(lengths: np.ndarray, batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions in the batches (0 = no padding)."""
    real = padded = 0
    for batch in batches:
        sizes = lengths[batch]
        real += int(sizes.sum())
        padded += int(sizes.max()) * len(batch)
    return 1 - real / padded if padded else 0.0


class TrainingData:
    """A tokenized training corpus (in memory or on disk) and its epoch-by-epoch batches. Pairs
    with an empty side or a side longer than ``max_len`` pieces stay in the corpus but never
    enter a batch."""

    def __init__(self, src: EncodedCorpus, tgt: EncodedCorpus, batch_tokens: int, seed: int,
                 max_len: int | None = None):
        self.src, self.tgt = src, tgt
        self.batch_tokens, self.seed = batch_tokens, seed
        # padded length (the longer side + EOS/BOS), 0 for pairs left out; 2 bytes a pair, computed
        # a million pairs at a time, so a corpus of any size needs no large temporaries
        n = len(src.lengths)
        self.lengths = np.empty(n, dtype=np.uint16)
        for start in range(0, n, 1 << 20):
            s_len = np.asarray(src.lengths[start: start + (1 << 20)])
            t_len = np.asarray(tgt.lengths[start: start + (1 << 20)])
            part = np.minimum(np.maximum(s_len, t_len), 65534).astype(np.uint16) + 1
            part[(s_len == 0) | (t_len == 0)] = 0
            if max_len is not None:
                part[part > max_len + 1] = 0
            self.lengths[start: start + len(part)] = part
        self.size = int(np.count_nonzero(self.lengths))
        self.dropped = n - self.size

    def __len__(self) -> int:
        return self.size

    def target_tokens(self, indices: Sequence[int]) -> int:
        """Target tokens the loss counts for these examples (each sentence and its EOS)."""
        indices = np.asarray(indices)
        return int(self.tgt.lengths[indices].sum(dtype=np.int64)) + len(indices)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch; the same for the same seed and epoch (for exact resume)."""
        rng = np.random.default_rng([self.seed, epoch])
        return token_batches(self.lengths, self.batch_tokens, rng)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        for position, indices in enumerate(self.epoch_batches(epoch)[start:], start=start):
            yield position, collate(self.src, self.tgt, indices)

    def steps(self, epoch: int, start: int, group: int, mine: slice) -> Iterator[tuple[int, list[Batch], int]]:
        """``group_steps`` over the epoch's batches from batch ``start`` on, every batch in a step."""
        yield from self.group_steps(self.epoch_batches(epoch), start, group, mine)

    def group_steps(self, batches: Sequence[np.ndarray], first: int, group: int, mine: slice,
                    offset: int = 0) -> Iterator[tuple[int, list[Batch], int]]:
        """One optimiser step per ``group`` consecutive batches from ``batches[first]`` on:
        (``offset`` + position after the step, this process's share of the step collated, target
        tokens of the whole step, which the loss is averaged over). An incomplete last group is
        filled up with the first batches again (round and round when there are fewer batches than
        a step takes), so that every pair trains each epoch, as many times as with one process;
        its position, past the last batch, ends the epoch on resume too."""
        count = len(batches)
        for position in range(first, count, group):
            step = [batches[(position + i) % count] for i in range(group)]
            yield (offset + position + group, [collate(self.src, self.tgt, b) for b in step[mine]],
                   sum(self.target_tokens(b) for b in step))


class StreamingData:
    """Training batches from a corpus read as a stream (``data.streaming``), never materialised:
    pairs are tokenized as they arrive and bucketed by length inside pools of ``pool_batches``
    batches, each shuffled with the epoch's seed. A pass over the stream is an epoch; resuming
    reads the stream again and skips the batches already trained on."""

    def __init__(self, table, tokenizer: Tokenizer, src_lang: str, tgt_lang: str, batch_tokens: int, seed: int,
                 max_len: int, pool_batches: int = 50, mean_length: int = 20):
        self.table, self.tokenizer = table, tokenizer
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.batch_tokens, self.seed, self.max_len = batch_tokens, seed, max_len
        self.pool = max(1000, pool_batches * batch_tokens // mean_length)  # pairs per bucketing pool
        self.dropped = 0

    def _pools(self) -> Iterator[tuple[list[list[int]], list[list[int]]]]:
        src: list[list[int]] = []
        tgt: list[list[int]] = []
        for rows in self.table.iter(batch_size=1000):
            src_ids = self.tokenizer.encode_src(rows[self.src_lang])
            encoded = zip(src_ids, self.tokenizer.encode_tgt(rows[self.tgt_lang]))
            for s, t in encoded:
                if 0 < len(s) <= self.max_len and 0 < len(t) <= self.max_len:
                    src.append(s)
                    tgt.append(t)
                else:
                    self.dropped += 1
            if len(src) >= self.pool:
                yield src, tgt
                src, tgt = [], []
        if src:
            yield src, tgt

    def steps(self, epoch: int, start: int, group: int, mine: slice) -> Iterator[tuple[int, list[Batch], int]]:
        """``TrainingData.group_steps`` over each pool's batches, positions counted across the
        pools; a step whose position is at most ``start`` was trained on before, and is skipped
        without collating it. The pairs of a pool's incomplete last group join the next pool;
        after the stream's last pool what is left makes a pool of its own, whose last group is
        filled up (``group_steps``): every pair trains each epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        done = 0  # batches of the epoch in the steps of the pools before this one
        self.dropped = 0
        carried: tuple[list, list] = ([], [])  # the pairs of the last pool's incomplete group
        for src, tgt in self._pools():
            src, tgt = carried[0] + src, carried[1] + tgt
            data = TrainingData(Encoded(src), Encoded(tgt), self.batch_tokens, self.seed)
            batches = token_batches(data.lengths, self.batch_tokens, rng)
            whole = len(batches) - len(batches) % group
            # step k of this pool ends at done + (k + 1) * group; the first past start: k = (start - done) // group
            yield from data.group_steps(batches[:whole], max(0, (start - done) // group) * group, group, mine,
                                        offset=done)
            carried = ([src[i] for b in batches[whole:] for i in b], [tgt[i] for b in batches[whole:] for i in b])
            done += whole
        if carried[0]:
            data = TrainingData(Encoded(carried[0]), Encoded(carried[1]), self.batch_tokens, self.seed)
            batches = token_batches(data.lengths, self.batch_tokens, rng)
            yield from data.group_steps(batches, max(0, (start - done) // group) * group, group, mine, offset=done)


class Joined:
    """Two tokenized corpora read as one (an ``EncodedCorpus``): the second's sentences follow the
    first's. ``lengths`` may be given with some set to 0, which leaves those sentences out of
    batches and of the lexicon."""

    def __init__(self, first: EncodedCorpus, second: EncodedCorpus, lengths: np.ndarray | None = None):
        self.first, self.second, self.split = first, second, len(first)
        self.lengths = (np.concatenate([np.asarray(first.lengths), np.asarray(second.lengths)])
                        if lengths is None else lengths)  # (n,)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.first[i] if i < self.split else self.second[i - self.split]

    def only(self, keep: np.ndarray) -> Joined:
        """The same sentences, those where ``keep`` (n,) is False left out."""
        return Joined(self.first, self.second, np.where(keep, self.lengths, 0).astype(self.lengths.dtype))


MIX_DRAW = 1  # the mixed sample's own random stream, beside the shuffle's (seed, epoch)


class MixedData(TrainingData):
    """Mixed fine-tuning (Chu et al., 2017): every epoch trains on all the new pairs and on a
    fresh random sample of a mixed corpus (e.g. the general-domain data a model was trained on),
    drawn from the seed and the epoch alone, so a resumed run draws what an uninterrupted one does.
    The sample holds ``ratio`` times the new pairs' tokens (a pair counts its longer side), as
    many pairs as that takes at the mixed corpus' mean length: counted in pairs, a mix of short
    sentences into long verses would be a fraction of what the model reads. Batches hold new and
    mixed pairs together."""

    def __init__(self, new: tuple[EncodedCorpus, EncodedCorpus], mixed: tuple[EncodedCorpus, EncodedCorpus],
                 ratio: float, batch_tokens: int, seed: int, max_len: int | None = None):
        super().__init__(Joined(new[0], mixed[0]), Joined(new[1], mixed[1]), batch_tokens, seed, max_len)
        self.new_pairs = len(new[0])
        new_kept = int(np.count_nonzero(self.lengths[: self.new_pairs]))
        self.mixed_kept = np.flatnonzero(self.lengths[self.new_pairs:]) + self.new_pairs  # (m,) usable mixed pairs
        new_tokens = int(self.lengths[: self.new_pairs].sum(dtype=np.int64))
        mean = float(self.lengths[self.mixed_kept].mean()) if len(self.mixed_kept) else 1.0
        self.per_epoch = min(len(self.mixed_kept), round(ratio * new_tokens / mean))  # mixed pairs an epoch
        self.size = new_kept + self.per_epoch

    def epoch_pairs(self, epoch: int) -> np.ndarray:
        """(n,) True for the pairs of ``epoch``: every new pair, and that epoch's mixed sample."""
        keep = np.zeros(len(self.lengths), dtype=bool)
        keep[: self.new_pairs] = True
        rng = np.random.default_rng([self.seed, epoch, MIX_DRAW])
        keep[rng.choice(self.mixed_kept, self.per_epoch, replace=False)] = True
        return keep

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        lengths = np.where(self.epoch_pairs(epoch), self.lengths, 0).astype(self.lengths.dtype)
        return token_batches(lengths, self.batch_tokens, np.random.default_rng([self.seed, epoch]))
