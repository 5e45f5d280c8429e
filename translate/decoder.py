"""Attention decoders over ``Memory`` (the encoder states, their projected keys and the mask).

- ``luong`` (Luong et al., 2015): the RNN reads the previous token (and, with input feeding, the
  previous attentional vector), attends over the encoder states with its new output, and a
  combination of both, the attentional vector, predicts the next token.
- ``bahdanau`` (Bahdanau et al., 2015): attends with the previous state, feeds the context into the
  RNN together with the previous token, and predicts from a readout of the new state, the
  context and the previous token's embedding (the paper's "deep output", one tanh layer).

Where a step's input depends on the previous step's attention (the Bahdanau decoder, and the Luong
decoder with input feeding), the teacher-forced pass runs the RNN token by token, but keeps out of
the loop whatever does not depend on the previous step: the embeddings' share of the first RNN
layer's gates is one product over all steps, the keys are projected once per source, and the
readout and output layer run once over all steps; the products inside the loop make their weight
gradients once over all steps (``unrolled.py``). The Luong decoder without input feeding runs its
RNN over the whole target in one fused call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attention import make_attention
from .tokenizer import SPECIAL
from .unrolled import LoopWeight, UnrolledRNN, loop_linear, loop_weight


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
        for layer, weights in enumerate(self.all_weights):  # each [weight_ih, weight_hh, bias_ih, bias_hh]
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


class OutputLayer(Protocol):
    """What the decoder's output layer offers: logits over the whole vocabulary (``__call__``) and
    the layer for a few of its rows (``rows``), a shortlist's. ``OutputLinear`` below and the int8
    copy for decoding (``quantize.Int8Linear``) both provide it."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def rows(self, index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]: ...


