import itertools

import pytest
import torch

from translate.attention import BahdanauAttention, LuongAttention
from translate.config import Config, ConfigError, load_config
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


@pytest.mark.parametrize("cell,bidirectional,layers,layer_norm",
                         [("lstm", True, 1, False), ("gru", True, 2, False), ("lstm", False, 2, False),
                          ("lstm", True, 1, True)])
def test_packed_equals_unpacked(cell, bidirectional, layers, layer_norm):
    torch.manual_seed(0)
    encoder = Encoder(30, 8, 12, layers, bidirectional, cell, layer_norm=layer_norm).eval()
    if layer_norm:  # a trained bias, which padding must not take
        torch.nn.init.uniform_(encoder.norm.bias, 0.5, 1.5)
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


# cell x attention score x decoder (luong, luong with input feeding, bahdanau) x tied output x LayerNorm
DECODERS = {"luong": ("luong", False), "luong-feed": ("luong", True), "bahdanau": ("bahdanau", False)}
CONFIGS = list(itertools.product(["lstm", "gru"], ["bahdanau", "luong-general", "luong-dot"], list(DECODERS),
                                 [True, False], [False, True]))


def small_model(cell, attention, decoder, tie, layer_norm=False, layers=2):
    kind, feeding = DECODERS[decoder]
    overrides = {"model.cell": cell, "model.attention": attention, "model.decoder": kind,
                 "model.input_feeding": str(feeding), "model.tie_embeddings": str(tie), "model.layer_norm": layer_norm,
                 "model.embed_dim": "8", "model.hidden_dim": "16", "model.layers": str(layers)}
    torch.manual_seed(0)
    model = build_model(load_config(overrides=overrides).model, 30, 25).eval()
    if layer_norm:  # away from LayerNorm's identity start, so that a misplaced norm shows
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("cell,attention,decoder,tie,layer_norm", CONFIGS)
def test_sequence_pass_equals_step_by_step(cell, attention, decoder, tie, layer_norm):
    model = small_model(cell, attention, decoder, tie, layer_norm)
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


@pytest.mark.parametrize("cell,attention,decoder,tie,layer_norm", CONFIGS)
def test_memory_per_group_equals_memory_per_row(cell, attention, decoder, tie, layer_norm):
    # beam search keeps one memory entry per sentence for its whole beam of rows
    model = small_model(cell, attention, decoder, tie, layer_norm)
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
    keys, query = attention.project_keys(memory), attention.project_query(query)
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


