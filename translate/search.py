"""Decoding as pure functions over ``model.encode`` / ``model.decode_step``.

Both searches are batched: greedy runs all sentences together and stops when every one has
ended; beam search flattens batch x beam into one dimension, reorders states with
``index_select``, moves finished hypotheses out with tensor ops and drops finished sentences
from the batch. Length penalty: Wu et al. (2016), ((5 + length) / 6) ** alpha.

Batching, precision and threads belong to ``translator.Translator``: these functions take one
encoded batch and return its hypotheses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def _allowed(logp: torch.Tensor, force: torch.Tensor | None, early: torch.Tensor | None = None) -> torch.Tensor:
    """What a search may produce. logp: (rows, vocab) log-probabilities, changed in place: PAD and
    BOS are never an output token (as in fairseq's search); force: (rows,) rows that must end now
    get EOS as the only option (None: no row must); early: (rows,) rows too short to end may not
    produce EOS."""
    logp.index_fill_(1, torch.tensor(NOT_OUTPUT, device=logp.device), NEG_INF)
    if early is not None:
        logp[:, EOS].masked_fill_(early, NEG_INF)
    if force is None or not bool(force.any()):
        return logp
    only_eos = torch.full_like(logp, NEG_INF)
    only_eos[:, EOS] = logp[:, EOS]
    return torch.where(force.unsqueeze(1), only_eos, logp)


@torch.no_grad()
def greedy(model, memory: Memory, state: DecoderState, max_lens: torch.Tensor,
           return_attention: bool = False, vocab: OutputVocab | None = None) -> list[list[Hypothesis]]:
    """Picks the most probable token at each step; max_lens: (batch,) limits counting EOS; ``vocab``:
    a shortlist, the only tokens scored. Sentences that have ended leave the batch, so later
    steps only pay for the ones still going."""
    batch, src_len = memory.mask.shape
    device = memory.mask.device
    max_lens = max_lens.to(device)
    limit = int(max_lens.max())
    src_real = memory.mask.sum(1).tolist()
    out_tokens = torch.full((batch, limit), PAD, dtype=torch.long, device=device)  # (batch, limit)
    out_scores = torch.zeros(batch, device=device)
    out_attn = torch.zeros(batch, limit, src_len, device=device) if return_attention else None
    live = torch.arange(batch, device=device)  # original index of each row still decoding
    prev = torch.full((batch,), BOS, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    soonest = int(max_lens.min())  # the first step at which a live row reaches its limit
    for t in range(limit):
        logits, state, weights = model.decode_step(prev, memory, state, vocab)
        force = t + 1 >= max_lens[live] if t + 1 >= soonest else None
        logp = _allowed(logits.float().log_softmax(-1), force)  # (live, vocab or n)
        best, prev = logp.max(-1)  # (live,)
        if vocab is not None:
            prev = vocab.ids[prev]  # column -> token
        scores = scores + best
        out_tokens[live, t] = prev
        if return_attention:
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
        results.append([Hypothesis(row[:length], final[b], hyp_attn)])
    return results


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


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


@torch.no_grad()
def beam_search(model, memory: Memory, state: DecoderState, beam: int, max_lens: torch.Tensor,
                alpha: float = 1.0, n_best: int = 1, return_attention: bool = False,
                min_lens: torch.Tensor | None = None, vocab: OutputVocab | None = None) -> list[list[Hypothesis]]:
    """Batched beam search. Returns, per sentence, up to ``n_best`` hypotheses, best first.
    ``min_lens`` (batch,), counting EOS: no hypothesis ends sooner (``min_lens == max_lens`` asks
    for outputs of one length, as the sentence-level oracle of scheduled teacher forcing does).
    ``vocab``: a shortlist, the only tokens scored.

    Each step takes the 2*beam best continuations over beam x vocab: those among the first
    ``beam`` that end in EOS are finished (score normalised by the length penalty), the best
    ``beam`` others stay alive. A sentence is done when ``beam`` hypotheses have finished or it
    reaches its length limit, where every live hypothesis is made to end. The first step runs
    once per sentence (its beams would all be the same), and the memory stays one entry per
    sentence for the whole search (``Decoder.step`` attends with a sentence's beam together).
    """
    if n_best > beam:
        raise ValueError(f"n_best ({n_best}) cannot exceed the beam size ({beam})")
    k = beam
    batch, src_len = memory.mask.shape
    device = memory.mask.device
    max_lens = max_lens.to(device)
    min_lens = None if min_lens is None else min_lens.to(device)
    limit = int(max_lens.max())
    src_real = memory.mask.sum(1).tolist()  # real source length per sentence
    sent = torch.arange(batch, device=device)  # original index of each live sentence
    beams = 1  # hypotheses per live sentence: one before the first step, k after it
    scores = torch.zeros(batch, beams, device=device)  # (live, beams) summed log-probabilities
    seqs = torch.zeros(batch, 0, dtype=torch.long, device=device)  # (live*beams, t)
    prev = torch.full((batch,), BOS, dtype=torch.long, device=device)
    history = torch.zeros(batch, 0, src_len, device=device) if return_attention else None
    fin_scores = torch.full((batch, k), NEG_INF, device=device)
    fin_tokens = torch.full((batch, k, limit), PAD, dtype=torch.long, device=device)
    fin_attn = torch.zeros(batch, k, limit, src_len, device=device) if return_attention else None
    fin_count = torch.zeros(batch, dtype=torch.long, device=device)
    beam_offsets = torch.arange(k, device=device)
    soonest = int(max_lens.min())  # the first step at which a live sentence reaches its limit

    for t in range(limit):
        live = sent.numel()
        logits, state, weights = model.decode_step(prev, memory, state, vocab)
        logp = logits.float()  # (live*beams, vocab or n), in place from here: the largest tensors of a step
        torch.log_softmax(logp, -1, out=logp)
        columns = logp.size(-1)
        early = None if min_lens is None else (t + 1 < min_lens[sent]).repeat_interleave(beams)
        force = (t + 1 >= max_lens[sent]).repeat_interleave(beams) if t + 1 >= soonest else None
        logp = _allowed(logp, force, early)
        candidates = logp.view(live, beams, columns).add_(scores.unsqueeze(2))  # (live, beams, columns)
        top_scores, origin, token = top_candidates(candidates, 2 * k)  # each (live, 2k)
        if vocab is not None:
            token = vocab.ids[token]  # column -> token
        is_eos = (token == EOS) & torch.isfinite(top_scores)
        base = torch.arange(live, device=device).unsqueeze(1) * beams  # (live, 1)

        # finished: EOS candidates among the first k, written into free slots of fin_*
        ended = is_eos[:, :k]
        slot = fin_count[sent].unsqueeze(1) + ended.long().cumsum(1) - 1  # (live, k)
        take_b, take_k = (ended & (slot < k)).nonzero(as_tuple=True)
        if take_b.numel():
            target, where = sent[take_b], slot[take_b, take_k]
            src_rows = (base.squeeze(1)[take_b] + origin[take_b, take_k])
            fin_scores[target, where] = top_scores[take_b, take_k] / length_penalty(t + 1, alpha)
            fin_tokens[target, where, :t] = seqs[src_rows]
            if return_attention:
                fin_attn[target, where, :t] = history[src_rows]
                fin_attn[target, where, t] = weights[src_rows].float()
            fin_count.index_add_(0, target, torch.ones_like(target))

        # alive: the first k candidates that do not end
        rank = is_eos.long() * (2 * k) + torch.arange(2 * k, device=device)
        pick = rank.argsort(dim=1)[:, :k]  # (live, k)
        scores = top_scores.gather(1, pick).masked_fill(is_eos.gather(1, pick), NEG_INF)
        src_rows = (base + origin.gather(1, pick)).view(-1)  # (live*k,)
        prev = token.gather(1, pick).view(-1)
        seqs = torch.cat([seqs.index_select(0, src_rows), prev.unsqueeze(1)], dim=1)
        state = state.select(src_rows)
        if return_attention:
            history = torch.cat([history.index_select(0, src_rows),
                                 weights.float().index_select(0, src_rows).unsqueeze(1)], dim=1)
        beams = k

        done = (fin_count[sent] >= k) | (t + 1 >= max_lens[sent]) | ~torch.isfinite(scores).any(1)
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            keep_rows = (keep.unsqueeze(1) * k + beam_offsets).view(-1)
            sent, scores = sent[keep], scores[keep]
            soonest = int(max_lens[sent].min())
            seqs, prev = seqs[keep_rows], prev[keep_rows]
            memory, state = memory.select(keep), state.select(keep_rows)
            if return_attention:
                history = history[keep_rows]

    order = fin_scores.argsort(dim=1, descending=True)[:, :n_best]  # (batch, n_best)
    best_scores = fin_scores.gather(1, order).tolist()
    best_tokens = fin_tokens.gather(1, order.unsqueeze(2).expand(-1, -1, limit)).tolist()
    results = []
    for b in range(batch):
        hyps = []
        for j in range(order.size(1)):
            if not math.isfinite(best_scores[b][j]):
                continue
            row = best_tokens[b][j]
            length = row.index(PAD) if PAD in row else len(row)
            attn = None
            if return_attention:
                attn = fin_attn[b, order[b, j], : length + 1, : src_real[b]].cpu()
            hyps.append(Hypothesis(row[:length], best_scores[b][j], attn))
        results.append(hyps)
    return results
