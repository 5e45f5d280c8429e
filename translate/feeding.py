"""Scheduled teacher forcing: which token the decoder reads at each target position while training.

At decoding time the decoder reads its own previous outputs; under teacher forcing it only ever
read gold ones, so its errors compound at test time (exposure bias). Scheduled sampling (Bengio
et al., 2015) feeds some of the model's own predictions while training. What this module decides:

- **where** a prediction goes (``train.tf_select``):
  ``random``: each position keeps the gold token with probability ``1 - (1 - r) * w(t)``, where
  ``r`` is the step schedule's ratio (``schedules.teacher_forcing_ratio``) and ``w(t)`` in [0, 1]
  grows with the target position ``t`` by ``train.tf_position``, so later positions, where errors
  have had time to compound, get more predictions (Liu et al., 2021b, "Scheduled Sampling Based on
  Decoding Steps"); with ``tf_position=none``, ``w = 1`` (Bengio et al.);
  ``confidence``: once the step schedule leaves pure teacher forcing, a prediction goes where the
  model gives the gold token a probability of at least ``tf_confidence``, and a random token
  where above ``tf_noise`` (Liu et al., 2021a, "Confidence-Aware Scheduled Sampling");
- **what** is fed (``train.tf_feed``): the argmax; a sample at temperature ``tf_tau``, drawn as
  the argmax of logits / tau plus Gumbel noise (Zhang et al., 2019's word-level oracle); or
  Zhang et al.'s sentence-level oracle: of ``tf_oracle_beam`` beam-search candidates of exactly the
  gold length, the one with the best sentence BLEU against the gold sentence;
- **how** (``train.scheduled_sampling``): ``sequential`` decodes step by step and chooses as it
  goes; ``parallel`` (Duckworth et al., 2019) predicts every position with a teacher-forced pass
  without gradient, mixes, optionally refines over ``tf_passes`` passes, and trains one pass over
  the mixed inputs, so the decoder still runs over whole sentences.

``scheduled_logits`` returns, besides the logits, how many real positions were fed the model's
choice and how many were fed a token other than the gold one; the trainer logs both shares.
"""

from __future__ import annotations

import torch
from sacrebleu.metrics import BLEU

from .config import TrainConfig
from .data import Batch
from .model import Seq2Seq
from .search import beam_search
from .tokenizer import PAD, SPECIAL


def position_weight(cfg: TrainConfig, length: int, device: torch.device) -> torch.Tensor:
    """w(t) for t = 0..length-1, (length,): the share of the step schedule's prediction chance
    that position t gets; rises from 0 towards 1 with t (1 everywhere for ``tf_position=none``)."""
    t = torch.arange(length, device=device, dtype=torch.float32)
    k = cfg.tf_position_k
    if cfg.tf_position == "linear":
        return (t / k).clamp(max=1.0)
    if cfg.tf_position == "exponential":
        return 1.0 - k ** t
    if cfg.tf_position == "inverse_sigmoid":  # 1 - g(t) / g(0) for g(t) = k / (k + exp(t / k))
        return (1.0 - (k + 1.0) / (k + torch.exp((t / k).clamp(max=700.0)))).clamp(0.0, 1.0)
    return torch.ones(length, device=device)


