"""Attention decoder in the style of Luong et al. (2015): the RNN reads the previous token (and,
with input feeding, the previous attentional vector), attends over the encoder states with its
output, and combines both into the attentional vector that predicts the next token.

Without input feeding nothing flows from one step's attention into the next step's RNN, so a
teacher-forced pass runs the RNN over the whole target in one fused call; with it the decoder
steps token by token. Both paths share ``_attentional``, so they compute the same thing.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attention import make_attention


class RNNStep(Protocol):
    """What the decoder's RNN offers: a whole sequence (``__call__``, as ``nn.LSTM``/``nn.GRU``) and
    one time step (``step``). ``StepLSTM``/``StepGRU`` below and the int8 copy for decoding
    (``quantize.Int8RNNStep``) both provide it."""

    def __call__(self, x: torch.Tensor, hidden): ...

    def step(self, x: torch.Tensor, hidden: tuple[torch.Tensor, ...]): ...


class _SingleStep:
    """One time step of a multi-layer ``nn.LSTM``/``nn.GRU`` through the fused cell kernels, with the
    module's own weights: for one step they cost a fraction of a full RNN call, and decoding is
    almost all single steps."""

    def step(self, x: torch.Tensor, hidden: tuple[torch.Tensor, ...]):
        """x: (batch, input); hidden: each (layers, batch, hidden), (h,) or (h, c). Returns the top
        layer's output (batch, 1, hidden) and the new states, each (layers, batch, hidden)."""
        lstm = self.mode == "LSTM"
        new_h, new_c = [], []
        for layer in range(self.num_layers):
            weights = [getattr(self, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if layer > 0:
                x = F.dropout(x, self.dropout, self.training)
            if lstm:
                h, c = torch.lstm_cell(x, (hidden[0][layer], hidden[1][layer]), *weights)
                new_c.append(c)
            else:
                h = torch.gru_cell(x, hidden[0][layer], *weights)
            new_h.append(h)
            x = h
        states = (torch.stack(new_h), torch.stack(new_c)) if lstm else (torch.stack(new_h),)
        return x.unsqueeze(1), states


class StepLSTM(_SingleStep, nn.LSTM):
    """``nn.LSTM`` (same parameters and names) with ``step``."""


class StepGRU(_SingleStep, nn.GRU):
    """``nn.GRU`` (same parameters and names) with ``step``."""


STEP_CELLS = {"lstm": StepLSTM, "gru": StepGRU}


class Memory(NamedTuple):
    """What the decoder attends to, computed once per source by ``model.encode``."""

    values: torch.Tensor  # (batch, src_len, enc_dim)
    keys: torch.Tensor  # (batch, src_len, key_dim), projected once
    mask: torch.Tensor  # (batch, src_len), True on real tokens

    def select(self, index: torch.Tensor) -> Memory:
        return Memory(*(t.index_select(0, index) for t in self))


class DecoderState(NamedTuple):
    """Everything a decoding step needs from the previous one (nothing is kept on the module)."""

    hidden: tuple[torch.Tensor, ...]  # each (layers, batch, hidden): (h,) for GRU, (h, c) for LSTM
    feed: torch.Tensor  # (batch, out_dim) last attentional vector, read only with input feeding

    def select(self, index: torch.Tensor) -> DecoderState:
        return DecoderState(tuple(h.index_select(1, index) for h in self.hidden), self.feed.index_select(0, index))


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, enc_dim: int, layers: int = 1,
                 cell: str = "lstm", attention: str = "bahdanau", input_feeding: bool = False,
                 dropout: float = 0.0, tie_embeddings: bool = False, bridge: bool = True, pad_id: int = 0):
        super().__init__()
        self.cell, self.layers, self.hidden_dim = cell, layers, hidden_dim
        self.input_feeding = input_feeding
        self.out_dim = embed_dim if tie_embeddings else hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        rnn_input = embed_dim + (self.out_dim if input_feeding else 0)
        self.rnn: RNNStep = STEP_CELLS[cell](rnn_input, hidden_dim, num_layers=layers, batch_first=True,
                                             dropout=dropout if layers > 1 else 0.0)
        self.attention = make_attention(attention, hidden_dim, enc_dim)
        self.combine = nn.Linear(hidden_dim + enc_dim, self.out_dim)
        self.output = nn.Linear(self.out_dim, vocab_size)
        if tie_embeddings:
            self.output.weight = self.embed.weight  # Press & Wolf (2017)
        n_states = 2 if cell == "lstm" else 1
        self.bridge = nn.ModuleList(nn.Linear(enc_dim, hidden_dim) for _ in range(n_states)) if bridge else None

    def init_state(self, finals: tuple[torch.Tensor, ...], batch: int) -> DecoderState:
        """Bridges the encoder's final states (layers, batch, enc_dim) into the decoder's."""
        ref = finals[0]
        if self.bridge is not None:
            hidden = tuple(torch.tanh(layer(h)) for layer, h in zip(self.bridge, finals))
            hidden = tuple(h.contiguous() for h in hidden)
        else:
            zeros = ref.new_zeros(self.layers, batch, self.hidden_dim)
            hidden = (zeros, zeros.clone()) if self.cell == "lstm" else (zeros,)
        return DecoderState(hidden, ref.new_zeros(batch, self.out_dim))

    def forward(self, tgt_in: torch.Tensor, memory: Memory, state: DecoderState):
        """Teacher-forced pass over a whole target. tgt_in: (batch, tgt_len).
        Returns logits (batch, tgt_len, vocab), the final state and the attention weights
        (batch, tgt_len, src_len)."""
        if self.input_feeding:  # step by step, but the output layer runs once over all steps
            vectors, weights = [], []
            for t in range(tgt_in.size(1)):
                embedded = self.dropout(self.embed(tgt_in[:, t: t + 1]))  # (batch, 1, embed)
                attentional, state, step_weights = self._attentional(embedded, memory, state)
                vectors.append(attentional)
                weights.append(step_weights)
            attentional, weights = torch.cat(vectors, 1), torch.cat(weights, 1)
        else:
            embedded = self.dropout(self.embed(tgt_in))  # (batch, tgt_len, embed)
            attentional, state, weights = self._attentional(embedded, memory, state)
        return self.output(self.dropout(attentional)), state, weights

    def step(self, prev: torch.Tensor, memory: Memory, state: DecoderState):
        """One decoding step. prev: (batch,) previous tokens. Returns logits (batch, vocab), the new
        state and the attention weights (batch, src_len). ``memory`` may hold one entry per group
        of consecutive rows (batch = entries x group): beam search keeps one per sentence for its
        beam, so the encoder states are neither copied per hypothesis nor reordered."""
        embedded = self.dropout(self.embed(prev)).unsqueeze(1)  # (batch, 1, embed)
        attentional, state, weights = self._attentional(embedded, memory, state)
        logits = self.output(self.dropout(attentional.squeeze(1)))  # (batch, vocab)
        return logits, state, weights.squeeze(1)

    def _attentional(self, embedded: torch.Tensor, memory: Memory, state: DecoderState):
        """RNN, attention and their combination for ``steps`` positions; returns the attentional
        vectors (batch, steps, out_dim), the new state and the weights (batch, steps, src_len)."""
        # embedded: (batch, steps, embed); steps is 1 whenever input feeding is on
        rnn_in = embedded
        if self.input_feeding:
            rnn_in = torch.cat([embedded, state.feed.unsqueeze(1)], dim=-1)  # (batch, 1, embed+out)
        if rnn_in.size(1) == 1:
            outputs, hidden = self.rnn.step(rnn_in.squeeze(1), state.hidden)
        else:
            hidden = state.hidden if self.cell == "lstm" else state.hidden[0]
            outputs, hidden = self.rnn(rnn_in, hidden)  # (batch, steps, hidden)
            hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        # the rows that share a memory entry (a sentence's beam in beam search, else one row) attend
        # as the steps of one query: (entries, rows per entry * steps, hidden); views, no copies
        rows, steps = outputs.shape[:2]
        query = outputs.reshape(memory.mask.size(0), -1, outputs.size(-1))
        context, weights = self.attention(query, memory.keys, memory.values, memory.mask)
        context, weights = context.reshape(rows, steps, -1), weights.reshape(rows, steps, -1)
        attentional = torch.tanh(self.combine(torch.cat([outputs, context], dim=-1)))  # (batch, steps, out)
        return attentional, DecoderState(hidden, attentional[:, -1]), weights
