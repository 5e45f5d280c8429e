"""Dynamic int8 quantisation for CPU decoding (Jacob et al., 2018): weights are stored once as
int8 with one scale per output row, activations are quantised per call from their observed range,
and the products accumulate in int32, in fbgemm's kernels.

Each row of an activation (a sentence's, a hypothesis's, a source token's) is quantised with a
scale of its own, its largest magnitude, not with one scale over the batch as fbgemm's dynamic
linear takes it: so a sentence's translation does not depend on the sentences decoded with it (in
``translate serve``, on other clients' requests). The row is divided by its scale onto one grid
over [-1, 1] that every row shares, and the int32 product is multiplied back by it.

Decoding is bound by the matrix products (the output layer over the vocabulary and the RNN
gates, run once per target token; the encoder's RNN, once per source token), which fbgemm's
int8 kernels run several times faster than fp32 on x86. What is quantised: the decoder's RNN
step (input and recurrent weights joined into one product per layer), the attention query, the
combination layer (Luong) or readout (Bahdanau), the output layer, the key projection, and the
encoder's RNN: its input products for all source tokens at once, then the recurrent product per
step (torch's fused int8 RNN, one call, would quantise each step's batch with one scale).
Embedding lookups, softmaxes and LayerNorm stay in fp32. The model used for training is never
changed: ``quantized_copy`` returns a new one.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .runtime import cpu_has_vnni

# of torch.ops.quantized, which torch is retiring: packing, and the product of a float input quantised on a given grid
INT8_OPS = ("linear_prepack", "linear_with_input_q_dq_qweight_dq_output_fp32")
TINY = torch.finfo(torch.float32).tiny  # the least scale a row takes (an all-zero row: padding)


def int8_available() -> bool:
    """True when this torch build has the x86 int8 kernels (fbgemm) and the ops that ``quantized_copy`` uses."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        return all(getattr(torch.ops.quantized, name) is not None for name in INT8_OPS)
    except (AttributeError, RuntimeError):  # an op that this build no longer registers
        return False


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values (out, in) and scales (out,) of a weight, per output row, symmetric."""
    weight = weight.detach().float().contiguous()  # (out, in)
    scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()  # (out,)
    zeros = torch.zeros(weight.size(0), dtype=torch.long)
    with warnings.catch_warnings():  # the quantised-tensor constructors warn of their future removal
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8).int_repr(), scales


def _pack(values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """``_quantize``'s weight packed for fbgemm's dynamic linear."""
    zeros = torch.zeros(values.size(0), dtype=torch.long)
    with warnings.catch_warnings():  # the quantised-tensor constructors warn of their future removal
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(values, scales, zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, bias)


def _fixed_grid_linear(x: torch.Tensor, scale: float, zero: int, packed) -> torch.Tensor:
    """x W^T for x (rows, in) quantised with ``scale`` and ``zero`` point (not from x's range, as a
    dynamic product's would be, which would tie each row to the others): (rows, out), float."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, scale, zero, packed)


class Int8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` at inference: y = x W^T + b with W in int8, any leading dims. As the
    output layer (kept with ``keep_weight``), it provides the decoder's ``OutputLayer`` interface, as
    the float ``decoder.OutputLinear`` does: ``rows`` gives a shortlist's layer.

    Each row of the input (a sentence, a hypothesis, a source token) is quantised with a scale of its
    own, its largest magnitude, so that a row's output does not depend on the rows computed with it:
    a sentence decodes alike alone and batched with any others. The row is divided by its scale and
    quantised on one fixed grid over [-1, 1]; fbgemm's product accumulates in int32 (exact), and the
    result is multiplied back by the row's scale. Activations take 8 bits where the CPU accumulates
    int8 products in int32 (VNNI), else 7 (``reduce_range``), which keeps the products clear of int16
    saturation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool | None = None,
                 keep_weight: bool = False):
        super().__init__()
        values, scales = _quantize(weight)
        self._build(values, scales, None if bias is None else bias.detach().float().contiguous(),
                    not cpu_has_vnni() if reduce_range is None else reduce_range, keep_weight)

    def _build(self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool,
               keep_weight: bool) -> None:
        self.in_features, self.out_features = values.size(1), values.size(0)
        self.reduce_range = reduce_range
        self.bias = bias  # (out,) or None: added after the row's scale is applied
        self._packed = _pack(values, scales, None)
        levels = 63 if reduce_range else 127  # [-1, 1] onto [0, 126] or [0, 254]
        self._grid = (1.0 / levels, levels)  # the activations' scale and zero point, the same for every row
        # the int8 weight unpacked, for ``rows`` (the output layer's, a quarter of its fp32 size)
        self._unpacked = (values, scales, bias) if keep_weight else None

    def rows(self, index: torch.Tensor) -> Int8Linear:
        """The layer for the outputs ``index`` (n,) alone: a shortlist's output layer. Weights are
        quantised per row, so its outputs are exactly those columns of this layer's."""
        if self._unpacked is None:
            raise RuntimeError("this Int8Linear keeps no unpacked weight to take rows from (keep_weight=False)")
        values, scales, bias = self._unpacked
        layer = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(layer)
        layer._build(values.index_select(0, index), scales.index_select(0, index),
                     None if bias is None else bias.index_select(0, index), self.reduce_range, False)
        return layer

    def product(self, x: torch.Tensor, scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x W^T of rows x (rows, in), float, as (p, s): x W^T = p * s, p (rows, out) and each row's
        scale s (rows, 1); without the bias, so that a caller can add it, or more, in one pass. With
        ``scratch``, x is the caller's to lose: it is scaled in place (a pass that writes no new tensor)."""
        x = x.detach()  # for decoding only, as the int8 product itself
        # (rows, 1): the row's largest magnitude, from two reductions that write no (rows, in) tensor as abs would
        scale = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_()).clamp_(min=TINY)
        unit = x.div_(scale) if scratch else x / scale  # (rows, in), within [-1, 1]; a zero row stays zero
        return _fixed_grid_linear(unit, *self._grid, self._packed), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., in)
        flat = x.reshape(-1, self.in_features).float()  # (rows, in)
        return self.finish(*self.product(flat)).view(*shape[:-1], self.out_features)

    def finish(self, product: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``product``'s p * s + b: the layer's output (rows, out), in p's place."""
        return product.mul_(scale) if self.bias is None else torch.addcmul(self.bias, product, scale, out=product)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)


class Int8RNNStep(nn.Module):
    """A multi-layer LSTM or GRU with int8 weights, with the decoder's ``RNNStep`` interface. For
    the LSTM, the input and recurrent products of a layer are one product over [x; h] (their
    weights side by side); the GRU needs them apart because its reset gate scales only the
    recurrent part of the candidate."""

    def __init__(self, rnn: nn.LSTM | nn.GRU):
        super().__init__()
        self.cell = "lstm" if isinstance(rnn, nn.LSTM) else "gru"
        self.layers, self.hidden_dim = rnn.num_layers, rnn.hidden_size
        joined, inputs, recurrents = [], [], []
        for weights in rnn.all_weights:  # per layer: [weight_ih, weight_hh], then [bias_ih, bias_hh] if it has them
            w_ih, w_hh = weights[:2]
            b_ih, b_hh = weights[2:] or (None, None)
            if self.cell == "lstm":
                bias = None if b_ih is None else b_ih + b_hh
                joined.append(Int8Linear(torch.cat([w_ih, w_hh], dim=1), bias))  # (4*hidden, in+hidden)
            else:
                inputs.append(Int8Linear(w_ih, b_ih))  # (3*hidden, in)
                recurrents.append(Int8Linear(w_hh, b_hh))  # (3*hidden, hidden)
        self.joined, self.inputs = nn.ModuleList(joined), nn.ModuleList(inputs)
        self.recurrents = nn.ModuleList(recurrents)

    def forward(self, x: torch.Tensor, hidden):
        """A whole sequence, as ``nn.LSTM``/``nn.GRU`` with batch_first: x (batch, steps, input),
        hidden (h, c) or h, each (layers, batch, hidden); one ``step`` per position."""
        states = hidden if isinstance(hidden, tuple) else (hidden,)
        outputs = []
        for t in range(x.size(1)):
            out, states = self.step(x[:, t], states)
            outputs.append(out)
        return torch.cat(outputs, 1), states if self.cell == "lstm" else states[0]

    def step(self, x: torch.Tensor, hidden: tuple[torch.Tensor, ...]):
        """x: (batch, input); hidden: each (layers, batch, hidden). Returns the top layer's output
        (batch, 1, hidden) and the new states, each (layers, batch, hidden)."""
        new_h, new_c = [], []
        for layer in range(self.layers):  # for decoding only: no dropout between layers
            h = hidden[0][layer]  # (batch, hidden)
            if self.cell == "lstm":
                joined = self.joined[layer]
                gates = joined.finish(*joined.product(torch.cat([x, h], dim=1), scratch=True))  # (batch, 4*hidden)
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * hidden[1][layer] + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                new_c.append(c)
            else:
                xr, xz, xn = self.inputs[layer](x).chunk(3, dim=1)  # each (batch, hidden)
                hr, hz, hn = self.recurrents[layer](h).chunk(3, dim=1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            new_h.append(h)
            x = h
        states = (torch.stack(new_h), torch.stack(new_c)) if self.cell == "lstm" else (torch.stack(new_h),)
        return x.unsqueeze(1), states


class Int8PackedRNN(nn.Module):
    """The encoder's ``nn.LSTM``/``nn.GRU`` over a packed sequence with int8 weights, per row; returns
    what the module it replaces returns. Activations are quantised per row (``Int8Linear``): the
    input product per source token, for all of a layer's tokens at once, the recurrent one per
    sentence at each step, so that a sentence's encoding does not depend on the others packed with
    it (torch's fused int8 RNN quantises each step's batch with one scale)."""

    def __init__(self, rnn: nn.LSTM | nn.GRU, reduce_range: bool | None = None):
        super().__init__()
        self.cell = "lstm" if isinstance(rnn, nn.LSTM) else "gru"
        self.layers, self.bidirectional, self.hidden_dim = rnn.num_layers, rnn.bidirectional, rnn.hidden_size
        inputs, recurrents = [], []
        for weights in rnn.all_weights:  # per layer, forward then reverse: [weight_ih, weight_hh, bias_ih, bias_hh]
            w_ih, w_hh = weights[:2]
            b_ih, b_hh = weights[2:] or (None, None)
            if self.cell == "lstm" and b_ih is not None:  # the LSTM adds both biases to its gates: once
                b_ih, b_hh = b_ih + b_hh, None
            inputs.append(Int8Linear(w_ih, b_ih, reduce_range))  # (gates*hidden, in)
            recurrents.append(Int8Linear(w_hh, b_hh, reduce_range))  # (gates*hidden, hidden)
        self.inputs, self.recurrents = nn.ModuleList(inputs), nn.ModuleList(recurrents)

    def forward(self, packed: PackedSequence):
        """packed: the embedded source, packed; returns the outputs, packed, and the final states
        (h, c) or h, each (layers * directions, batch, hidden), as ``nn.LSTM``/``nn.GRU`` started
        from zero states."""
        data, sizes = packed.data, packed.batch_sizes.tolist()  # data: (tokens, in), time-major
        directions = 2 if self.bidirectional else 1
        finals = []  # per layer and direction: h, or (h, c)
        for layer in range(self.layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                gates = self.inputs[index](data)  # (tokens, gates*hidden): every token's input product at once
                out, final = self._run(gates, sizes, self.recurrents[index], reverse=direction == 1)
                outputs.append(out)
                finals.append(final)
            data = torch.cat(outputs, dim=1) if directions == 2 else outputs[0]  # (tokens, directions*hidden)
        final = tuple(torch.stack(states) for states in zip(*finals))  # each (layers*directions, batch, hidden)
        if packed.unsorted_indices is not None:  # the states come in the packed (sorted) order
            final = tuple(x.index_select(1, packed.unsorted_indices) for x in final)
        out = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        return out, final if self.cell == "lstm" else final[0]

    def _run(self, gates: torch.Tensor, sizes: list[int], recurrent: Int8Linear, reverse: bool):
        """One direction of one layer over the packed input products ``gates`` (tokens, gates*hidden):
        the outputs (tokens, hidden), packed, and the final states, each (batch, hidden)."""
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        steps = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
        h = gates.new_zeros(sizes[0], self.hidden_dim)  # (batch, hidden): the sentences still running first
        c = torch.zeros_like(h) if self.cell == "lstm" else None
        final_h, final_c = torch.zeros_like(h), torch.zeros_like(h)
        outputs = []
        running = 0 if reverse else sizes[0]
        for t in steps:
            size = sizes[t]
            if size > running:  # backwards, shorter sentences join (at their last token) from zero states
                h = torch.cat([h[:running], h.new_zeros(size - running, self.hidden_dim)]) if running else h[:size]
                c = None if c is None else torch.cat([c[:running], c.new_zeros(size - running, self.hidden_dim)])
            elif size < running:  # forwards, the longest sentences go on and the others have ended
                final_h[size:running] = h[size:]
                if c is not None:
                    final_c[size:running] = c[size:]
                h = h[:size]
                c = None if c is None else c[:size]
            running = size
            x = gates[starts[t]:starts[t] + size]  # (size, gates*hidden)
            product, scale = recurrent.product(h)  # (size, gates*hidden), (size, 1)
            if self.cell == "lstm":
                i, f, g, o = torch.addcmul(x, product, scale).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                xr, xz, xn = x.chunk(3, dim=1)
                hr, hz, hn = recurrent.finish(product, scale).chunk(3, dim=1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                h = n + z * (h - n)
            outputs.append(h)
        final_h[:running] = h
        if c is not None:
            final_c[:running] = c
        outputs = outputs[::-1] if reverse else outputs
        return torch.cat(outputs), ((final_h, final_c) if self.cell == "lstm" else (final_h,))


def _int8_linear(layer: nn.Linear) -> nn.Module:
    """The layer in int8, but for one with a handful of outputs: its product is a pass over the
    input, which int8 would only lengthen by quantising it first."""
    return Int8Linear.from_linear(layer) if layer.out_features >= 16 else layer


def quantized_copy(model: nn.Module) -> nn.Module:
    """An int8 copy of a ``Seq2Seq`` for CPU decoding (see the module's docstring); the original
    is left as it is. Raises RuntimeError where torch lacks the int8 kernels."""
    if not int8_available():
        raise RuntimeError("int8 decoding needs PyTorch's x86 int8 kernels (fbgemm), which this build lacks; "
                           "decode without --int8")
    torch.backends.quantized.engine = "fbgemm"
    quantized = copy.deepcopy(model).float().cpu().eval()
    quantized.encoder.rnn = Int8PackedRNN(quantized.encoder.rnn)
    decoder = quantized.decoder
    decoder.rnn = Int8RNNStep(decoder.rnn)
    output = decoder.output  # tied or not; keeps its int8 weight unpacked for shortlists (``Decoder.restrict``)
    decoder.output = Int8Linear(output.weight, output.bias, keep_weight=True)
    decoder.replace_linears(_int8_linear)  # combine or readout, the attention's projections, the bridge
    return quantized
