import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from translate.attention import BahdanauAttention
from translate.config import load_config
from translate.model import build_model
from translate.quantize import Int8Linear, Int8PackedRNN, Int8RNNStep, int8_available, quantized_copy
from translate.search import beam_search, greedy

from .test_search import SENTENCES, encode

pytestmark = pytest.mark.skipif(not int8_available(), reason="this torch build has no fbgemm int8 kernels")


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).detach().norm() / exact.detach().norm())


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    layer = nn.Linear(64, 300)
    x = torch.randn(2, 7, 64)  # leading dims are kept
    exact = layer(x)
    approx = Int8Linear.from_linear(layer)(x)
    assert approx.shape == exact.shape
    assert relative_error(approx, exact) < 0.02
    # and it is really quantised: not bit-equal to the float layer
    assert not torch.equal(approx, exact)


def test_int8_activations_keep_8_bits_only_where_products_accumulate_in_int32(monkeypatch):
    import translate.quantize as quantize
    from translate.runtime import cpu_has_vnni

    layer = nn.Linear(256, 512)
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: False)
    assert Int8Linear.from_linear(layer).reduce_range  # 7 bits: the int16 sums cannot saturate
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: True)
    assert not Int8Linear.from_linear(layer).reduce_range
    if not cpu_has_vnni():
        return  # 8-bit activations are not safe to run here
    # every u8 activation 255 and every weight 127: pairs of products past int16 would saturate
    ones = nn.Linear(512, 16, bias=False)
    nn.init.ones_(ones.weight)
    x = torch.ones(4, 512)
    x[:, 0] = 0.0  # the range [0, 1]: 1.0 quantises to 255
    full = Int8Linear(ones.weight, None, reduce_range=False)(x)
    assert torch.allclose(full, ones(x), rtol=1e-4)
    torch.manual_seed(3)
    x = torch.randn(64, 256)
    exact = layer(x)
    reduced = Int8Linear(layer.weight, layer.bias, reduce_range=True)(x)
    assert relative_error(Int8Linear(layer.weight, layer.bias, reduce_range=False)(x), exact) < \
        relative_error(reduced, exact)


def per_row_reference(layer: nn.Linear, x: torch.Tensor, levels: int) -> torch.Tensor:
    """int8 weights per output row and each input row rounded to ``levels`` steps of its own largest magnitude."""
    w_scale = layer.weight.abs().amax(1) / 127  # (out,)
    weight = torch.round(layer.weight / w_scale[:, None]) * w_scale[:, None]
    x_scale = x.abs().amax(1, keepdim=True) / levels  # (rows, 1)
    return (torch.round(x / x_scale) * x_scale) @ weight.T + layer.bias