def gold_mask(cfg: TrainConfig, shape: tuple[int, int], ratio: float, device: torch.device) -> torch.Tensor:
    """``tf_select=random``: (batch, tgt_len) True where the gold token is fed; position 0 (BOS)
    always. Per token, or per sentence (``tf_granularity``: one draw decides a whole sentence, with
    the position weight of its middle)."""
    batch, length = shape
    chance = (1.0 - ratio) * position_weight(cfg, length, device)  # (tgt_len,) of a prediction
    if cfg.tf_granularity == "sentence":
        mask = (torch.rand(batch, 1, device=device) < 1.0 - chance[length // 2]).expand(batch, length).clone()
    else:
        mask = torch.rand(batch, length, device=device) < 1.0 - chance
    mask[:, 0] = True
    return mask


def model_tokens(logits: torch.Tensor, feed: str, tau: float = 1.0) -> torch.Tensor:
    """The model's own choice from logits (..., vocab): the argmax, or a sample of softmax(logits /
    tau) drawn as argmax(logits / tau + Gumbel noise). Non-finite logits give some token and no
    error: the loss is then non-finite and the trainer skips the step."""
    if feed == "argmax":
        return logits.argmax(-1)
    noise = -torch.log(-torch.log(torch.rand(logits.shape, device=logits.device).clamp_(1e-20, 1.0)))
    return (logits.float() / tau + noise).argmax(-1)


def confidence_choice(cfg: TrainConfig, logits: torch.Tensor, gold: torch.Tensor, predicted: torch.Tensor):
    """``tf_select=confidence`` at the positions that ``logits`` (..., vocab) predict, whose gold
    tokens are ``gold`` (...): the gold token where the model is unsure of it, its prediction where
    confident, a random token where very confident. Returns the tokens and where the model's
    choice (or noise) went, each (...)."""
    confidence = logits.float().softmax(-1).gather(-1, gold.unsqueeze(-1)).squeeze(-1)  # (...)
    confident = confidence >= cfg.tf_confidence
    fed = torch.where(confident, predicted, gold)
    if cfg.tf_noise < 1.0:
        noise = torch.randint(SPECIAL, logits.size(-1), gold.shape, device=gold.device)  # no special token
        fed = torch.where(confidence > cfg.tf_noise, noise, fed)
    return fed, confident


_SENTENCE_BLEU = BLEU(tokenize="none", effective_order=True)


def sentence_oracle(model: Seq2Seq, batch: Batch, memory, state, beam: int) -> torch.Tensor:
    """Zhang et al. (2019)'s sentence-level oracle: for each sentence, ``beam`` candidates of
    exactly the gold length from beam search, and of those the best by sentence BLEU (on piece
    ids) against the gold target. Returns (batch, tgt_len - 1) tokens for positions 1.."""
    lengths = (batch.tgt_out != PAD).sum(1)  # (batch,) counting EOS
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            nbest = beam_search(model, memory, state, beam, lengths, alpha=0.0, n_best=beam, min_lens=lengths)
    finally:
        model.train(was_training)
    oracle = batch.tgt_in[:, 1:].clone()  # gold where a sentence found no candidate
    gold_rows = batch.tgt_out.tolist()
    for row, hypotheses in enumerate(nbest):
        n = int(lengths[row]) - 1  # tokens before EOS
        if not hypotheses or n == 0:
            continue
        reference = " ".join(map(str, gold_rows[row][:n]))
        best = max(hypotheses, key=lambda h: _SENTENCE_BLEU.sentence_score(" ".join(map(str, h.tokens)),
                                                                           [reference]).score)
        if len(best.tokens) == n:
            oracle[row, :n] = torch.tensor(best.tokens, device=oracle.device)
    return oracle


def scheduled_logits(model: Seq2Seq, batch: Batch, ratio: float, cfg: TrainConfig):
    """Decoder logits (batch, tgt_len, vocab) with scheduled teacher forcing at step-schedule ratio
    ``ratio`` (1: plain teacher forcing), and a (3,) tensor: the real target positions after BOS,
    those of them that were fed the model's choice, and those where the fed token is not gold."""
    memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    gold_in = batch.tgt_in  # (batch, tgt_len); position 0 is BOS
    real = gold_in[:, 1:] != PAD
    counts = torch.zeros(3, dtype=torch.long, device=gold_in.device)
    counts[0] = real.sum()
    if ratio >= 1.0:
        logits, _, _ = model.decoder(gold_in, memory, state)
        return logits, counts
    gold = gold_mask(cfg, tuple(gold_in.shape), ratio, gold_in.device) if cfg.tf_select == "random" else None

    def mix(t: slice | int, logits: torch.Tensor | None, oracle: torch.Tensor | None = None):
        """The tokens fed at positions ``t`` (never 0) from the logits that predict them, and
        where the model's choice went."""
        predicted = oracle if oracle is not None else model_tokens(logits, cfg.tf_feed, cfg.tf_tau)
        if gold is None:
            return confidence_choice(cfg, logits, gold_in[:, t], predicted)
        return torch.where(gold[:, t], gold_in[:, t], predicted), ~gold[:, t]

    if cfg.scheduled_sampling == "parallel":
        oracle, passes = None, cfg.tf_passes
        if cfg.tf_feed == "sentence":  # the same every pass; only confidence needs the model's probabilities
            oracle = sentence_oracle(model, batch, memory, state, cfg.tf_oracle_beam)
            passes = 1 if gold is None else 0
        mixed = gold_in
        with torch.no_grad():
            if passes == 0:
                tokens, chosen = mix(slice(1, None), None, oracle)
                mixed = torch.cat([gold_in[:, :1], tokens], 1)
            for _ in range(passes):
                predicting, _, _ = model.decoder(mixed, memory, state)  # (batch, tgt_len, vocab)
                tokens, chosen = mix(slice(1, None), predicting[:, :-1], oracle)
                mixed = torch.cat([gold_in[:, :1], tokens], 1)
        logits, _, _ = model.decoder(mixed, memory, state)
    else:
        steps, fed, choices = [], [gold_in[:, 0]], []
        for t in range(gold_in.size(1)):
            if t > 0:
                tokens, chosen = mix(t, steps[-1].detach())
                fed.append(tokens)
                choices.append(chosen)
            step_logits, state, _ = model.decode_step(fed[-1], memory, state)
            steps.append(step_logits)
        logits, mixed = torch.stack(steps, 1), torch.stack(fed, 1)
        chosen = torch.stack(choices, 1) if choices else gold_in.new_zeros(gold_in.size(0), 0, dtype=torch.bool)
    counts[1] = (real & chosen).sum()
    counts[2] = (real & (mixed[:, 1:] != gold_in[:, 1:])).sum()
    return logits, counts
