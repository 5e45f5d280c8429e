"""Decoding as pure functions over ``model.encode`` / ``model.decode_step``.

Both searches are batched: greedy runs all sentences together and stops when every one has
ended; beam search flattens batch x beam into one dimension, reorders states with
``index_select``, moves finished hypotheses out with tensor ops and drops finished sentences
from the batch. Length penalty: Wu et al. (2016), ((5 + length) / 6) ** alpha.

A beam-search step (``beam_step``) is cut into small parts, each tested against a plain version
(as Sockeye cuts its search): ``step_bounds`` and ``step_candidates`` score the continuations,
``best_continuations`` ranks them, ``finish`` moves the ended ones into ``Finished``, ``advance``
makes the next ``Beams`` from the rest and ``drop_done`` lets finished sentences leave the batch.

Both searches can block repeated n-grams (``repeat_bans``): a hypothesis may not produce a token
that would complete an n-gram of target pieces it already holds, which stops the loops a model
falls into on text unlike its training data.

Beam search can add a coverage penalty to a finished hypothesis' score (``coverage_penalty``; Wu et
al., 2016, eq. 14), so that of the hypotheses that end, one that left source words unattended ranks
lower: the attention each hypothesis has paid every source position is summed step by step and
reordered with the beams.

Greedy can also sample (``Sampler``): each token drawn from the model's distribution, sharpened or
flattened by a temperature and cut to the top-k tokens and to the nucleus (top-p, Holtzman et al.,
2020), each row drawing from a random stream of its own, so that a sentence's draws do not depend
on the batch it is decoded in.

Both searches can force the start of the output (``prefix``): for a row's first steps the prefix's
pieces are its only continuation, scored with their log-probability, whatever a ban or a length
rule would say; the search then goes on as usual.

Batching, precision and threads belong to ``translator.Translator``: these functions take one
encoded batch and return its hypotheses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .decoder import DecoderState, Memory, OutputVocab
from .tokenizer import BOS, EOS, PAD

NEG_INF = float("-inf")
NOT_OUTPUT = (PAD, BOS)  # tokens a search never produces


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # log-probability; length-normalised in beam search
    attention: torch.Tensor | None = None  # (len(tokens) + 1, src_len), the last row for EOS


def max_lengths(src_lengths: torch.Tensor, ratio: float, extra: int = 10, cap: int = 1024) -> torch.Tensor:
    """Longest output allowed per sentence (counting EOS): ``ratio * src_len + extra``."""
    return (src_lengths.float() * ratio).long().add(extra).clamp(min=1, max=cap)


def repeat_bans(seqs: torch.Tensor, n: int, vocab: OutputVocab | None = None) -> torch.Tensor | None:
    """The columns each row may not produce because the token would complete an n-gram of ``n``
    pieces that the row already holds: n-gram blocking (Paulus et al., 2018; fairseq's
    --no-repeat-ngram-size, OpenNMT-py's block_ngram_repeat). seqs: (rows, t) the tokens so far,
    without BOS -> (rows, t - n + 1) columns (of ``vocab``, a shortlist, when given), PAD's column
    where a window bans nothing (PAD is never an output anyway); None when nothing can be banned
    (n is 0 or the rows are shorter than n). Compares the last n - 1 tokens with every window."""
    t = seqs.size(1)
    if n <= 0 or t < n:
        return None
    windows = seqs.unfold(1, n, 1)  # (rows, t - n + 1, n) every n-gram so far
    seen = (windows[:, :, :-1] == seqs[:, t - n + 1:].unsqueeze(1)).all(2)  # (rows, t - n + 1) starts as the row ends
    token = windows[:, :, -1].contiguous()  # (rows, t - n + 1) the token that completed each
    if vocab is not None:  # token -> column: the shortlist's ids are sorted and hold every token produced
        column = torch.searchsorted(vocab.ids, token).clamp_(max=vocab.ids.numel() - 1)
        seen &= vocab.ids[column] == token
        token = column
    return token.masked_fill(~seen, PAD)


def _allowed(logp: torch.Tensor, force: torch.Tensor | None, early: torch.Tensor | None = None,
             banned: torch.Tensor | None = None) -> torch.Tensor:
    """What a search may produce. logp: (rows, vocab) log-probabilities, changed in place: PAD and
    BOS are never an output token (as in fairseq's search); force: (rows,) rows that must end now
    get EOS as the only option (None: no row must); early: (rows,) rows too short to end may not
    produce EOS; banned: (rows, m) columns a row may not produce (``repeat_bans``; EOS never is)."""
    if banned is not None:
        logp.scatter_(1, banned, NEG_INF)
    logp.index_fill_(1, torch.tensor(NOT_OUTPUT, device=logp.device), NEG_INF)
    if early is not None:
        logp[:, EOS].masked_fill_(early, NEG_INF)
    if force is None or not bool(force.any()):
        return logp
    only_eos = torch.full_like(logp, NEG_INF)
    only_eos[:, EOS] = logp[:, EOS]
    return torch.where(force.unsqueeze(1), only_eos, logp)


def prefix_columns(prefix: torch.Tensor | None, rows: torch.Tensor, t: int,
                   vocab: OutputVocab | None) -> torch.Tensor | None:
    """The column each row must produce at step ``t`` (-1: none, the row is past its prefix), or
    None where no row must. prefix: (batch, p) target ids, PAD past a sentence's prefix; rows:
    (live,) each row's sentence. Every prefix id is in ``vocab`` (the caller adds them)."""
    if prefix is None or t >= prefix.size(1):
        return None
    tokens = prefix[rows, t]  # (live,)
    if not bool((tokens != PAD).any()):
        return None
    columns = tokens if vocab is None else torch.searchsorted(vocab.ids, tokens).clamp_(max=vocab.ids.numel() - 1)
    return columns.masked_fill(tokens == PAD, -1)


def force_columns(logp: torch.Tensor, kept: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """``logp`` (rows, columns) with each forced row's only option its ``forced`` column, scored
    ``kept`` (rows,), its log-probability before any ban; rows with -1 unchanged."""
    only = torch.full_like(logp, NEG_INF).scatter_(1, forced.clamp(min=0).unsqueeze(1), kept.unsqueeze(1))
    return torch.where((forced >= 0).unsqueeze(1), only, logp)


def sampling_distribution(logp: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0) -> torch.Tensor:
    """The probabilities a row samples its next token from. logp: (rows, columns) log-probabilities
    (-inf where not allowed) -> (rows, columns) summing to 1: ``softmax(logp / temperature)``
    (temperature 0: all on the likeliest column, as greedy picks), over the ``top_k`` likeliest
    columns (0: all; ties with the k-th are kept), then over the nucleus: the likeliest columns
    whose probabilities sum to ``top_p``, the one that crosses it included (Holtzman et al., 2020)."""
    if temperature == 0:
        return torch.zeros_like(logp).scatter_(1, logp.argmax(-1, keepdim=True), 1.0)
    scaled = logp / temperature  # (rows, columns)
    if 0 < top_k < scaled.size(1):
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (rows, 1)
        scaled = scaled.masked_fill(scaled < kth, NEG_INF)
    probs = scaled.softmax(-1)
    if top_p < 1.0:
        ranked, order = probs.sort(dim=-1, descending=True)  # (rows, columns)
        before = ranked.cumsum(-1) - ranked  # the probability of the likelier columns
        probs = probs.masked_fill(torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, before >= top_p), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@dataclass
class Sampler:
    """How greedy samples instead of picking the likeliest token: ``draws``, one random stream per
    row of the batch (a sentence's, seeded by the caller), and the distribution's settings
    (``sampling_distribution``). Each step takes one uniform number from each live row's stream and
    inverts the distribution's cumulative sum with it, so a row's tokens depend on its own stream
    and probabilities only."""

    draws: list[np.random.Generator]
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def pick(self, logp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The column drawn for each row. logp: (live, columns); rows: (live,) their batch rows."""
        probs = sampling_distribution(logp, self.temperature, self.top_k, self.top_p)
        uniform = torch.tensor([self.draws[row].random() for row in rows.tolist()], dtype=torch.float64,
                               device=logp.device)  # (live,)
        cdf = probs.double().cumsum(-1)  # (live, columns)
        chosen = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        return chosen.clamp_(max=logp.size(1) - 1)


@torch.no_grad()
def greedy(model, memory: Memory, state: DecoderState, max_lens: torch.Tensor,
           return_attention: bool = False, vocab: OutputVocab | None = None,
           no_repeat_ngram: int = 0, allowed: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
           sampler: Sampler | None = None) -> list[list[Hypothesis]]:
    """Picks the most probable token at each step, or draws one with ``sampler`` (no hypothesis
    for a sentence whose score, the model's log-probability of its tokens, is not finite); prefix:
    (batch, p) target ids each output starts with (PAD past a sentence's; ``prefix_columns``), whose
    room ``max_lens`` must hold; max_lens: (batch,) limits counting EOS; ``vocab``:
    a shortlist, the only tokens scored; ``allowed``: (batch, columns of ``vocab``) bool, the columns
    each sentence's probabilities are normalised over (its own shortlist; None: all);
    ``no_repeat_ngram``: n-grams of that many pieces never repeat (``repeat_bans``; 0: off).
    Sentences that have ended leave the batch, so later steps only pay for the ones still going."""
    batch, src_len = memory.mask.shape
    device = memory.mask.device
    max_lens = max_lens.to(device)
    limit = int(max_lens.max())
    src_real = memory.mask.sum(1).tolist()
    out_tokens = torch.full((batch, limit), PAD, dtype=torch.long, device=device)  # (batch, limit)
    out_scores = torch.zeros(batch, device=device)
    # grown as steps are taken (``_room``), so that its memory follows the outputs, not their limit
    out_attn = torch.zeros(batch, 0, src_len, device=device) if return_attention else None  # (batch, steps, src_len)
    live = torch.arange(batch, device=device)  # original index of each row still decoding
    prev = torch.full((batch,), BOS, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    soonest = int(max_lens.min())  # the first step at which a live row reaches its limit
    blocked = None if allowed is None else ~allowed.to(device)  # (batch, n) columns outside a sentence's shortlist
    prefix = None if prefix is None else prefix.to(device)  # (batch, p)
    for t in range(limit):
        logits, state, weights = model.decode_step(prev, memory, state, vocab)
        force = t + 1 >= max_lens[live] if t + 1 >= soonest else None
        banned = repeat_bans(out_tokens[live, :t], no_repeat_ngram, vocab) if t >= no_repeat_ngram > 0 else None
        logits = logits.float()  # (live, vocab or n)
        if blocked is not None:
            logits = logits.masked_fill(blocked[live], NEG_INF)
        logp = logits.log_softmax(-1)  # (live, vocab or n)
        forced = prefix_columns(prefix, live, t, vocab)
        kept = None if forced is None else logp.gather(1, forced.clamp(min=0).unsqueeze(1)).squeeze(1)
        logp = _allowed(logp, force, banned=banned)
        if forced is not None:
            logp = force_columns(logp, kept, forced)
        if sampler is None:
            best, prev = logp.max(-1)  # (live,)
        else:
            prev = sampler.pick(logp, live)
            best = logp.gather(1, prev.unsqueeze(1)).squeeze(1)
        if vocab is not None:
            prev = vocab.ids[prev]  # column -> token
        scores = scores + best
        out_tokens[live, t] = prev
        if return_attention:
            out_attn = _room(out_attn, t + 1, limit)
            out_attn[live, t] = weights.float()
        ended = prev == EOS  # every row ends by its limit (_allowed), so all scores get written
        if bool(ended.any()):
            out_scores[live[ended]] = scores[ended]
            keep = (~ended).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            live, prev, scores = live[keep], prev[keep], scores[keep]
            memory, state = memory.select(keep), state.select(keep)
            soonest = int(max_lens[live].min())
    ids, final = out_tokens.tolist(), out_scores.tolist()
    results = []
    for b, row in enumerate(ids):
        length = row.index(EOS) if EOS in row else len(row)
        hyp_attn = out_attn[b, : length + 1, : src_real[b]].cpu() if out_attn is not None else None
        # none with a score that is not finite (a NaN of an fp16 overflow, say), as ``Finished.best`` keeps none
        results.append([Hypothesis(row[:length], final[b], hyp_attn)] if math.isfinite(final[b]) else [])
    return results


def _room(steps: torch.Tensor, needed: int, cap: int) -> torch.Tensor:
    """``steps`` (rows, t, ...) with room for ``needed`` steps along dim 1: twice as many as it had
    (at most ``cap``) once it is full, the new ones zero; itself while it has room."""
    have = steps.size(1)
    if needed <= have:
        return steps
    more = min(max(needed, 2 * have), cap) - have
    return torch.cat([steps, steps.new_zeros(steps.size(0), more, *steps.shape[2:])], dim=1)


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


COVERAGE_FLOOR = 1e-6  # a source position never attended counts as this much, so that the penalty stays finite


def coverage_penalty(coverage: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Wu et al. (2016), eq. 14: ``beta * sum_i log(min(sum_j p_ij, 1))`` over the real source
    positions i, where ``sum_j p_ij`` is the attention all the hypothesis' steps (EOS's too) paid
    position i; 0 for a source covered in full, below 0 the less it is. As OpenNMT-py's
    ``-coverage_penalty wu``, added to the length-normalised score of a finished hypothesis.
    coverage: (rows, src_len); mask: (rows, src_len), True on real tokens -> (rows,)."""
    covered = coverage.clamp(min=COVERAGE_FLOOR, max=1.0).log().masked_fill(~mask, 0.0)  # (rows, src_len)
    return beta * covered.sum(1)


def top_candidates(candidates: torch.Tensor, n: int):
    """The ``n`` best of a sentence's beam x vocab continuations, best first.
    candidates: (live, beams, vocab) summed scores -> scores, beam and token, each (live, n).

    A full top-n over beam x vocab costs several times a pass over the scores, so it is taken in
    two stages: every top-n continuation is a token whose best score over the beams is among
    the top n such maxima (each of the n better continuations would otherwise have a better
    token), so only those tokens' beam x n scores are ranked."""
    live, beams, vocab = candidates.shape
    if n > beams * vocab:  # tiny vocabularies: pad with impossible continuations (of token 0)
        pad = candidates.new_full((live, beams, n), NEG_INF)
        scores, beam, token = top_candidates(torch.cat([candidates, pad], dim=2), n)
        return scores, beam, token % vocab
    if beams == 1 or n > vocab:
        scores, index = candidates.view(live, beams * vocab).topk(n, dim=1)  # (live, n)
        return scores, torch.div(index, vocab, rounding_mode="floor"), index % vocab
    _, tokens = candidates.amax(1).topk(n, dim=1)  # (live, n) the tokens worth ranking
    shortlist = candidates.gather(2, tokens.unsqueeze(1).expand(live, beams, n))  # (live, beams, n)
    scores, index = shortlist.view(live, beams * n).topk(n, dim=1)  # (live, n)
    return scores, torch.div(index, n, rounding_mode="floor"), tokens.gather(1, index % n)


class Beams(NamedTuple):
    """The hypotheses still going, one row per (live sentence, beam), sentence by sentence. A value
    that each step replaces, as ``DecoderState`` is, so the parts of a step are plain functions."""

    sent: torch.Tensor  # (live,) original index of each live sentence
    scores: torch.Tensor  # (live, beams) summed log-probabilities; beams is 1 before the first step, k after
    seqs: torch.Tensor  # (live*beams, t) the tokens so far
    prev: torch.Tensor  # (live*beams,) the last token: the next step's input
    memory: Memory  # (live, ...) one entry per sentence: ``Decoder.step`` attends with a sentence's beams together
    state: DecoderState  # (live*beams) rows, the next step's
    history: torch.Tensor | None  # (live*beams, t, src_len) the attention so far, when asked for
    soonest: int  # the first step at which a live sentence reaches its limit: only then is a row forced to end
    coverage: torch.Tensor | None = None  # (live*beams, src_len) the attention summed over the steps so far, when a
    # coverage penalty asks for it


def start_beams(memory: Memory, state: DecoderState, max_lens: torch.Tensor, return_attention: bool,
                coverage: bool = False) -> Beams:
    """One hypothesis per sentence, before anything is produced: the first step runs once per
    sentence, since its ``k`` beams would all be the same. ``coverage``: keep the attention's sum."""
    batch, src_len = memory.mask.shape
    device = memory.mask.device
    return Beams(sent=torch.arange(batch, device=device),
                 scores=torch.zeros(batch, 1, device=device),  # (batch, 1)
                 seqs=torch.zeros(batch, 0, dtype=torch.long, device=device),  # (batch, 0)
                 prev=torch.full((batch,), BOS, dtype=torch.long, device=device),  # (batch,)
                 memory=memory, state=state,
                 history=torch.zeros(batch, 0, src_len, device=device) if return_attention else None,
                 soonest=int(max_lens.min()),
                 coverage=torch.zeros(batch, src_len, device=device) if coverage else None)


def step_bounds(t: int, beams: Beams, max_lens: torch.Tensor, min_lens: torch.Tensor | None):
    """The rows of step ``t`` too short to end (``early``) and those that must end now (``force``),
    each (live*beams,) or None where no row can be: masks only when the lengths ask for them.
    max_lens, min_lens: (batch,) counting EOS."""
    beams_per = beams.scores.size(1)
    early = None if min_lens is None else (t + 1 < min_lens[beams.sent]).repeat_interleave(beams_per)
    force = (t + 1 >= max_lens[beams.sent]).repeat_interleave(beams_per) if t + 1 >= beams.soonest else None
    return early, force


def step_candidates(logits: torch.Tensor, scores: torch.Tensor, early: torch.Tensor | None,
                    force: torch.Tensor | None, banned: torch.Tensor | None = None,
                    blocked: torch.Tensor | None = None, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Every continuation's summed score: the hypothesis' score plus the token's log-probability,
    over what ``_allowed`` lets the row produce. logits: (live*beams, columns); scores: (live, beams)
    -> (live, beams, columns); banned: (live*beams, m) columns blocked (``repeat_bans``); blocked:
    (live, columns) the columns outside each sentence's own shortlist, left out of its softmax;
    forced: (live*beams,) the column a row must produce (-1: none; ``prefix_columns``). Works in place
    on ``logits.float()``, the largest tensor of a step."""
    live, beams = scores.shape
    logp = logits.float()  # (live*beams, columns)
    if blocked is not None:
        logp.view(live, beams, -1).masked_fill_(blocked.unsqueeze(1), NEG_INF)
    torch.log_softmax(logp, -1, out=logp)
    kept = None if forced is None else logp.gather(1, forced.clamp(min=0).unsqueeze(1)).squeeze(1)
    logp = _allowed(logp, force, early, banned)
    if forced is not None:
        logp = force_columns(logp, kept, forced)
    return logp.view(live, beams, -1).add_(scores.unsqueeze(2))  # (live, beams, columns)


class Continuations(NamedTuple):
    """A step's best continuations of each sentence, best first: what the finished and the alive
    hypotheses are both taken from."""

    scores: torch.Tensor  # (live, n) summed log-probabilities
    rows: torch.Tensor  # (live, n) the parent hypothesis' row in (live*beams)
    tokens: torch.Tensor  # (live, n) the token added (a vocabulary id, also with a shortlist)
    ends: torch.Tensor  # (live, n) bool: a real continuation (finite score) that adds EOS


def best_continuations(candidates: torch.Tensor, n: int, vocab: OutputVocab | None) -> Continuations:
    """The ``n`` best of beam x columns per sentence, and the rows they continue, so the beams can
    be reordered with ``index_select``. candidates: (live, beams, columns)."""
    live, beams, _ = candidates.shape
    scores, origin, tokens = top_candidates(candidates, n)  # each (live, n)
    if vocab is not None:
        tokens = vocab.ids[tokens]  # column -> token
    rows = origin + torch.arange(0, live * beams, beams, device=origin.device).unsqueeze(1)  # (live, n)
    return Continuations(scores, rows, tokens, (tokens == EOS) & torch.isfinite(scores))


class Finished(NamedTuple):
    """The hypotheses that have ended, up to ``k`` per sentence in the order they ended, kept in
    tensors of a fixed size and written in place, so a step moves them with a few tensor ops."""

    scores: torch.Tensor  # (batch, k) normalised by the length penalty; -inf in a free slot
    tokens: torch.Tensor  # (batch, k, limit) without EOS, PAD after the end
    # (sentence, slot) -> (len(tokens) + 1, src_len), the last row for EOS, kept per hypothesis as it ends, so
    # that memory follows the outputs' lengths, not batch x k x limit x src_len; None when not asked for
    attention: dict[tuple[int, int], torch.Tensor] | None
    count: torch.Tensor  # (batch,) slots taken

    @classmethod
    def empty(cls, batch: int, k: int, limit: int, src_len: int, device: torch.device,
              return_attention: bool) -> Finished:
        return cls(torch.full((batch, k), NEG_INF, device=device),
                   torch.full((batch, k, limit), PAD, dtype=torch.long, device=device),
                   {} if return_attention else None,
                   torch.zeros(batch, dtype=torch.long, device=device))

    def best(self, n_best: int, src_real: list[int]) -> list[list[Hypothesis]]:
        """Per sentence, its ``n_best`` finished hypotheses, best first (fewer where fewer ended);
        src_real: the real source length of each sentence, to cut the attention's padding."""
        order = self.scores.argsort(dim=1, descending=True)[:, :n_best]  # (batch, n_best)
        best_scores = self.scores.gather(1, order).tolist()
        best_tokens = self.tokens.gather(1, order.unsqueeze(2).expand(-1, -1, self.tokens.size(2))).tolist()
        results = []
        for b, (scores, rows) in enumerate(zip(best_scores, best_tokens)):
            hyps = []
            for j, (score, row) in enumerate(zip(scores, rows)):
                if not math.isfinite(score):
                    continue
                length = row.index(PAD) if PAD in row else len(row)
                attn = None
                if self.attention is not None:
                    attn = self.attention[b, int(order[b, j])][: length + 1, : src_real[b]].cpu()
                hyps.append(Hypothesis(row[:length], score, attn))
            results.append(hyps)
        return results


def finish(finished: Finished, beams: Beams, top: Continuations, weights: torch.Tensor, t: int,
           alpha: float, beta: float = 0.0) -> None:
    """Writes the EOS continuations among each sentence's first ``k`` into its free slots, best
    first, while it has any (only the first ``k``: a lower one would not have made the beam), with
    the score normalised by the length penalty, plus the coverage penalty of weight ``beta`` when
    above 0 (``beams.coverage`` then kept). weights: (live*beams, src_len) this step's attention."""
    k = finished.scores.size(1)
    ended = top.ends[:, :k]  # (live, k)
    slot = finished.count[beams.sent].unsqueeze(1) + ended.long().cumsum(1) - 1  # (live, k)
    take_b, take_k = (ended & (slot < k)).nonzero(as_tuple=True)  # each (taken,)
    if not take_b.numel():
        return
    target, where, rows = beams.sent[take_b], slot[take_b, take_k], top.rows[take_b, take_k]  # each (taken,)
    scores = top.scores[take_b, take_k] / length_penalty(t + 1, alpha)  # (taken,)
    if beta > 0:
        scores = scores + coverage_penalty(beams.coverage[rows] + weights[rows].float(),
                                           beams.memory.mask[take_b], beta)
    finished.scores[target, where] = scores
    finished.tokens[target, where, :t] = beams.seqs[rows]
    if finished.attention is not None:  # each (t + 1, src_len)
        ended_attn = torch.cat([beams.history[rows], weights[rows].float().unsqueeze(1)], dim=1)
        for hyp, key in zip(ended_attn, zip(target.tolist(), where.tolist())):
            finished.attention[key] = hyp
    finished.count.index_add_(0, target, torch.ones_like(target))


def survivors(scores: torch.Tensor, ends: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ``k`` of a sentence's continuations stay alive: the first that do not end, in rank
    order (a sort on rank + n for the ending ones keeps the rest in their order). scores, ends:
    (live, n) -> pick (live, k), indices into n, and their scores (live, k), -inf for one that ends."""
    n = scores.size(1)
    rank = ends.long() * n + torch.arange(n, device=scores.device)  # (live, n)
    pick = rank.argsort(dim=1)[:, :k]  # (live, k)
    return pick, scores.gather(1, pick).masked_fill(ends.gather(1, pick), NEG_INF)


def advance(beams: Beams, state: DecoderState, weights: torch.Tensor, top: Continuations, k: int) -> Beams:
    """The next step's beams: each survivor is its parent's row (tokens, attention, decoder state),
    reordered with ``index_select``, plus its token. state: this step's, (live*beams) rows;
    weights: (live*beams, src_len)."""
    pick, scores = survivors(top.scores, top.ends, k)  # each (live, k)
    rows = top.rows.gather(1, pick).view(-1)  # (live*k,)
    prev = top.tokens.gather(1, pick).view(-1)  # (live*k,)
    seqs = torch.cat([beams.seqs.index_select(0, rows), prev.unsqueeze(1)], dim=1)  # (live*k, t + 1)
    history, coverage = beams.history, beams.coverage
    if history is not None:  # (live*k, t + 1, src_len)
        history = torch.cat([history.index_select(0, rows), weights.float().index_select(0, rows).unsqueeze(1)], dim=1)
    if coverage is not None:  # (live*k, src_len)
        coverage = (coverage + weights.float()).index_select(0, rows)
    return Beams(beams.sent, scores, seqs, prev, beams.memory, state.select(rows), history, beams.soonest, coverage)


def drop_done(beams: Beams, finished: Finished, t: int, max_lens: torch.Tensor, k: int) -> Beams | None:
    """The beams without the sentences that are done after step ``t`` (``k`` finished, the length
    limit reached, or nothing left alive), so later steps only pay for the others; None when none
    are left. max_lens: (batch,) counting EOS."""
    done = (finished.count[beams.sent] >= k) | ~torch.isfinite(beams.scores).any(1)  # (live,)
    if t + 1 >= beams.soonest:  # only then can a sentence be at its limit
        done |= t + 1 >= max_lens[beams.sent]
    if not bool(done.any()):
        return beams
    keep = (~done).nonzero().squeeze(1)  # (kept,)
    if keep.numel() == 0:
        return None
    keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=keep.device)).view(-1)  # (kept*k,)
    sent = beams.sent[keep]
    return Beams(sent, beams.scores[keep], beams.seqs[keep_rows], beams.prev[keep_rows], beams.memory.select(keep),
                 beams.state.select(keep_rows), None if beams.history is None else beams.history[keep_rows],
                 int(max_lens[sent].min()), None if beams.coverage is None else beams.coverage[keep_rows])


def beam_step(model, beams: Beams, finished: Finished, t: int, max_lens: torch.Tensor, min_lens: torch.Tensor | None,
              alpha: float, vocab: OutputVocab | None, no_repeat_ngram: int = 0, coverage: float = 0.0,
              blocked: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> Beams | None:
    """Step ``t`` of the search for every live sentence: decode, rank the continuations (those that
    would repeat an n-gram of ``no_repeat_ngram`` pieces blocked), move the ended ones into
    ``finished`` (with a coverage penalty of weight ``coverage``), keep the best others, let done
    sentences go. blocked: (batch, columns) the columns outside each sentence's shortlist; prefix:
    (batch, p) the target ids each output starts with (``prefix_columns``). A function
    of its own so that the step's tensors, (live, beams, vocab) scores the largest, are freed before
    the next step decodes. Returns the next beams, None when every sentence is done."""
    k = finished.scores.size(1)
    # logits: (live*beams, vocab or n); weights: (live*beams, src_len)
    logits, state, weights = model.decode_step(beams.prev, beams.memory, beams.state, vocab)
    forced = prefix_columns(prefix, beams.sent.repeat_interleave(beams.scores.size(1)), t, vocab)
    candidates = step_candidates(logits, beams.scores, *step_bounds(t, beams, max_lens, min_lens),
                                 repeat_bans(beams.seqs, no_repeat_ngram, vocab),
                                 None if blocked is None else blocked[beams.sent], forced)
    top = best_continuations(candidates, 2 * k, vocab)  # each (live, 2k)
    finish(finished, beams, top, weights, t, alpha, coverage)
    return drop_done(advance(beams, state, weights, top, k), finished, t, max_lens, k)


@torch.no_grad()
def beam_search(model, memory: Memory, state: DecoderState, beam: int, max_lens: torch.Tensor,
                alpha: float = 1.0, n_best: int = 1, return_attention: bool = False,
                min_lens: torch.Tensor | None = None, vocab: OutputVocab | None = None,
                no_repeat_ngram: int = 0, coverage: float = 0.0,
                allowed: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Batched beam search. Returns, per sentence, up to ``n_best`` hypotheses, best first.
    ``min_lens`` (batch,), counting EOS: no hypothesis ends sooner (``min_lens == max_lens`` asks
    for outputs of one length, as the sentence-level oracle of scheduled teacher forcing does).
    ``vocab``: a shortlist, the only tokens scored; ``allowed``: (batch, columns of ``vocab``) bool,
    the columns each sentence's probabilities are normalised over (its own shortlist; None: all).
    ``no_repeat_ngram``: no hypothesis holds an
    n-gram of that many pieces twice (``repeat_bans``; 0: off). ``coverage``: the weight (beta) of the
    coverage penalty in a finished hypothesis' score (``coverage_penalty``; 0: off). ``prefix``: (batch, p)
    target ids each output starts with, PAD past a sentence's (``prefix_columns``): while it is
    forced a sentence has one live hypothesis; ``max_lens`` must leave room for it.

    Each step takes the 2*beam best continuations over beam x vocab: those among the first
    ``beam`` that end in EOS are finished (score normalised by the length penalty), the best
    ``beam`` others stay alive. A sentence is done when ``beam`` hypotheses have finished or it
    reaches its length limit, where every live hypothesis is made to end. The first step runs
    once per sentence (its beams would all be the same), and the memory stays one entry per
    sentence for the whole search (``Decoder.step`` attends with a sentence's beam together).
    """
    if n_best > beam:
        raise ValueError(f"n_best ({n_best}) cannot exceed the beam size ({beam})")
    batch, src_len = memory.mask.shape
    device = memory.mask.device
    max_lens = max_lens.to(device)
    min_lens = None if min_lens is None else min_lens.to(device)
    limit = int(max_lens.max())
    beams = start_beams(memory, state, max_lens, return_attention, coverage=coverage > 0)
    finished = Finished.empty(batch, beam, limit, src_len, device, return_attention)
    blocked = None if allowed is None else ~allowed.to(device)  # (batch, n)
    for t in range(limit):
        beams = beam_step(model, beams, finished, t, max_lens, min_lens, alpha, vocab, no_repeat_ngram, coverage,
                          blocked, None if prefix is None else prefix.to(device))
        if beams is None:
            break
    return finished.best(n_best, memory.mask.sum(1).tolist())


class Progress(NamedTuple):
    """Where a hypothesis stands with its sentence's constraints (dynamic beam allocation)."""

    met: int  # bit c set: constraint c appears complete in the hypothesis
    current: int  # the constraint it is in the middle of; -1: none
    pos: int  # pieces of ``current`` produced so far
    just: bool = False  # its last token completed a constraint: the next may not continue that word

    def count(self, constraints: list[list[int]]) -> int:
        """Constraint pieces met: those of the complete constraints and of the one begun."""
        return sum(len(c) for i, c in enumerate(constraints) if self.met >> i & 1) + (self.pos if self.current >= 0
                                                                                     else 0)

    def wanted(self, constraints: list[list[int]]) -> list[int]:
        """The tokens that would take it a piece further: the next of the constraint begun, else
        the first of each constraint not met."""
        if self.current >= 0:
            return [constraints[self.current][self.pos]]
        return [c[0] for i, c in enumerate(constraints) if not self.met >> i & 1]

    def after(self, token: int, constraints: list[list[int]]) -> Progress:
        """The progress once ``token`` is added: a hypothesis in the middle of a constraint either
        continues it or abandons it (its pieces so far count no more), and may begin another."""
        if self.current >= 0:
            if constraints[self.current][self.pos] == token:
                if self.pos + 1 == len(constraints[self.current]):
                    return Progress(self.met | 1 << self.current, -1, 0, True)
                return Progress(self.met, self.current, self.pos + 1)
            self = Progress(self.met, -1, 0)
        for i, c in enumerate(constraints):
            if not self.met >> i & 1 and c[0] == token:
                return Progress(self.met | 1 << i, -1, 0, True) if len(c) == 1 else Progress(self.met, i, 1)
        return self._replace(just=False)


def bank_order(scores: list[float], counts: list[int]) -> list[int]:
    """Dynamic beam allocation's choice among candidates (Post & Vilar, 2018, as Sockeye ranks
    them): banked by the number of constraint pieces met, each bank best first, then taken in turn
    from the banks, the one that met most first, so that a bank left short lends its slots to the
    others. scores, counts: one per candidate -> the candidates' indices in the order taken."""
    by_bank: dict[int, list[int]] = {}
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        by_bank.setdefault(counts[i], []).append(i)
    ranked = [(rank, -bank, i) for bank, members in by_bank.items() for rank, i in enumerate(members)]
    return [i for _, _, i in sorted(ranked)]


def missing_constraints(tokens: list[int], constraints: list[list[int]]) -> list[int]:
    """The indices of the constraints whose pieces do not appear, in order and together, in ``tokens``."""
    text = tuple(tokens)
    return [i for i, c in enumerate(constraints)
            if not any(text[j: j + len(c)] == tuple(c) for j in range(len(text) - len(c) + 1))]


class Constrained(NamedTuple):
    """The hypotheses of constrained beam search still going: ``per`` rows a live sentence (1 at
    the first step, the beam after), sentence by sentence, as ``Beams`` holds them."""

    sent: torch.Tensor  # (live,) each live sentence's index among the constrained ones
    scores: list[list[float]]  # per live sentence, its rows' summed log-probabilities
    progress: list[list[Progress]]  # per live sentence, its rows' progress through its constraints
    seqs: torch.Tensor  # (rows, t) tokens so far
    prev: torch.Tensor  # (rows,) the last token
    memory: Memory  # (live, ...)
    state: DecoderState  # (rows) the next step's
    history: torch.Tensor | None  # (rows, t, src_len) the attention so far, when asked for


class Rules(NamedTuple):
    """What constrains every step of a constrained search: the constraints as columns, the
    shortlist, the limits, the bans."""

    cons: list[list[list[int]]]  # per constrained sentence, its constraints as columns of ``vocab``
    cons_cols: torch.Tensor  # (sentences, m) the columns of each sentence's constraints, padded by repeats
    vocab: OutputVocab | None
    ids: list[int] | None  # column -> token
    blocked: torch.Tensor | None  # (sentences, columns) the columns outside each sentence's shortlist
    limits: torch.Tensor  # (sentences,) counting EOS
    index: torch.Tensor  # (sentences,) each one's row in the batch, for ``prefix``
    prefix: torch.Tensor | None  # (batch, p)
    no_repeat_ngram: int
    joins: torch.Tensor | None  # (columns,) bool: pieces that continue the word before them


def constrained_scores(logits: torch.Tensor, hyps: Constrained, rules: Rules, t: int) -> torch.Tensor:
    """Every continuation's summed score (rows, columns): a hypothesis with a constraint unmet may
    not end (unless at its length limit, where every one must), a constraint's pieces escape n-gram
    blocking, the prefix is forced as in ``beam_search``."""
    rows_sent = hyps.sent.repeat_interleave(len(hyps.scores[0]))  # (rows,)
    logp = logits.float()
    if rules.blocked is not None:
        logp = logp.masked_fill(rules.blocked[rows_sent], NEG_INF)
    logp = logp.log_softmax(-1)
    forced = prefix_columns(rules.prefix, rules.index[rows_sent], t, rules.vocab)
    kept = None if forced is None else logp.gather(1, forced.clamp(min=0).unsqueeze(1)).squeeze(1)
    force = t + 1 >= rules.limits[rows_sent]  # (rows,)
    unmet = torch.tensor([p.count(rules.cons[s]) < sum(map(len, rules.cons[s]))
                          for s, row in zip(hyps.sent.tolist(), hyps.progress) for p in row], device=logp.device)
    banned = repeat_bans(hyps.seqs, rules.no_repeat_ngram, rules.vocab)
    if banned is not None:  # a constraint's pieces may repeat
        banned = banned.masked_fill((banned.unsqueeze(2) == rules.cons_cols[rows_sent].unsqueeze(1)).any(2), PAD)
    logp = _allowed(logp, force if bool(force.any()) else None, unmet & ~force, banned)
    if rules.joins is not None:  # a term ends a word: "apply" is not placed by "apply" + "s"
        ended = torch.tensor([p.just for row in hyps.progress for p in row], device=logp.device)  # (rows,)
        logp = logp.masked_fill(ended.unsqueeze(1) & rules.joins.unsqueeze(0), NEG_INF)
    if forced is not None:
        logp = force_columns(logp, kept, forced)
    flat = torch.tensor([x for row in hyps.scores for x in row], device=logp.device)  # (rows,)
    return logp.add_(flat.unsqueeze(1))


def sentence_candidates(pairs: dict[tuple[int, int], float], progress: list[Progress], cons: list[list[int]],
                        ids: list[int] | None) -> list[tuple[int, int, float, int, Progress, int]]:
    """A sentence's candidates (row, column) -> score as (row, column, score, token, progress after,
    pieces met), the impossible ones (score -inf) left out."""
    out = []
    for (r, c), v in pairs.items():
        if math.isfinite(v):
            token = c if ids is None else ids[c]
            after = progress[r] if token == EOS else progress[r].after(c, cons)  # constraints as columns
            out.append((r, c, v, token, after, after.count(cons)))
    return out


@torch.no_grad()
def constrained_beam_search(model, memory: Memory, state: DecoderState, beam: int, max_lens: torch.Tensor,
                            constraints: list[list[list[int]]], alpha: float = 1.0, n_best: int = 1,
                            return_attention: bool = False, vocab: OutputVocab | None = None,
                            no_repeat_ngram: int = 0, allowed: torch.Tensor | None = None,
                            prefix: torch.Tensor | None = None, joins: torch.Tensor | None = None
                            ) -> list[list[Hypothesis]]:
    """Beam search whose outputs hold every one of their sentence's ``constraints`` (per sentence,
    a list of target-id lists, each to appear whole and in order): dynamic beam allocation (Post &
    Vilar, 2018), batched. Sentences without constraints are searched by ``beam_search`` (the
    same output, bit for bit); the others step together, one ``decode_step`` a step for all.

    Each step a sentence's candidates are the best ``beam`` continuations over beam x vocab, each
    hypothesis' best token and each token that takes a hypothesis a piece further into a
    constraint (``Progress.wanted``); the ``beam`` kept are chosen by ``bank_order``. EOS is banned
    until every constraint is met; at the length limit every hypothesis must end (the fallback:
    one without all constraints then ranks below any with them; ``missing_constraints`` says which
    it lacks). A constraint's pieces escape n-gram blocking. ``vocab`` must hold every constraint
    piece (the caller adds them to the shortlist, and to each sentence's ``allowed``). ``joins``:
    (target vocabulary,) bool, the pieces that continue the word before them, which may not follow
    a constraint's last piece, so that a term stays a word of its own (None: any may). The other
    arguments are ``beam_search``'s."""
    if n_best > beam:
        raise ValueError(f"n_best ({n_best}) cannot exceed the beam size ({beam})")
    batch, src_len = memory.mask.shape
    device = memory.mask.device
    max_lens = max_lens.to(device)
    prefix = None if prefix is None else prefix.to(device)
    results: list[list[Hypothesis]] = [[] for _ in range(batch)]
    plain = [b for b in range(batch) if not constraints[b]]
    if plain:
        index = torch.tensor(plain, device=device)
        found = beam_search(model, memory.select(index), state.select(index), beam, max_lens[index], alpha, n_best,
                            return_attention, vocab=vocab, no_repeat_ngram=no_repeat_ngram,
                            allowed=None if allowed is None else allowed[index.cpu()],
                            prefix=None if prefix is None else prefix[index])
        for b, hyps in zip(plain, found):
            results[b] = hyps
    held = [b for b in range(batch) if constraints[b]]
    if not held:
        return results
    index = torch.tensor(held, device=device)
    cons = [[_as_columns(c, vocab) for c in constraints[b]] for b in held]
    rules = Rules(cons, _prefix_rows([sorted({p for c in sent for p in c}) for sent in cons], device), vocab,
                  None if vocab is None else vocab.ids.tolist(),
                  None if allowed is None else ~allowed[index.cpu()].to(device), max_lens[index], index, prefix,
                  no_repeat_ngram, None if joins is None else joins.to(device)[vocab.ids] if vocab is not None
                  else joins.to(device))
    hyps = Constrained(torch.arange(len(held), device=device), [[0.0] for _ in held],
                       [[Progress(0, -1, 0)] for _ in held], torch.zeros(len(held), 0, dtype=torch.long, device=device),
                       torch.full((len(held),), BOS, dtype=torch.long, device=device), memory.select(index),
                       state.select(index), torch.zeros(len(held), 0, src_len, device=device) if return_attention
                       else None)
    done: list[list[tuple[bool, float, list[int], torch.Tensor | None]]] = [[] for _ in held]
    for t in range(int(rules.limits.max())):
        hyps = constrained_step(model, hyps, rules, done, t, beam, alpha)
        if hyps is None:
            break
    src_real = memory.mask.sum(1).tolist()
    for s, b in enumerate(held):
        ranked = sorted(done[s], key=lambda d: (not d[0], -d[1]))[:n_best]
        results[b] = [Hypothesis(tokens, score, None if attn is None else attn[:, : src_real[b]].cpu())
                      for _, score, tokens, attn in ranked]
    return results


def constrained_step(model, hyps: Constrained, rules: Rules, done: list[list], t: int, beam: int,
                     alpha: float) -> Constrained | None:
    """Step ``t`` of ``constrained_beam_search`` for every live sentence: decode, gather each
    sentence's candidates, move the ended ones into ``done`` (per sentence: all constraints met,
    normalised score, tokens, attention), keep ``beam`` others by ``bank_order``. None when every
    sentence is done (``beam`` ended, its limit reached, nothing left alive)."""
    per = len(hyps.scores[0])
    logits, state, weights = model.decode_step(hyps.prev, hyps.memory, hyps.state, rules.vocab)
    total = constrained_scores(logits, hyps, rules, t)  # (rows, columns)
    columns = total.size(1)
    top_scores, top_index = (x.tolist() for x in total.view(len(hyps.scores), per * columns)
                             .topk(min(beam, per * columns), dim=1))
    best_scores, best_rows = (x.tolist() for x in total.max(1))  # each row's best column
    wanted = [p.wanted(rules.cons[s]) for s, row in zip(hyps.sent.tolist(), hyps.progress) for p in row]
    want_scores = total.gather(1, _prefix_rows(wanted, total.device)).tolist()
    rows, cols, scores, progress, keep = [], [], [], [], []
    for i, s in enumerate(hyps.sent.tolist()):
        base = i * per
        pairs = {(j // columns, j % columns): v for j, v in zip(top_index[i], top_scores[i])}
        for r in range(per):
            pairs.setdefault((r, best_rows[base + r]), best_scores[base + r])
            for c, v in zip(wanted[base + r], want_scores[base + r]):
                pairs.setdefault((r, c), v)
        cands = sentence_candidates(pairs, hyps.progress[i], rules.cons[s], rules.ids)
        full = sum(map(len, rules.cons[s]))
        at_limit = t + 1 >= int(rules.limits[s])
        # ended: at the limit, any; else those among the best ``beam`` of the bank that met every constraint
        ending = cands if at_limit else sorted((c for c in cands if c[5] == full), key=lambda c: -c[2])[:beam]
        for r, _, v, token, _, met in ending:
            if token == EOS and len(done[s]) < beam:
                attn = None if hyps.history is None else torch.cat([hyps.history[base + r],
                                                                    weights[base + r].float().unsqueeze(0)])
                done[s].append((met == full, v / length_penalty(t + 1, alpha), hyps.seqs[base + r].tolist(), attn))
        going = [cands[j] for j in bank_order([c[2] for c in cands], [c[5] for c in cands])
                 if cands[j][3] != EOS][:beam]
        if len(done[s]) >= beam or not going or at_limit:
            continue
        keep.append(i)
        short = beam - len(going)  # a sentence short of candidates repeats one, scored -inf
        scores.append([c[2] for c in going] + [NEG_INF] * short)
        going += [going[0]] * short
        rows += [base + c[0] for c in going]
        cols += [c[1] for c in going]
        progress.append([c[4] for c in going])
    if not keep:
        return None
    device = total.device
    rows_t, cols_t, keep_t = (torch.tensor(x, device=device) for x in (rows, cols, keep))
    prev = cols_t if rules.vocab is None else rules.vocab.ids[cols_t]
    history = hyps.history
    if history is not None:
        history = torch.cat([history.index_select(0, rows_t), weights.float().index_select(0, rows_t).unsqueeze(1)], 1)
    return Constrained(hyps.sent[keep_t], scores, progress, torch.cat([hyps.seqs.index_select(0, rows_t),
                                                                      prev.unsqueeze(1)], dim=1),
                       prev, hyps.memory.select(keep_t), state.select(rows_t), history)


def _as_columns(ids: list[int], vocab: OutputVocab | None) -> list[int]:
    """Target ids as columns of ``vocab`` (which holds them), or as they are without one."""
    if vocab is None:
        return list(ids)
    return torch.searchsorted(vocab.ids, torch.tensor(ids, device=vocab.ids.device)).tolist()


def _prefix_rows(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Lists of columns as one (len(rows), longest) tensor, each padded with its own first column
    (PAD where empty), so that a gather over it repeats a real column rather than a new one."""
    width = max(1, max(map(len, rows), default=1))
    return torch.tensor([row + [row[0] if row else PAD] * (width - len(row)) for row in rows], dtype=torch.long,
                        device=device)