@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_linear_quantises_each_row_alone(reduce_range):
    """Each row takes a scale of its own: its output is the same alone and with any other rows, and a
    small row beside a large one keeps its precision (a scale over the batch would round it to nothing)."""
    torch.manual_seed(6)
    layer = nn.Linear(48, 40)
    x = torch.randn(6, 48) * torch.tensor([1e-3, 1.0, 1e3, 0.0, 5.0, 1e-2])[:, None]  # row 3: zero, as padding
    int8 = Int8Linear(layer.weight, layer.bias, reduce_range=reduce_range)
    with torch.no_grad():
        batched, exact = int8(x), layer(x)
        reference = per_row_reference(layer, x, 63 if reduce_range else 127)
    for row in range(6):
        assert torch.equal(int8(x[row:row + 1]), batched[row:row + 1]), row
        assert torch.equal(int8(x[[5, row, 2]])[1], batched[row]), row
        if row != 3:
            assert relative_error(batched[row] - layer.bias, exact[row] - layer.bias) < (0.05 if reduce_range else 0.02)
            assert relative_error(batched[row], reference[row]) < 1e-3, row
    assert torch.equal(batched[3], layer.bias.detach())


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_int8_rnn_step_follows_the_float_rnn(cell):
    torch.manual_seed(1)
    rnn = cell(24, 32, num_layers=2, batch_first=True)
    step = Int8RNNStep(rnn)
    x = torch.randn(5, 24)
    states = (torch.randn(2, 5, 32),) + ((torch.randn(2, 5, 32),) if cell is nn.LSTM else ())
    hidden = states if cell is nn.LSTM else states[0]
    with torch.no_grad():
        exact_out, exact_states = rnn(x.unsqueeze(1), hidden)
        approx_out, approx_states = step.step(x, states)
    exact_states = exact_states if isinstance(exact_states, tuple) else (exact_states,)
    assert approx_out.shape == exact_out.shape == (5, 1, 32)
    assert relative_error(approx_out, exact_out) < 0.03
    for approx, exact in zip(approx_states, exact_states):
        assert approx.shape == exact.shape and relative_error(approx, exact) < 0.03


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_int8_rnn_over_a_sequence_follows_the_float_rnn(cell):
    torch.manual_seed(2)
    rnn = cell(24, 32, num_layers=2, batch_first=True)
    x = torch.randn(5, 7, 24)
    with torch.no_grad():
        exact_out, exact_states = rnn(x)
        zeros = torch.zeros(2, 5, 32)
        approx_out, approx_states = Int8RNNStep(rnn)(x, (zeros, zeros) if cell is nn.LSTM else zeros)
    assert approx_out.shape == exact_out.shape == (5, 7, 32)
    assert relative_error(approx_out, exact_out) < 0.03
    assert type(approx_states) is type(exact_states)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_int8_packed_rnn_follows_the_float_rnn(cell, bidirectional):
    torch.manual_seed(5)
    rnn = cell(24, 32, num_layers=2, batch_first=True, bidirectional=bidirectional).eval()
    x = torch.randn(5, 7, 24)
    lengths = torch.tensor([3, 7, 1, 5, 7])  # unsorted: the final states must come back in batch order
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        exact_out, exact_final = rnn(packed)
        approx_out, approx_final = Int8PackedRNN(rnn)(packed)
    assert torch.equal(approx_out.batch_sizes, exact_out.batch_sizes)
    assert torch.equal(approx_out.unsorted_indices, exact_out.unsorted_indices)
    assert relative_error(approx_out.data, exact_out.data) < 0.03
    assert not torch.equal(approx_out.data, exact_out.data)  # really quantised
    assert type(approx_final) is type(exact_final)
    for approx, exact in zip(*((f,) if cell is nn.GRU else f for f in (approx_final, exact_final))):
        assert approx.shape == exact.shape == (2 * (2 if bidirectional else 1), 5, 32)
        assert relative_error(approx, exact) < 0.03


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_int8_packed_rnn_encodes_each_sentence_as_alone(cell):
    """A sentence's outputs and final states do not depend on the sentences packed with it."""
    torch.manual_seed(7)
    rnn = cell(24, 32, num_layers=2, batch_first=True, bidirectional=True).eval()
    x = torch.randn(4, 6, 24) * torch.tensor([0.1, 3.0, 1.0, 10.0])[:, None, None]
    lengths = torch.tensor([4, 6, 1, 3])
    int8 = Int8PackedRNN(rnn)

    def run(rows):
        packed = pack_padded_sequence(x[rows], lengths[rows], batch_first=True, enforce_sorted=False)
        with torch.no_grad():
            out, final = int8(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=6)
        return out, final if cell is nn.LSTM else (final,)

    out, finals = run([0, 1, 2, 3])
    for row in range(4):
        alone, alone_finals = run([row])
        assert torch.equal(alone[0], out[row]), row
        for state, state_alone in zip(finals, alone_finals):
            assert torch.equal(state_alone[:, 0], state[:, row]), row


@pytest.fixture(params=[("lstm", "bahdanau", "tied"), ("gru", "luong-general", "feed"),
                        ("lstm", "bahdanau", "bahdanau-decoder"), ("gru", "luong-dot", "bahdanau-decoder")],
                ids="-".join)
