"""The searches over ``model.encode`` / ``model.decode_step``, against each other and against
plain reference implementations."""

import pytest
import torch

from translate.search import beam_search, greedy, length_penalty, max_lengths, top_candidates
from translate.tokenizer import BOS, EOS

from .conftest import SENTENCES, encode  # test_quantize imports them from here too


def search(model, memory, state, limits, beam, **options):
    return greedy(model, memory, state, limits) if beam == 1 else beam_search(model, memory, state, beam, limits,
                                                                                 **options)


def test_max_lengths():
    assert max_lengths(torch.tensor([0, 3, 7, 1000]), 2.0).tolist() == [10, 16, 24, 1024]
    assert max_lengths(torch.tensor([3]), 0.0, extra=0).tolist() == [1]  # EOS always fits


def test_beam_one_equals_greedy(search_model, tokenizer):
    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    by_greedy = greedy(model, memory, state, limits, return_attention=True)
    by_beam = beam_search(model, memory, state, 1, limits, alpha=0.0, return_attention=True)  # no length penalty
    for g, b in zip(by_greedy, by_beam):
        assert g[0].tokens == b[0].tokens
        assert g[0].score == pytest.approx(b[0].score, abs=1e-4)
        torch.testing.assert_close(g[0].attention, b[0].attention)


@pytest.mark.parametrize("beam", [1, 4])
def test_batch_equals_one_by_one(search_model, tokenizer, beam):
    # each sentence alone has no padding; together they pad to the longest, and finish at different steps
    model = search_model
    options = {} if beam == 1 else {"n_best": 3}
    together = search(model, *encode(model, tokenizer, SENTENCES), beam, **options)
    for sentence, hyps in zip(SENTENCES, together):
        alone = search(model, *encode(model, tokenizer, [sentence]), beam, **options)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=1e-4)


def test_n_best_sorted_and_distinct(search_model, tokenizer):
    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    results = beam_search(model, memory, state, 5, limits, n_best=5)
    for hyps in results:
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True) and len(hyps) >= 1
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)


def test_lengths_respect_limits(search_model, tokenizer):
    model = search_model
    memory, state, _ = encode(model, tokenizer, SENTENCES)
    limits = torch.full((len(SENTENCES),), 3)
    for hyps in greedy(model, memory, state, limits) + beam_search(model, memory, state, 3, limits, n_best=3):
        assert all(len(h.tokens) <= 2 for h in hyps)  # 3 counting EOS


def test_beam_not_worse_than_greedy_in_model_score(search_model, tokenizer):
    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    greedy_hyps = greedy(model, memory, state, limits)
    beam_hyps = beam_search(model, memory, state, 8, limits, alpha=0.0)
    for g, b in zip(greedy_hyps, beam_hyps):
        assert b[0].score >= g[0].score - 1e-4


def test_n_best_cannot_exceed_beam(search_model, tokenizer):
    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES[:1])
    with pytest.raises(ValueError, match="cannot exceed"):
        beam_search(model, memory, state, 2, limits, n_best=3)


def test_greedy_drops_finished_sentences_without_changing_results(search_model, tokenizer):
    # the batch shrinks as sentences end; every sentence must still get its own full result
    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    together = greedy(model, memory, state, limits)
    for i in range(len(SENTENCES)):
        rows = torch.tensor([i])
        alone = greedy(model, memory.select(rows), state.select(rows), limits[rows])[0][0]
        assert alone.tokens == together[i][0].tokens
        assert alone.score == pytest.approx(together[i][0].score, abs=1e-4)


@pytest.mark.parametrize("live,beams,vocab,n", [(7, 5, 300, 10), (3, 1, 50, 4), (4, 3, 2, 6), (2, 1, 3, 10),
                                                (5, 4, 8, 8)])
def testtop_candidates_equal_a_full_top_k(live, beams, vocab, n):
    gen = torch.Generator().manual_seed(live * 100 + vocab)
    candidates = torch.randn(live, beams, vocab, generator=gen)
    candidates[0, 1:] = float("-inf")  # beams that are out of the race
    candidates[1, :, vocab // 2:] = float("-inf")
    scores, beam, token = top_candidates(candidates, n)
    full = torch.cat([candidates.view(live, -1), torch.full((live, n), float("-inf"))], dim=1)
    torch.testing.assert_close(scores, full.topk(n, dim=1).values)
    assert ((token >= 0) & (token < vocab) & (beam >= 0) & (beam < beams)).all()
    finite = torch.isfinite(scores)
    picked = candidates[torch.arange(live).unsqueeze(1).expand(-1, n), beam, token]
    torch.testing.assert_close(picked[finite], scores[finite])
    pairs = (beam * vocab + token)[finite].tolist()
    per_row = [(beam[r] * vocab + token[r])[finite[r]].tolist() for r in range(live)]
    assert all(len(set(row)) == len(row) for row in per_row) and len(pairs) == sum(map(len, per_row))


def reference_beam_search(model, memory, state, beam, limit, alpha):
    """The same rules as beam_search, written plainly for one sentence (batch 1), hypothesis by
    hypothesis, with a full sort over every continuation."""
    alive = [([], 0.0, state)]
    finished = []
    for t in range(limit):
        expansions = []
        for tokens, score, hyp_state in alive:
            prev = torch.tensor([tokens[-1] if tokens else BOS])
            logits, next_state, _ = model.decode_step(prev, memory, hyp_state)
            logp = logits[0].float().log_softmax(-1)
            if t + 1 >= limit:
                logp = torch.where(torch.arange(logp.numel()) == EOS, logp, torch.full_like(logp, float("-inf")))
            for token, value in enumerate(logp.tolist()):
                expansions.append((score + value, tokens, token, next_state))
        expansions.sort(key=lambda e: -e[0])
        top = expansions[: 2 * beam]
        for score, tokens, token, _ in top[:beam]:
            if token == EOS and score > float("-inf") and len(finished) < beam:
                finished.append((tokens, score / length_penalty(t + 1, alpha)))
        alive = [(tokens + [token], score, s) for score, tokens, token, s in top if token != EOS][:beam]
        if len(finished) >= beam or t + 1 >= limit:
            break
    return max(finished, key=lambda f: f[1])


def test_beam_search_equals_a_plain_reference(search_model, tokenizer):
    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    results = beam_search(model, memory, state, 3, limits, alpha=0.6)
    for i, hyps in enumerate(results):
        rows = torch.tensor([i])
        tokens, score = reference_beam_search(model, memory.select(rows), state.select(rows), 3, int(limits[i]), 0.6)
        assert hyps[0].tokens == tokens
        assert hyps[0].score == pytest.approx(score, abs=1e-4)


def test_pad_and_bos_are_never_produced(search_model, tokenizer):
    from translate.tokenizer import PAD

    with torch.no_grad():
        search_model.decoder.output.bias[PAD] += 50.0  # the model now prefers PAD, then BOS, to anything
        search_model.decoder.output.bias[BOS] += 40.0
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    by_greedy = greedy(search_model, memory, state, limits)
    by_beam = beam_search(search_model, memory, state, 1, limits)
    assert [g[0].tokens for g in by_greedy] == [b[0].tokens for b in by_beam]
    for hyps in (by_greedy, beam_search(search_model, memory, state, 4, limits, n_best=4)):
        assert all(PAD not in h.tokens and BOS not in h.tokens for sentence in hyps for h in sentence)
