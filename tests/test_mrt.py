"""Minimum risk training (Shen et al., 2016), checked against its definition written out here:
the risk, Q over the candidates, the expected risk and its gradient, the sampled candidates and
their teacher-forced probabilities against plain decoding loops."""

import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF

from translate.config import load_config
from translate.errors import ConfigError
from translate.model import build_model
from translate.mrt import MinimumRisk, candidates, distinct, expected_risk, risks, sample, sequence_log_probs, texts
from translate.tokenizer import BOS, EOS, PAD

from .test_feeding import tiny_batch
from .test_model import DECODERS


def mrt_cfg(**values):
    return load_config(overrides={"train.objective": "mrt", **{f"train.{k}": v for k, v in values.items()}}).train


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_the_risk_of_the_reference_is_zero_and_grows_with_the_error(metric):
    references = ["The cat eats bread.", "And the dog.", "", "¿Qué?"]
    assert risks(references, references, metric) == [0.0] * 4
    worse = risks(["The cat eats.", "The dog.", "x", "What?"], references, metric)
    assert all(0.0 < r <= 1.0 for r in worse)
    scorer = BLEU(effective_order=True) if metric == "bleu" else CHRF()
    assert worse[0] == pytest.approx(1 - scorer.sentence_score("The cat eats.", [references[0]]).score / 100)
    assert risks(["cat bread"], ["The cat eats bread."], metric)[0] > worse[0]


def q_of(scores, valid, alpha):
    """Q(y|x) ∝ p(y|x) ** alpha over the valid candidates, written out."""
    top = scores.masked_fill(~valid, float("-inf")).max(-1, keepdim=True).values  # (for exp's range)
    weights = torch.exp(alpha * (scores - top)) * valid
    return weights / weights.sum(-1, keepdim=True)


def test_expected_risk_is_the_mean_risk_under_q():
    log_probs = torch.tensor([[-3.0, -1.0, -2.0], [-0.5, -4.0, -0.5]])
    risk = torch.tensor([[0.2, 0.9, 0.5], [0.0, 1.0, 0.3]])
    valid = torch.tensor([[True, True, True], [True, True, False]])  # the last one a duplicate
    for alpha in (0.005, 1.0):
        expected = (q_of(log_probs, valid, alpha) * risk).sum()
        assert expected_risk(log_probs, risk, valid, alpha) == pytest.approx(float(expected))


def test_one_sgd_step_moves_q_towards_the_lowest_risk_on_free_scores():
    """The toy model whose parameters are the candidates' log-probabilities: d loss / d s_c =
    alpha Q_c (r_c - mean risk), so the best candidate gains and the worst loses."""
    scores = torch.tensor([[-2.0, -1.0, -3.0, -1.5]], requires_grad=True)
    risk = torch.tensor([[0.4, 0.9, 0.1, 0.6]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    before = q_of(scores.detach(), valid, 1.0)
    expected_risk(scores, risk, valid, 1.0).backward()
    with torch.no_grad():
        after = q_of(scores - 0.5 * scores.grad, valid, 1.0)
    assert after[0, 2] > before[0, 2] and after[0, 1] < before[0, 1]


def test_one_sgd_step_moves_q_towards_the_lowest_risk_on_a_model(tiny_model, tokenizer):
    batch = tiny_batch(tokenizer)
    alpha = 0.05  # Q spread over the candidates, as the small alphas of Shen et al. spread it
    cfg = mrt_cfg(mrt_samples=4, mrt_reference=True, mrt_alpha=alpha)
    torch.manual_seed(3)
    memory, state = tiny_model.encode(batch.src, batch.src_lengths, batch.src_mask)
    tokens = candidates(tiny_model, batch, memory, state, cfg)  # held fixed from here on
    n = tokens.size(1)
    refs = [ref for ref in texts(tokenizer, batch.tgt_out) for _ in range(n)]
    risk = torch.tensor(risks(texts(tokenizer, tokens), refs, "chrf")).view(-1, n)
    valid = distinct(tokens)

    def q():
        memory, state = tiny_model.encode(batch.src, batch.src_lengths, batch.src_mask)
        return q_of(sequence_log_probs(tiny_model, memory, state, tokens), valid, alpha)

    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.05)
    before = q().detach()
    memory, state = tiny_model.encode(batch.src, batch.src_lengths, batch.src_mask)
    expected_risk(sequence_log_probs(tiny_model, memory, state, tokens), risk, valid, alpha).backward()
    optimizer.step()
    after = q().detach()
    # a step on the weights, not on Q itself: to first order the expected risk falls and the best
    # candidate gains; a candidate Q already holds near 0 may not visibly lose more
    checked = 0
    for row in range(risk.size(0)):
        ranked = [c for c in risk[row].argsort(stable=True).tolist() if valid[row, c]]
        best, worst = ranked[0], ranked[-1]
        if risk[row, best] == risk[row, worst]:
            continue  # every candidate as good: nothing to move
        assert after[row, best] > before[row, best], row
        assert (after[row] * risk[row]).sum() < (before[row] * risk[row]).sum(), row
        checked += 1
    assert checked


def test_a_single_candidate_equal_to_the_reference_gives_zero_loss(tiny_model, tokenizer):
    batch = tiny_batch(tokenizer)
    objective = MinimumRisk(tiny_model, mrt_cfg(mrt_samples=0, mrt_reference=True), tokenizer)
    loss, counts = objective(batch)
    assert loss.item() == 0.0 and counts.tolist() == [int((batch.tgt_out != PAD).sum()), 0, 0]
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in tiny_model.parameters())


