import itertools

import pytest
import torch

from translate.attention import BahdanauAttention, LuongAttention
from translate.config import load_config
from translate.decoder import STEP_CELLS
from translate.encoder import Encoder
from translate.model import build_model


def padded_batch(lengths, vocab=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (len(lengths), max(lengths)), generator=gen)
    for row, n in enumerate(lengths):
        src[row, n:] = 0
    lengths = torch.tensor(lengths)
    return src, lengths, src != 0


@pytest.mark.parametrize("cell,bidirectional,layers", [("lstm", True, 1), ("gru", True, 2), ("lstm", False, 2)])
def test_packed_equals_unpacked(cell, bidirectional, layers):
    torch.manual_seed(0)
    encoder = Encoder(30, 8, 12, layers, bidirectional, cell).eval()
    src, lengths, _ = padded_batch([5, 2, 4])
    outputs, finals = encoder(src, lengths)
    for row, n in enumerate(lengths.tolist()):
        alone, alone_finals = encoder(src[row: row + 1, :n], lengths[row: row + 1])
        torch.testing.assert_close(outputs[row, :n], alone[0], atol=1e-6, rtol=1e-5)
        assert outputs[row, n:].abs().max() == 0 if n < src.size(1) else True
        for full, single in zip(finals, alone_finals):
            torch.testing.assert_close(full[:, row], single[:, 0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention,query_dim", [(BahdanauAttention(16, 12, 10), 16),
                                                 (LuongAttention(16, 12, general=True), 16),
                                                 (LuongAttention(12, 12, general=False), 12)])
def test_attention_sums_to_one_over_real_tokens(attention, query_dim):
    query = torch.randn(3, 4, query_dim)  # (batch, tgt_len, query_dim)
    memory = torch.randn(3, 6, 12)  # (batch, src_len, enc_dim)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    context, weights = attention(query, attention.project_keys(memory), memory, mask)
    assert weights.shape == (3, 4, 6) and context.shape == (3, 4, 12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4))
    assert (weights.masked_select(~mask.unsqueeze(1).expand_as(weights)) == 0).all()


def test_dot_attention_needs_equal_sizes():
    with pytest.raises(ValueError, match="equal query and key sizes"):
        LuongAttention(16, 12, general=False)


CONFIGS = list(itertools.product(["lstm", "gru"], ["bahdanau", "luong-general", "luong-dot"], [False, True],
                                 [True, False]))


def small_model(cell, attention, input_feeding, tie):
    overrides = {"model.cell": cell, "model.attention": attention, "model.input_feeding": str(input_feeding),
                 "model.tie_embeddings": str(tie), "model.embed_dim": "8", "model.hidden_dim": "16",
                 "model.layers": "2"}
    torch.manual_seed(0)
    return build_model(load_config(overrides=overrides).model, 30, 25).eval()


@pytest.mark.parametrize("cell,attention,input_feeding,tie", CONFIGS)
def test_sequence_pass_equals_step_by_step(cell, attention, input_feeding, tie):
    model = small_model(cell, attention, input_feeding, tie)
    src, lengths, mask = padded_batch([6, 3, 5])
    tgt = torch.randint(4, 25, (3, 4))
    logits = model(src, lengths, mask, tgt)  # (batch, tgt_len, vocab)
    memory, state = model.encode(src, lengths, mask)
    steps = []
    for t in range(tgt.size(1)):
        step_logits, state, weights = model.decode_step(tgt[:, t], memory, state)
        steps.append(step_logits)
        assert (weights[1, 3:] == 0).all()
    torch.testing.assert_close(torch.stack(steps, 1), logits, atol=1e-5, rtol=1e-4)
    if tie:
        assert model.decoder.output.weight is model.decoder.embed.weight


def test_decode_step_is_pure():
    torch.manual_seed(0)
    model = build_model(load_config(overrides={"model.hidden_dim": "16", "model.embed_dim": "8"}).model, 30, 30)
    model.eval()
    src, lengths, mask = padded_batch([4, 2])
    memory, state = model.encode(src, lengths, mask)
    prev = torch.tensor([5, 6])
    first = model.decode_step(prev, memory, state)[0]
    second = model.decode_step(prev, memory, state)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("cell,attention,input_feeding,tie", CONFIGS)
def test_memory_per_group_equals_memory_per_row(cell, attention, input_feeding, tie):
    # beam search keeps one memory entry per sentence for its whole beam of rows
    model = small_model(cell, attention, input_feeding, tie)
    src, lengths, mask = padded_batch([6, 3, 5])
    memory, state = model.encode(src, lengths, mask)
    rows = torch.arange(3).repeat_interleave(4)  # 4 rows per sentence
    per_row, state = memory.select(rows), state.select(rows)
    grouped_state = state
    for prev in torch.randint(4, 25, (3, 12)):
        logits, state, weights = model.decode_step(prev, per_row, state)
        grouped, grouped_state, grouped_weights = model.decode_step(prev, memory, grouped_state)
        torch.testing.assert_close(grouped, logits)
        torch.testing.assert_close(grouped_weights, weights)
        for a, b in zip(grouped_state.hidden, state.hidden):
            torch.testing.assert_close(a, b)
    assert (weights[4:8, 3:] == 0).all()  # the second sentence's rows never attend past its end


def test_additive_attention_in_chunks_equals_whole(monkeypatch):
    torch.manual_seed(0)
    attention = BahdanauAttention(12, 10, 8)
    query, memory = torch.randn(7, 3, 12), torch.randn(7, 5, 10)
    keys = attention.project_keys(memory)
    with torch.no_grad():
        whole = attention.score(query, keys)
        monkeypatch.setattr(BahdanauAttention, "CHUNK", 3 * 5 * 8 * 2)  # two batch rows a chunk
        chunked = attention.score(query, keys)
    torch.testing.assert_close(chunked, whole)
    assert chunked.shape == (7, 3, 5)


@pytest.mark.parametrize("cell,layers", [("lstm", 1), ("lstm", 3), ("gru", 2)])
def test_rnn_step_equals_the_whole_sequence_call(cell, layers):
    torch.manual_seed(5)
    rnn = STEP_CELLS[cell](6, 8, num_layers=layers, batch_first=True).eval()
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        whole, final = rnn(x)
        states = tuple(torch.zeros(layers, 3, 8) for _ in range(2 if cell == "lstm" else 1))
        steps = []
        for t in range(5):
            out, states = rnn.step(x[:, t], states)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-6, rtol=1e-5)
    final = final if isinstance(final, tuple) else (final,)
    for a, b in zip(states, final):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
