"""Minimum risk training (Shen et al., 2016, "Minimum Risk Training for Neural Machine
Translation"): a sequence-level objective over the model's own translations, for fine-tuning a
model that teacher forcing has trained (``train.objective=mrt``).

For each source ``x`` the model proposes candidates ``S(x)``: ``train.mrt_samples`` samples of
its own distribution (or its n-best of beam search, ``mrt_search=beam``), and with
``mrt_greedy`` / ``mrt_reference`` its greedy translation and the reference; duplicates count
once (S(x) is a set in Shen et al.). Over them,

    Q(y | x) = p(y | x) ** alpha / sum over y' in S(x) of p(y' | x) ** alpha   (alpha: train.mrt_alpha)
    loss     = sum over x of sum over y in S(x) of Q(y | x) * risk(y, reference)

with risk = 1 - metric / 100, sentence BLEU (sacrebleu's exponential smoothing, effective
order) or chrF on detokenized text: the figures `translate eval` reports, so the risk is what is
measured, and 0 for a candidate that is the reference. Its gradient moves probability from the
candidates of more risk than Q's mean to those of less. Wang & Sennrich (2020) fine-tuned with it
against hallucination under domain shift. There is no label smoothing: the loss has no
token-level term. The candidates are scored with the decoder's teacher-forced pass, so every
decoder trains this way; sampling runs without dropout and without gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU, CHRF
from torch import nn

from .config import TrainConfig
from .data import Batch
from .decoder import DecoderState, Memory
from .feeding import model_tokens
from .model import Seq2Seq
from .search import beam_search
from .tokenizer import BOS, EOS, PAD, Tokenizer

_METRICS = {"bleu": BLEU(effective_order=True), "chrf": CHRF()}


def risks(hypotheses: list[str], references: list[str], metric: str) -> list[float]:
    """1 - sentence ``metric`` / 100 of each hypothesis against its reference; 0 for the reference
    itself (sacrebleu gives an empty pair 0, not 100)."""
    scorer = _METRICS[metric]
    return [0.0 if hyp == ref else 1.0 - scorer.sentence_score(hyp, [ref]).score / 100.0
            for hyp, ref in zip(hypotheses, references)]


def expected_risk(log_probs: torch.Tensor, risk: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """Shen et al.'s loss, summed over sources: log_probs, risk, valid (batch, n) for n candidates
    per source (valid: False for a duplicate or an absent one; one per row at least)."""
    scores = (alpha * log_probs.float()).masked_fill(~valid, float("-inf"))  # (batch, n)
    q = scores.softmax(-1)  # (batch, n) Q over each source's candidates
    return (q * risk.masked_fill(~valid, 0.0)).sum()


@torch.no_grad()
def sample(model: Seq2Seq, memory: Memory, state: DecoderState, greedy: torch.Tensor, limit: int) -> torch.Tensor:
    """Ancestral samples of the model (the argmax for the rows ``greedy`` (rows,)), one per row of
    ``memory`` and ``state``: (rows, limit) tokens ending with EOS (forced at ``limit``), PAD after.
    PAD and BOS are never drawn, as no search produces them."""
    rows = greedy.size(0)
    device = greedy.device
    out = torch.full((rows, limit), PAD, dtype=torch.long, device=device)  # (rows, limit)
    prev = torch.full((rows,), BOS, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    never = torch.tensor([PAD, BOS], device=device)
    for t in range(limit):
        logits, state, _ = model.decode_step(prev, memory, state)  # (rows, vocab)
        logits = logits.float().index_fill(1, never, float("-inf"))  # (rows, vocab)
        token = torch.where(greedy, logits.argmax(-1), model_tokens(logits, "sample"))  # (rows,)
        if t == limit - 1:
            token = torch.full_like(token, EOS)
        token = token.masked_fill(done, PAD)
        out[:, t] = token
        done |= token == EOS
        if bool(done.all()):
            break
        prev = token.masked_fill(done, EOS)  # (an ended row's input no longer matters)
    return out


def candidates(model: Seq2Seq, batch: Batch, memory: Memory, state: DecoderState,
               cfg: TrainConfig) -> torch.Tensor:
    """Each source's candidates, (batch, n, length) in the form of ``batch.tgt_out`` (EOS, then
    PAD): ``mrt_samples`` samples (or, with ``mrt_search=beam``, the n-best of a beam that wide),
    then the greedy translation (``mrt_greedy``), then the reference (``mrt_reference``). The
    model's own are at most 1.5 times the batch's longest target, plus 5, long; searched in eval
    mode (no dropout), without gradient."""
    limit = int(batch.tgt_out.size(1) * 1.5) + 5
    parts = []
    was_training = model.training
    model.eval()
    try:
        if cfg.mrt_samples and cfg.mrt_search == "beam":
            parts.append(beam_candidates(model, memory, state, cfg.mrt_samples, limit))
        elif cfg.mrt_samples:
            parts.append(drawn(model, memory, state, cfg.mrt_samples, False, limit))
        if cfg.mrt_greedy:
            parts.append(drawn(model, memory, state, 1, True, limit))
    finally:
        model.train(was_training)
    if cfg.mrt_reference:
        parts.append(batch.tgt_out.unsqueeze(1))
    width = max(part.size(2) for part in parts)
    return torch.cat([F.pad(part, (0, width - part.size(2)), value=PAD) for part in parts], 1)


def drawn(model: Seq2Seq, memory: Memory, state: DecoderState, k: int, greedy: bool, limit: int) -> torch.Tensor:
    """(batch, k, length) ``sample``s (or greedy translations) for each source of ``memory``."""
    batch_size = memory.mask.size(0)
    index = torch.arange(batch_size, device=memory.mask.device).repeat_interleave(k)  # (batch * k,)
    rows = torch.full_like(index, int(greedy), dtype=torch.bool)
    return sample(model, memory.select(index), state.select(index), rows, limit).view(batch_size, k, -1)


def beam_candidates(model: Seq2Seq, memory: Memory, state: DecoderState, k: int, limit: int) -> torch.Tensor:
    """(batch, k, length): the ``k`` best of beam search ``k`` wide (no length penalty), each with
    EOS; a source with fewer finished hypotheses repeats its first (a duplicate counts once), one
    with none gets the empty translation."""
    batch_size = memory.mask.size(0)
    max_lens = torch.full((batch_size,), limit, dtype=torch.long)
    nbest = beam_search(model, memory, state, k, max_lens, alpha=0.0, n_best=k)
    out = torch.full((batch_size, k, limit), PAD, dtype=torch.long)
    for b, hypotheses in enumerate(nbest):
        rows = [h.tokens[: limit - 1] + [EOS] for h in hypotheses] or [[EOS]]
        for c in range(k):
            row = rows[c] if c < len(rows) else rows[0]
            out[b, c, : len(row)] = torch.tensor(row)
    return out.to(memory.mask.device)


def sequence_log_probs(model: Seq2Seq, memory: Memory, state: DecoderState, tokens: torch.Tensor) -> torch.Tensor:
    """log p(y | x) of each candidate, (batch, n), teacher forced: tokens (batch, n, length) as
    ``candidates`` gives them, for the sources of ``memory`` and ``state`` (batch rows)."""
    batch_size, n, length = tokens.shape
    out = tokens.reshape(batch_size * n, length)  # (rows, length) y_1 .. EOS, PAD
    inputs = torch.cat([torch.full_like(out[:, :1], BOS), out[:, :-1]], 1)  # (rows, length) BOS y_1 ..
    inputs = inputs.masked_fill(inputs == EOS, PAD)
    index = torch.arange(batch_size, device=tokens.device).repeat_interleave(n)
    logits, _, _ = model.decoder(inputs, memory.select(index), state.select(index))  # (rows, length, vocab)
    logp = logits.float().log_softmax(-1).gather(-1, out.unsqueeze(-1)).squeeze(-1)  # (rows, length)
    return logp.masked_fill(out == PAD, 0.0).sum(1).view(batch_size, n)


def distinct(tokens: torch.Tensor) -> torch.Tensor:
    """(batch, n) True for each candidate unlike every earlier one of its source."""
    rows = [[tuple(c[: c.index(EOS) + 1] if EOS in c else c) for c in row] for row in tokens.tolist()]
    return torch.tensor([[c not in row[:i] for i, c in enumerate(row)] for row in rows], device=tokens.device)


def texts(tokenizer: Tokenizer, tokens: torch.Tensor) -> list[str]:
    """Detokenized text of token rows (..., length) ending with EOS: one string per row."""
    ids = tokens.reshape(-1, tokens.size(-1)).tolist()
    return tokenizer.decode_tgt([row[: row.index(EOS)] if EOS in row else row for row in ids])


class MinimumRisk(nn.Module):
    """The training pass of ``train.objective=mrt``, called as ``training.ScheduledForward`` is
    (and wrapped by DistributedDataParallel as it is): the expected risk of a batch and (3,) counts
    of its target positions (none fed the model's choice: MRT feeds no mixed inputs). The
    teacher-forcing ratio it is given does not apply."""

    def __init__(self, model: Seq2Seq, cfg: TrainConfig, tokenizer: Tokenizer):
        super().__init__()
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer

    def forward(self, batch: Batch, ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        memory, state = self.model.encode(batch.src, batch.src_lengths, batch.src_mask)
        tokens = candidates(self.model, batch, memory, state, cfg)  # (batch, n, length)
        n = tokens.size(1)
        references = [ref for ref in texts(self.tokenizer, batch.tgt_out) for _ in range(n)]
        risk = torch.tensor(risks(texts(self.tokenizer, tokens), references, cfg.mrt_metric),
                            device=tokens.device).view(-1, n)  # (batch, n)
        log_probs = sequence_log_probs(self.model, memory, state, tokens)  # (batch, n)
        loss = expected_risk(log_probs, risk, distinct(tokens), cfg.mrt_alpha)
        counts = torch.zeros(3, dtype=torch.long, device=tokens.device)
        counts[0] = (batch.tgt_out != PAD).sum()
        return loss, counts
