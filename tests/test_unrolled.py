"""The hand-stepped RNN and the loop products give the values and gradients that plain autograd
gives, in full precision and under bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from translate.decoder import STEP_CELLS
from translate.unrolled import UnrolledRNN, loop_linear, loop_weight

from .test_model import CONFIGS, padded_batch, small_model


def grads(params):
    return [p.grad.clone() for p in params]


def test_loop_products_give_autograds_gradients():
    torch.manual_seed(0)
    a, b = torch.randn(6, 3, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    xs = [torch.randn(5, 7, requires_grad=True) for _ in range(4)]

    def run(linear):
        h, total = torch.zeros(5, 6), 0
        for t, x in enumerate(xs):
            h = torch.tanh(linear(torch.cat([x[:, :3] + h[:, :3], x[:, 3:]], -1)))
            if t != 2:  # one step's output reaches the loss only through the next step
                total = total + (h * (t + 1)).sum()
        total.backward()
        return grads([a, b, *xs])

    plain = run(lambda x: F.linear(x, torch.cat([a, b], 1)))
    for p in [a, b, *xs]:
        p.grad = None
    weight = loop_weight(a, b)
    looped = run(lambda x: loop_linear(x, weight))
    for got, want in zip(looped, plain):
        torch.testing.assert_close(got, want)
    assert weight.records == []  # used up by the backward pass


def test_a_loop_weight_unused_by_the_loss_gets_no_gradient():
    w = torch.randn(3, 2, requires_grad=True)
    other = torch.randn(2, requires_grad=True)
    loop_linear(torch.randn(4, 2), loop_weight(w))  # made, never used
    (other * 2).sum().backward()
    assert w.grad is None


@pytest.mark.parametrize("cell,layers", [("lstm", 1), ("lstm", 2), ("gru", 1), ("gru", 3)])
def test_unrolled_rnn_equals_the_module(cell, layers):
    torch.manual_seed(3)
    rnn = STEP_CELLS[cell](10, 8, num_layers=layers, batch_first=True)
    x = torch.randn(3, 5, 10, requires_grad=True)
    h0 = tuple(torch.randn(layers, 3, 8, requires_grad=True) for _ in range(2 if cell == "lstm" else 1))
    whole, final = rnn(x, h0 if cell == "lstm" else h0[0])
    final = final if isinstance(final, tuple) else (final,)
    (whole.square().sum() + sum(f.sum() for f in final)).backward()
    params = [*rnn.parameters(), x, *h0]
    want = grads(params)
    for p in params:
        p.grad = None

    unrolled, hidden, outputs = UnrolledRNN(rnn, x[..., :6]), h0, []
    for t in range(5):
        top, hidden = unrolled.step(t, x[:, t, 6:], hidden)
        outputs.append(top)
    steps = torch.stack(outputs, 1)
    torch.testing.assert_close(steps, whole, atol=1e-6, rtol=1e-5)
    (steps.square().sum() + sum(h.sum() for h in hidden)).backward()
    for got, expected in zip(grads(params), want):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


STEPPED = [c for c in CONFIGS if c[2] != "luong"]  # the decoders whose teacher-forced pass steps


@pytest.mark.parametrize("cell,attention,decoder,tie,layer_norm", STEPPED)
def test_the_stepped_teacher_forced_pass_has_the_gradients_of_decode_steps(cell, attention, decoder, tie,
                                                                           layer_norm):
    """Reference: the same loss through ``decode_step`` (the fused cells, plain autograd)."""
    model = small_model(cell, attention, decoder, tie, layer_norm)
    src, lengths, mask = padded_batch([6, 3, 5])
    tgt = torch.randint(4, 25, (3, 4), generator=torch.Generator().manual_seed(1))
    target = torch.randint(4, 25, (3, 4), generator=torch.Generator().manual_seed(2))

    def loss(logits):  # (batch, steps, vocab)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    loss(model(src, lengths, mask, tgt)).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    looped = grads(params)
    model.zero_grad(set_to_none=True)
    memory, state = model.encode(src, lengths, mask)
    steps = []
    for t in range(tgt.size(1)):
        logits, state, _ = model.decode_step(tgt[:, t], memory, state)
        steps.append(logits)
    loss(torch.stack(steps, 1)).backward()
    for p, got in zip(params, looped):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-4)
    assert len(params) == sum(1 for p in model.parameters() if p.grad is not None)


@pytest.mark.skipif(not hasattr(torch, "get_autocast_dtype"), reason="needs torch.get_autocast_dtype")
@pytest.mark.parametrize("decoder", ["luong-feed", "bahdanau"])
def test_under_bf16_autocast_the_gradients_stay_close(decoder):
    model = small_model("lstm", "bahdanau", decoder, tie=False, layers=1).train()
    src, lengths, mask = padded_batch([6, 3, 5])
    tgt = torch.randint(4, 25, (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        model(src, lengths, mask, tgt).float().square().mean().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    looped = grads(params)
    assert all(g.dtype == torch.float32 for g in looped)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks
    model(src, lengths, mask, tgt).square().mean().backward()  # full precision
    for p, got in zip(params, looped):
        assert (got - p.grad).norm() <= 0.05 * p.grad.norm() + 1e-6