class OutputLinear(nn.Linear):
    """``nn.Linear`` (same parameters and names) with ``rows``."""

    def rows(self, index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The layer for the outputs ``index`` (n,) alone: (rows, in) -> (rows, n)."""
        weight = self.weight.index_select(0, index)  # (n, in)
        bias = None if self.bias is None else self.bias.index_select(0, index)  # (n,)
        return functools.partial(F.linear, weight=weight, bias=bias)


class OutputVocab(NamedTuple):
    """The part of the target vocabulary a search scores (a batch's shortlist, ``shortlist.py``)
    and the output layer over just those tokens; made once per batch by ``Decoder.restrict``."""

    ids: torch.Tensor  # (n,) token ids, sorted, from the special tokens on (column i is token i for i < 4)
    output: Callable[[torch.Tensor], torch.Tensor]  # (rows, out_dim) -> (rows, n) logits


class DecoderState(NamedTuple):
    """Everything a decoding step needs from the previous one (nothing is kept on the module)."""

    hidden: tuple[torch.Tensor, ...]  # each (layers, batch, hidden): (h,) for GRU, (h, c) for LSTM
    feed: torch.Tensor  # (batch, out_dim) last attentional vector, read only with input feeding

    def select(self, index: torch.Tensor) -> DecoderState:
        return DecoderState(tuple(h.index_select(1, index) for h in self.hidden), self.feed.index_select(0, index))


class Loop(NamedTuple):
    """What one step-by-step teacher-forced pass makes before its loop (nothing stays on the module)."""

    rnn: UnrolledRNN
    query: LoopWeight | None  # the attention's query projection, if it has one
    combine: LoopWeight | None  # the Luong decoder's attentional layer


class Decoder(nn.Module):
    """What both decoders share: target embeddings, the RNN, attention, the output layer (tied to
    the embeddings or not), the bridge from the encoder's final states, and optional LayerNorm over
    the RNN's outputs. Subclasses define the teacher-forced pass (``forward``) and ``step``."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, enc_dim: int, rnn_input: int,
                 head_input: int, layers: int = 1, cell: str = "lstm", attention: str = "bahdanau",
                 dropout: float = 0.0, tie_embeddings: bool = False, bridge: bool = True, pad_id: int = 0,
                 layer_norm: bool = False):
        super().__init__()
        self.cell, self.layers, self.hidden_dim = cell, layers, hidden_dim
        self.out_dim = embed_dim if tie_embeddings else hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.rnn: RNNStep = STEP_CELLS[cell](rnn_input, hidden_dim, num_layers=layers, batch_first=True,
                                             dropout=dropout if layers > 1 else 0.0)
        self.norm = nn.LayerNorm(hidden_dim) if layer_norm else None
        self.attention = make_attention(attention, hidden_dim, enc_dim)
        # the subclass's layer into out_dim (Luong's combine, Bahdanau's readout) is made here, in this
        # order, so that a seed gives the same initial weights as it always has
        self._make_head(head_input)
        self.output: OutputLayer = OutputLinear(self.out_dim, vocab_size)
        if tie_embeddings:
            self.output.weight = self.embed.weight  # Press & Wolf (2017)
        n_states = 2 if cell == "lstm" else 1
        self.bridge = nn.ModuleList(nn.Linear(enc_dim, hidden_dim) for _ in range(n_states)) if bridge else None

    def _make_head(self, in_features: int) -> None:
        """Makes the subclass's layer from ``in_features`` into ``out_dim``, under its own name."""
        raise NotImplementedError

    def replace_linears(self, convert: Callable[[nn.Linear], nn.Module]) -> None:
        """Replaces the linear layers between the RNN and the output layer (the attention's query and
        key projections, the bridge; subclasses add their own layer) by ``convert(layer)``, each under
        its name, so that the weights keep their keys: the int8 copy (``quantize.quantized_copy``)."""
        attention = self.attention
        if attention.key_layer is not None:
            attention.key_layer = convert(attention.key_layer)
        if attention.query_layer is not None:
            attention.query_layer = convert(attention.query_layer)
        if self.bridge is not None:
            self.bridge = nn.ModuleList(convert(layer) for layer in self.bridge)

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
        """Teacher-forced pass over a whole target. tgt_in: (batch, tgt_len). Returns logits
        (batch, tgt_len, vocab), the final state and the attention weights (batch, tgt_len, src_len)."""
        raise NotImplementedError

    def step(self, prev: torch.Tensor, memory: Memory, state: DecoderState, vocab: OutputVocab | None = None):
        """One decoding step. prev: (batch,) previous tokens. Returns logits (batch, vocab), or
        (batch, n) over ``vocab.ids`` when given, the new state and the attention weights
        (batch, src_len). ``memory`` may hold one entry per group of consecutive rows (batch =
        entries x group): beam search keeps one per sentence for its beam, so the encoder states
        are neither copied per hypothesis nor reordered."""
        raise NotImplementedError

    def restrict(self, ids: torch.Tensor) -> OutputVocab:
        """The output layer's rows for the token ids ``ids`` (n,), sorted, from the special tokens on
        (the searches read PAD, BOS and EOS by column); taken out once for a batch's search."""
        if ids.numel() < SPECIAL or ids[:SPECIAL].tolist() != list(range(SPECIAL)):
            raise ValueError(f"a shortlist starts with the special tokens 0 to {SPECIAL - 1}")
        return OutputVocab(ids, self.output.rows(ids))

    def _logits(self, x: torch.Tensor, vocab: OutputVocab | None) -> torch.Tensor:
        """x: (batch, out_dim) -> logits over the vocabulary, or over ``vocab.ids``."""
        return self.output(x) if vocab is None else vocab.output(x)

    def _normed(self, outputs: torch.Tensor) -> torch.Tensor:
        """The RNN's top-layer outputs as the rest of the decoder reads them (LayerNorm, if on)."""
        return outputs if self.norm is None else self.norm(outputs)

    def _attend(self, query: torch.Tensor, memory: Memory, loop: Loop | None = None):
        """query: (rows, steps, hidden) -> context (rows, steps, enc_dim), weights (rows, steps, src_len).
        The rows that share a memory entry (a sentence's beam in beam search, else one row) attend
        as the steps of one query: (entries, rows per entry * steps, hidden); views, no copies."""
        rows, steps = query.shape[:2]
        if loop is not None and loop.query is not None:
            query = loop_linear(query.reshape(rows * steps, -1), loop.query).view(rows, steps, -1)
        else:
            query = self.attention.project_query(query)
        grouped = query.reshape(memory.mask.size(0), -1, query.size(-1))
        context, weights = self.attention.attend(grouped, memory.keys, memory.values, memory.mask)
        return context.reshape(rows, steps, -1), weights.reshape(rows, steps, -1)

    def _loop(self, leading: torch.Tensor, combine: nn.Linear | None = None) -> Loop:
        """The RNN and the weights of one step-by-step pass whose first-layer input starts with
        ``leading`` (batch, steps, n); ``combine``: the Luong decoder's attentional layer."""
        query_layer = self.attention.query_layer
        return Loop(UnrolledRNN(self.rnn, leading),
                    None if query_layer is None else loop_weight(query_layer.weight),
                    None if combine is None else loop_weight(combine.weight))


class LuongDecoder(Decoder):
    """Luong et al. (2015): RNN, then attention with its output; tanh(W_c [h; context]) is the
    attentional vector that predicts the next token and, with input feeding, enters the next
    step's RNN input."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, enc_dim: int, input_feeding: bool = False,
                 tie_embeddings: bool = False, **shared):
        out_dim = embed_dim if tie_embeddings else hidden_dim
        super().__init__(vocab_size, embed_dim, hidden_dim, enc_dim, embed_dim + (out_dim if input_feeding else 0),
                         hidden_dim + enc_dim, tie_embeddings=tie_embeddings, **shared)
        self.input_feeding = input_feeding

    def _make_head(self, in_features: int) -> None:
        self.combine = nn.Linear(in_features, self.out_dim)  # W_c over [h; context]

    def replace_linears(self, convert: Callable[[nn.Linear], nn.Module]) -> None:
        super().replace_linears(convert)
        self.combine = convert(self.combine)

    def forward(self, tgt_in: torch.Tensor, memory: Memory, state: DecoderState):
        embedded = self.dropout(self.embed(tgt_in))  # (batch, tgt_len, embed)
        if not self.input_feeding:  # the RNN over the whole target in one call
            hidden = state.hidden if self.cell == "lstm" else state.hidden[0]
            outputs, hidden = self.rnn(embedded, hidden)  # (batch, tgt_len, hidden)
            hidden = hidden if isinstance(hidden, tuple) else (hidden,)
            attentional, weights = self._attentional(outputs, memory)  # (batch, tgt_len, out_dim)
            return self.output(self.dropout(attentional)), DecoderState(hidden, attentional[:, -1]), weights
        loop = self._loop(embedded, self.combine)
        hidden, feed = state.hidden, state.feed
        vectors, weights = [], []
        for t in range(tgt_in.size(1)):
            outputs, hidden = loop.rnn.step(t, feed, hidden)  # (batch, hidden)
            attentional, step_weights = self._attentional(outputs.unsqueeze(1), memory, loop)  # (batch, 1, out_dim)
            feed = attentional[:, 0]
            vectors.append(attentional)
            weights.append(step_weights)
        attentional = torch.cat(vectors, 1)  # (batch, tgt_len, out_dim)
        return self.output(self.dropout(attentional)), DecoderState(hidden, feed), torch.cat(weights, 1)

    def step(self, prev: torch.Tensor, memory: Memory, state: DecoderState, vocab: OutputVocab | None = None):
        rnn_in = self.dropout(self.embed(prev))  # (batch, embed)
        if self.input_feeding:
            rnn_in = torch.cat([rnn_in, state.feed], dim=-1)  # (batch, embed + out_dim)
        outputs, hidden = self.rnn.step(rnn_in, state.hidden)  # (batch, 1, hidden)
        attentional, weights = self._attentional(outputs, memory)  # (batch, 1, out_dim)
        logits = self._logits(self.dropout(attentional[:, 0]), vocab)  # (batch, vocab or n)
        return logits, DecoderState(hidden, attentional[:, 0]), weights[:, 0]

    def _attentional(self, outputs: torch.Tensor, memory: Memory, loop: Loop | None = None):
        """outputs: (batch, steps, hidden) -> attentional vectors (batch, steps, out_dim), weights."""
        outputs = self._normed(outputs)
        context, weights = self._attend(outputs, memory, loop)  # (batch, steps, enc_dim)
        both = torch.cat([outputs, context], dim=-1)  # (batch, steps, hidden + enc_dim)
        if loop is None:
            return torch.tanh(self.combine(both)), weights
        combined = loop_linear(both.flatten(0, 1), loop.combine) + self.combine.bias  # (batch x steps, out_dim)
        return torch.tanh(combined).view(*both.shape[:2], -1), weights


class BahdanauDecoder(Decoder):
    """Bahdanau et al. (2015): the previous state attends (at the first step, the bridged initial
    state), the RNN reads [embedding of the previous token; context], and a readout
    tanh(W_r [new state; context; embedding]) to ``out_dim`` feeds the output layer (so the
    output layer can share the embeddings' weights)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, enc_dim: int, **shared):
        super().__init__(vocab_size, embed_dim, hidden_dim, enc_dim, embed_dim + enc_dim,
                         hidden_dim + enc_dim + embed_dim, **shared)

    def _make_head(self, in_features: int) -> None:
        self.readout = nn.Linear(in_features, self.out_dim)  # W_r over [state; context; embedding]

    def replace_linears(self, convert: Callable[[nn.Linear], nn.Module]) -> None:
        super().replace_linears(convert)
        self.readout = convert(self.readout)

    def forward(self, tgt_in: torch.Tensor, memory: Memory, state: DecoderState):
        embedded = self.dropout(self.embed(tgt_in))  # (batch, tgt_len, embed)
        loop = self._loop(embedded)
        hidden = state.hidden
        outputs, contexts, weights = [], [], []
        for t in range(tgt_in.size(1)):
            query = self._normed(hidden[0][-1]).unsqueeze(1)  # (batch, 1, hidden): the previous top state
            context, step_weights = self._attend(query, memory, loop)  # (batch, 1, enc_dim)
            top, hidden = loop.rnn.step(t, context[:, 0], hidden)  # (batch, hidden)
            outputs.append(top.unsqueeze(1))
            contexts.append(context)
            weights.append(step_weights)
        readout = self._readout(torch.cat(outputs, 1), torch.cat(contexts, 1), embedded)  # (batch, tgt_len, out)
        return self.output(self.dropout(readout)), DecoderState(hidden, readout[:, -1]), torch.cat(weights, 1)

    def step(self, prev: torch.Tensor, memory: Memory, state: DecoderState, vocab: OutputVocab | None = None):
        embedded = self.dropout(self.embed(prev)).unsqueeze(1)  # (batch, 1, embed)
        query = self._normed(state.hidden[0][-1]).unsqueeze(1)  # (batch, 1, hidden)
        context, weights = self._attend(query, memory)  # (batch, 1, enc_dim)
        top, hidden = self.rnn.step(torch.cat([embedded, context], dim=-1)[:, 0], state.hidden)  # (batch, 1, hidden)
        readout = self._readout(top, context, embedded)[:, 0]  # (batch, out_dim)
        return self._logits(self.dropout(readout), vocab), DecoderState(hidden, readout), weights[:, 0]

    def _readout(self, outputs: torch.Tensor, context: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """The deep output: tanh(W_r [state; context; embedding]), each (batch, steps, ·) -> (batch, steps, out)."""
        return torch.tanh(self.readout(torch.cat([self._normed(outputs), context, embedded], dim=-1)))


DECODERS = {"luong": LuongDecoder, "bahdanau": BahdanauDecoder}