def test_bahdanau_decoder_follows_the_papers_equations():
    """Bahdanau et al. (2015), written plainly for one sentence at a time: e_tj = v . tanh(W s_{t-1} +
    U h_j); a_t = softmax(e_t); c_t = sum_j a_tj h_j; s_t = LSTM([E y_{t-1}; c_t], s_{t-1});
    readout r_t = tanh(W_r [s_t; c_t; E y_{t-1}]); logits = W_o r_t + b_o."""
    model = small_model("lstm", "bahdanau", "bahdanau", tie=False, layers=1)
    dec, att = model.decoder, model.decoder.attention
    src, lengths, mask = padded_batch([6, 3])
    tgt = torch.randint(4, 25, (2, 5))
    with torch.no_grad():
        logits = model(src, lengths, mask, tgt)
        states, finals = model.encoder(src, lengths)
        for b in range(2):
            n = int(lengths[b])
            h_j = states[b, :n]  # (n, enc_dim)
            s, cell = (torch.tanh(layer(f[0, b])) for layer, f in zip(dec.bridge, finals))
            for t in range(tgt.size(1)):
                e = att.v.weight[0] @ torch.tanh(att.query_layer.weight @ s + h_j @ att.key_layer.weight.T).T
                a = torch.softmax(e, 0)  # (n,)
                c = a @ h_j
                y = dec.embed.weight[tgt[b, t]]
                x = torch.cat([y, c])
                gates = dec.rnn.weight_ih_l0 @ x + dec.rnn.bias_ih_l0 + dec.rnn.weight_hh_l0 @ s + dec.rnn.bias_hh_l0
                i, f, g, o = gates.chunk(4)
                cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
                s = torch.sigmoid(o) * torch.tanh(cell)
                r = torch.tanh(dec.readout.weight @ torch.cat([s, c, y]) + dec.readout.bias)
                expected = dec.output.weight @ r + dec.output.bias
                torch.testing.assert_close(logits[b, t], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell,attention,decoder,tie", [c[:4] for c in CONFIGS if not c[4]])
def test_every_combination_trains_a_step_and_decodes(cell, attention, decoder, tie):
    from translate.search import greedy, max_lengths

    model = small_model(cell, attention, decoder, tie).train()
    src, lengths, mask = padded_batch([6, 3, 5])
    tgt = torch.randint(4, 25, (3, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(model(src, lengths, mask, tgt[:, :-1]).transpose(1, 2), tgt[:, 1:])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    optimizer.step()
    model.eval()
    memory, state = model.encode(src, lengths, mask)
    hyps = greedy(model, memory, state, max_lengths(lengths, 1.0))
    assert len(hyps) == 3 and all(len(h[0].tokens) <= 16 for h in hyps)


def test_a_checkpoint_from_before_the_bahdanau_decoder_loads(tmp_path):
    """Checkpoints of earlier versions have no model.decoder or model.layer_norm: they are Luong."""
    from translate.checkpoint import restore
    from translate.tokenizer import Tokenizer

    from .conftest import make_pairs

    pairs = make_pairs(50)
    tokenizer = Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=60)
    config = load_config(overrides={"model.embed_dim": "8", "model.hidden_dim": "16"})
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    old = config.to_dict()
    del old["model"]["decoder"], old["model"]["layer_norm"]
    payload = {"config": old, "tokenizer": {"src": tokenizer.src_proto, "tgt": tokenizer.tgt_proto},
               "model": model.state_dict()}
    restored, _, restored_config = restore(payload)
    assert restored_config.model.decoder == "luong" and not restored_config.model.layer_norm
    assert Config.from_dict(old) == config
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def test_input_feeding_belongs_to_the_luong_decoder():
    from translate.errors import ConfigError

    with pytest.raises(ConfigError, match="model.input_feeding belongs to the Luong decoder"):
        load_config(overrides={"model.decoder": "bahdanau", "model.input_feeding": "true"})


def test_choosing_the_bahdanau_decoder_alone_turns_input_feeding_off(tmp_path):
    """Input feeding is on by default, so picking the other decoder must not need a second key."""
    assert Config().model.input_feeding and Config().model.decoder == "luong"
    assert not load_config(overrides={"model.decoder": "bahdanau"}).model.input_feeding
    written = tmp_path / "c.yaml"
    written.write_text("model:\n  decoder: bahdanau\n", encoding="utf-8")
    assert not load_config(written).model.input_feeding
    # the written-out default says input_feeding: true, and --set decoder=bahdanau still works
    assert not load_config("configs/default.yaml", {"model.decoder": "bahdanau"}).model.input_feeding
    assert load_config(overrides={"model.decoder": "luong"}).model.input_feeding
    # a checkpoint's saved config always names both keys, so it is rebuilt as saved
    saved = Config().to_dict()
    saved["model"].update(decoder="bahdanau", input_feeding=False)
    assert Config.from_dict(saved).model.decoder == "bahdanau"


def test_the_luong_decoder_makes_its_layers_in_the_order_of_earlier_versions():
    """Parameters are initialised in the order they are made, so this order is what lets a seed
    give the same model as before (and it is the order of a checkpoint's weights)."""
    model = small_model("lstm", "bahdanau", "luong", tie=False, layers=1)
    layers = list(dict.fromkeys(name.split(".")[0] for name in model.decoder.state_dict()))
    assert layers == ["embed", "rnn", "attention", "combine", "output", "bridge"]


def test_the_bahdanau_decoder_names_its_readout_where_the_luong_decoder_has_its_combine():
    """The same order and the same names as before: a checkpoint's keys do not change."""
    model = small_model("lstm", "bahdanau", "bahdanau", tie=False, layers=1)
    layers = list(dict.fromkeys(name.split(".")[0] for name in model.decoder.state_dict()))
    assert layers == ["embed", "rnn", "attention", "readout", "output", "bridge"]


@pytest.mark.parametrize("tie", [False, True])
def test_the_output_layers_rows_are_the_whole_layers_columns(tie):
    model = small_model("gru", "bahdanau", "luong", tie=tie)
    ids = torch.tensor([0, 1, 2, 3, 7, 19, 24])
    x = torch.randn(5, model.decoder.out_dim)
    torch.testing.assert_close(model.decoder.output.rows(ids)(x), model.decoder.output(x)[:, ids])
    vocab = model.output_vocab(ids)
    assert torch.equal(vocab.ids, ids) and torch.equal(vocab.output(x), model.decoder.output.rows(ids)(x))


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_without_the_bridge_the_decoder_starts_from_zeros(decoder):
    kind, feeding = DECODERS[decoder]
    config = load_config(overrides={"model.bridge": False, "model.decoder": kind, "model.input_feeding": feeding,
                                    "model.embed_dim": 8, "model.hidden_dim": 16})
    torch.manual_seed(0)
    model = build_model(config.model, 30, 25).eval()
    assert model.decoder.bridge is None
    src, lengths, mask = padded_batch([6, 3])
    memory, state = model.encode(src, lengths, mask)
    assert all((h == 0).all() for h in state.hidden) and len(state.hidden) == 2
    tgt = torch.randint(4, 25, (2, 5))
    logits = model(src, lengths, mask, tgt)
    steps = []
    for t in range(5):
        step, state, _ = model.decode_step(tgt[:, t], memory, state)
        steps.append(step)
    torch.testing.assert_close(torch.stack(steps, 1), logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_uniform_initialisation_bounds_every_weight_and_keeps_padding_zero(tie):
    overrides = {"model.embed_dim": 8, "model.hidden_dim": 16, "model.tie_embeddings": tie}
    torch.manual_seed(0)
    pytorch = build_model(load_config(overrides={**overrides, "model.init_uniform": 0}).model, 30, 25)
    assert pytorch.encoder.embed.weight.abs().max() > 1  # PyTorch's unit-variance embeddings
    config = load_config(overrides={**overrides, "model.init_uniform": 0.05}).model
    torch.manual_seed(0)
    model = build_model(config, 30, 25)
    for name, parameter in model.named_parameters():
        assert parameter.abs().max() <= 0.05, name
        assert parameter.std() > 0.01, name  # drawn, not zero
    assert (model.encoder.embed.weight[0] == 0).all() and (model.decoder.embed.weight[0] == 0).all()
    torch.manual_seed(0)
    again = build_model(config, 30, 25)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)  # the seed decides it


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_a_negative_or_non_finite_initialisation_bound_is_an_error(value):
    with pytest.raises(ConfigError, match="model.init_uniform"):
        load_config(overrides={"model.init_uniform": value})
