"""Products and RNN cells for a decoder that steps token by token while training.

Inside such a loop every step multiplies a small batch of rows (batch, in) by the same weights.
Left to autograd, each step's backward also makes its own weight gradient: a product whose inner
size is only the batch, cast to the parameter's precision and added into the gradient, once per
step and weight. Here the weights are gathered once per pass (concatenated where two products
share an input, and cast to the autocast precision once), each step's backward returns only the
gradient of its input and records (gradient, input), and the weight gradient is one product over
all steps' records when the backward pass reaches the gathered weight.

The loop's state lives in the objects one forward pass makes; modules keep nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class LoopWeight(NamedTuple):
    """Weights gathered for one loop: ``tensor`` (out, in) in the compute precision, and the
    (output gradient, input) pairs its products' backward passes record."""

    tensor: torch.Tensor
    records: list


class _Gather(torch.autograd.Function):
    """parts (out, in_i) -> their concatenation along ``in``, cast; backward: the weight gradient
    of all recorded steps in one product, split back into the parts."""

    @staticmethod
    def forward(ctx, records: list, dtype: torch.dtype, *parts: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.records, ctx.sizes, ctx.dtypes = records, [p.size(1) for p in parts], [p.dtype for p in parts]
        return torch.cat(parts, 1).to(dtype)  # (out, sum of in); cat copies, so never an alias

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        records = ctx.records
        if records:
            outputs = torch.cat([g for g, _ in records])  # (steps x batch, out)
            inputs = torch.cat([x for _, x in records])  # (steps x batch, in)
            records.clear()
            total = outputs.t().mm(inputs)  # (out, in)
            grad = total if grad is None else grad + total
        if grad is None:
            return (None, None) + (None,) * len(ctx.sizes)
        parts = grad.split(ctx.sizes, 1)
        return (None, None) + tuple(p.to(dtype) for p, dtype in zip(parts, ctx.dtypes))


class _StepProduct(torch.autograd.Function):
    """x (rows, in) @ weight.T; backward returns the input's gradient and records the rest."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, records: list) -> torch.Tensor:
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, weight)
        ctx.records = records
        return x.mm(weight.t())  # (rows, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        ctx.records.append((grad, x))
        return grad.mm(weight), None, None  # autograd casts it to the input's own type


def loop_weight(*parts: torch.Tensor) -> LoopWeight:
    """Gathers weights (out, in_i) whose products with the concatenated inputs happen at every step."""
    dtype = torch.get_autocast_dtype(parts[0].device.type) if torch.is_autocast_enabled(parts[0].device.type) \
        else parts[0].dtype
    records: list = []
    return LoopWeight(_Gather.apply(records, dtype, *parts), records)


def loop_linear(x: torch.Tensor, weight: LoopWeight) -> torch.Tensor:
    """x: (rows, in) -> (rows, out), in the weight's precision."""
    return _StepProduct.apply(x, weight.tensor, weight.records)


class UnrolledRNN:
    """A multi-layer ``nn.LSTM``/``nn.GRU`` stepped by hand for one teacher-forced pass whose first
    layer's input starts with ``leading`` (batch, steps, n), known for all steps ahead: that share
    of the first layer's gates is one product over all steps, and every step multiplies only the
    rest of the input and the previous state. Same equations and parameters as the module."""

    def __init__(self, rnn: nn.LSTM | nn.GRU, leading: torch.Tensor):
        self.lstm, self.layers = rnn.mode == "LSTM", rnn.num_layers
        self.dropout, self.training = rnn.dropout, rnn.training
        n = leading.size(-1)
        w_ih, w_hh = rnn.weight_ih_l0, rnn.weight_hh_l0
        bias = rnn.bias_ih_l0 + rnn.bias_hh_l0 if self.lstm else rnn.bias_ih_l0
        self.gates = F.linear(leading, w_ih[:, :n], bias).unbind(1)  # a (batch, gates x hidden) tensor a step
        self.weights, self.biases = [], []
        for layer in range(self.layers):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
            rest = w_ih[:, n:] if layer == 0 else w_ih
            if self.lstm:  # one product of [input; state] a step
                self.weights.append((loop_weight(rest, w_hh),))
                self.biases.append(None if layer == 0 else b_ih + b_hh)
            else:  # GRU: the reset gate scales the state's share of the candidate, so two products
                self.weights.append((loop_weight(rest), loop_weight(w_hh)))
                self.biases.append((None if layer == 0 else b_ih, b_hh))

    def step(self, t: int, x: torch.Tensor, hidden: tuple[torch.Tensor, ...]):
        """Step ``t`` with x (batch, rest of the input); hidden: each (layers, batch, hidden).
        Returns the top layer's output (batch, hidden) and the new states."""
        new_h, new_c = [], []
        for layer in range(self.layers):
            if layer > 0:
                x = F.dropout(x, self.dropout, self.training)
            h = hidden[0][layer]
            if self.lstm:
                (weight,), bias = self.weights[layer], self.biases[layer]
                gates = loop_linear(torch.cat([x, h], -1), weight)  # (batch, 4 x hidden)
                gates = gates + (self.gates[t] if layer == 0 else bias)
                i, f, g, o = gates.chunk(4, 1)
                c = f.sigmoid() * hidden[1][layer] + i.sigmoid() * g.tanh()
                h = o.sigmoid() * c.tanh()
                new_c.append(c)
            else:
                (w_x, w_h), (b_x, b_h) = self.weights[layer], self.biases[layer]
                gi = (self.gates[t] if layer == 0 else b_x) + loop_linear(x, w_x)  # (batch, 3 x hidden)
                gh = loop_linear(h, w_h) + b_h
                i_r, i_z, i_n = gi.chunk(3, 1)
                h_r, h_z, h_n = gh.chunk(3, 1)
                r, z = (i_r + h_r).sigmoid(), (i_z + h_z).sigmoid()
                n = (i_n + r * h_n).tanh()
                h = n + z * (h - n)
            new_h.append(h)
            x = h
        states = (torch.stack(new_h), torch.stack(new_c)) if self.lstm else (torch.stack(new_h),)
        return x, states