def test_the_loss_is_the_same_for_the_same_seed(tiny_model, tokenizer):
    batch = tiny_batch(tokenizer)
    objective = MinimumRisk(tiny_model.train(), mrt_cfg(mrt_samples=3, mrt_greedy=True, mrt_reference=True), tokenizer)
    losses = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        losses.append(objective(batch)[0].item())
    assert losses[0] == losses[1] and losses[0] != losses[2]
    assert tiny_model.training  # sampling without dropout put it back


def test_candidates_are_samples_then_greedy_then_the_reference(tiny_model, tokenizer):
    batch = tiny_batch(tokenizer)
    memory, state = tiny_model.encode(batch.src, batch.src_lengths, batch.src_mask)
    torch.manual_seed(0)
    tokens = candidates(tiny_model, batch, memory, state, mrt_cfg(mrt_samples=2, mrt_greedy=True, mrt_reference=True))
    assert tokens.shape[:2] == (3, 4)
    width = batch.tgt_out.size(1)
    assert torch.equal(tokens[:, 3, :width], batch.tgt_out) and not tokens[:, 3, width:].any()
    for row in tokens.reshape(-1, tokens.size(-1)).tolist():  # EOS once, PAD after it, never PAD or BOS before
        end = row.index(EOS)
        assert PAD not in row[:end] and BOS not in row and set(row[end + 1:]) <= {PAD}
    limit = int(width * 1.5) + 5  # as long as 1.5 times the longest reference, plus 5, then EOS
    for b in range(3):  # the greedy candidate: a plain argmax loop
        prev, expected, s = torch.tensor([BOS]), [], state.select(torch.tensor([b]))
        m = memory.select(torch.tensor([b]))
        while not expected or expected[-1] != EOS:
            logits, s, _ = tiny_model.decode_step(prev, m, s)
            logits[:, [PAD, BOS]] = float("-inf")
            prev = logits.argmax(-1) if len(expected) < limit - 1 else torch.tensor([EOS])
            expected.append(int(prev))
        assert tokens[b, 2].tolist() == expected + [PAD] * (tokens.size(-1) - len(expected))