def pair(request, tokenizer):
    cell, attention, extra = request.param
    torch.manual_seed(4)
    config = load_config(overrides={"model.cell": cell, "model.attention": attention,
                                    "model.decoder": "bahdanau" if extra == "bahdanau-decoder" else "luong",
                                    "model.input_feeding": extra == "feed", "model.tie_embeddings": extra == "tied",
                                    "model.embed_dim": 32, "model.hidden_dim": 64, "model.dropout": 0.0})
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    with torch.no_grad():
        model.decoder.output.bias.normal_(0, 2)
    return model, quantized_copy(model)


def test_int8_copy_decodes_like_the_float_model(pair, tokenizer):
    model, small = pair
    memory, state, _ = encode(model, tokenizer, SENTENCES)
    small_memory, small_state, _ = encode(small, tokenizer, SENTENCES)
    prev = torch.tensor([5, 9, 11, 7, 3])
    with torch.no_grad():
        for _ in range(3):  # a few steps, so the quantised state is fed back
            exact, state, exact_weights = model.decode_step(prev, memory, state)
            approx, small_state, approx_weights = small.decode_step(prev, small_memory, small_state)
            assert relative_error(approx, exact) < 0.05
            assert (approx_weights - exact_weights).abs().max() < 0.05
            prev = exact.argmax(-1)
    assert model.decoder.output.weight.dtype == torch.float32  # the float model is untouched


def test_int8_copy_keeps_the_layers_names_and_gives_shortlist_rows(pair):
    """The int8 layers sit under the float layers' names; its output layer's rows, like the float
    one's (``decoder.OutputLayer``), are exactly those columns of the whole layer."""
    model, small = pair
    int8 = {name for name, module in small.named_modules()
            if isinstance(module, (Int8Linear, Int8RNNStep)) and not name.startswith(("decoder.rnn.", "encoder.rnn."))}
    floats = {name for name, module in model.named_modules()}
    assert int8 <= floats and "decoder.output" in int8 and "decoder.rnn" in int8
    assert {"decoder.combine", "decoder.readout"} & int8
    assert "decoder.attention.key_layer" in int8 or model.decoder.attention.key_layer is None  # dot attention
    ids = torch.tensor([0, 1, 2, 3, 8, 30, 41])
    x = torch.randn(6, small.decoder.out_dim)
    with torch.no_grad():
        assert torch.equal(small.decoder.output.rows(ids)(x), small.decoder.output(x)[:, ids])
        assert torch.equal(small.output_vocab(ids).output(x), small.decoder.output(x)[:, ids])


def test_int8_beam_one_equals_int8_greedy(pair, tokenizer):
    _, small = pair
    memory, state, limits = encode(small, tokenizer, SENTENCES)
    by_greedy = greedy(small, memory, state, limits)
    by_beam = beam_search(small, memory, state, 1, limits)
    assert [g[0].tokens for g in by_greedy] == [b[0].tokens for b in by_beam]


def test_sigmoid_form_of_additive_attention_equals_tanh_form():
    torch.manual_seed(2)
    attention = BahdanauAttention(16, 12, 10)
    query, memory = torch.randn(3, 4, 16), torch.randn(3, 6, 12)
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    _, weights = attention(query, attention.project_keys(memory), memory, mask)
    # Bahdanau et al. (2015) as written: v . tanh(W_q q + W_k k)
    keys = attention.key_layer(memory).unsqueeze(1)  # (batch, 1, src_len, attn)
    q = attention.query_layer(query).unsqueeze(2)  # (batch, tgt_len, 1, attn)
    scores = attention.v(torch.tanh(q + keys)).squeeze(-1).masked_fill(~mask.unsqueeze(1), float("-inf"))
    torch.testing.assert_close(weights, scores.softmax(-1), atol=1e-6, rtol=1e-5)