def test_sampling_follows_the_models_distribution():
    """One step, a fixed distribution: the drawn tokens' frequencies match it."""
    class Fixed(torch.nn.Module):
        def decode_step(self, prev, memory, state):
            logits = torch.log(torch.tensor([1e-9, 0.1, 1e-9, 0.6, 0.3])).expand(prev.size(0), 5)
            return logits, state, None
    torch.manual_seed(0)
    rows = 20000
    drawn = sample(Fixed(), None, None, torch.zeros(rows, dtype=torch.bool), 1)  # limit 1: EOS forced
    assert drawn.eq(EOS).all()
    drawn = sample(Fixed(), None, None, torch.zeros(rows, dtype=torch.bool), 2)[:, 0]
    share = torch.bincount(drawn, minlength=5).float() / rows
    torch.testing.assert_close(share, torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3]), atol=0.015, rtol=0)


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_sequence_log_probs_are_the_step_by_step_sums(tokenizer, decoder):
    kind, feeding_on = DECODERS[decoder]
    config = load_config(overrides={"model.embed_dim": 16, "model.hidden_dim": 32, "model.decoder": kind,
                                    "model.input_feeding": feeding_on, "model.init_uniform": 0})
    torch.manual_seed(0)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    batch = tiny_batch(tokenizer)
    memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    torch.manual_seed(1)
    tokens = candidates(model, batch, memory, state, mrt_cfg(mrt_samples=2, mrt_reference=True))
    got = sequence_log_probs(model, memory, state, tokens)
    for b in range(tokens.size(0)):
        for c in range(tokens.size(1)):
            row = tokens[b, c].tolist()
            row = row[: row.index(EOS) + 1]
            s, m, prev, total = state.select(torch.tensor([b])), memory.select(torch.tensor([b])), BOS, 0.0
            for token in row:
                logits, s, _ = model.decode_step(torch.tensor([prev]), m, s)
                total += logits.log_softmax(-1)[0, token].item()
                prev = token
            assert got[b, c].item() == pytest.approx(total, abs=1e-4)


def test_duplicates_count_once():
    tokens = torch.tensor([[[5, EOS, PAD], [5, EOS, 7], [6, EOS, PAD]], [[5, 6, EOS], [5, 6, EOS], [5, 6, EOS]]])
    assert distinct(tokens).tolist() == [[True, False, True], [True, False, False]]


@pytest.mark.parametrize("search", ["sample", "beam"])
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_mrt_trains_every_decoder(tokenizer, decoder, search):
    kind, feeding_on = DECODERS[decoder]
    config = load_config(overrides={"model.embed_dim": 16, "model.hidden_dim": 32, "model.decoder": kind,
                                    "model.input_feeding": feeding_on, "train.objective": "mrt",
                                    "train.mrt_greedy": True, "train.mrt_metric": "chrf", "train.mrt_search": search})
    torch.manual_seed(0)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).train()
    loss, _ = MinimumRisk(model, config.train, tokenizer)(tiny_batch(tokenizer))
    assert 0 < loss.item() <= 3  # three sources, each a mean risk in [0, 1]
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.any() for g in grads)


@pytest.mark.parametrize("values,message", [
    ({"mrt_samples": 0}, "at least one candidate"),
    ({"mrt_alpha": 0.0}, "mrt_alpha must be a positive"),
    ({"teacher_forcing": "linear"}, "no teacher-forcing schedule"),
    ({"tf_phase": 0.5}, "no teacher-forcing schedule"),
    ({"mrt_metric": "ter"}, "must be one of bleu, chrf"),
])
def test_bad_mrt_settings_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        mrt_cfg(**values)


def test_beam_candidates_are_the_n_best_of_beam_search(tiny_model, tokenizer):
    from translate.search import beam_search

    batch = tiny_batch(tokenizer)
    memory, state = tiny_model.encode(batch.src, batch.src_lengths, batch.src_mask)
    tokens = candidates(tiny_model, batch, memory, state, mrt_cfg(mrt_samples=3, mrt_search="beam"))
    limit = int(batch.tgt_out.size(1) * 1.5) + 5
    nbest = beam_search(tiny_model, memory, state, 3, torch.full((3,), limit), alpha=0.0, n_best=3)
    for b, hypotheses in enumerate(nbest):
        expected = [h.tokens[: limit - 1] + [EOS] for h in hypotheses]
        expected += [expected[0]] * (3 - len(expected))  # too few finished: the first again, counted once
        assert [row[: row.index(EOS) + 1] for row in tokens[b].tolist()] == expected
