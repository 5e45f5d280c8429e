"""The searches over ``model.encode`` / ``model.decode_step``, against each other and against
plain reference implementations."""

import math

import pytest
import torch

from translate.decoder import DecoderState, Memory, OutputVocab
from translate.search import (
    Beams,
    Continuations,
    Finished,
    advance,
    beam_search,
    beam_step,
    best_continuations,
    coverage_penalty,
    drop_done,
    finish,
    greedy,
    length_penalty,
    max_lengths,
    repeat_bans,
    start_beams,
    step_bounds,
    step_candidates,
    survivors,
    top_candidates,
)
from translate.tokenizer import BOS, EOS, PAD, SPECIAL, UNK

from .conftest import SENTENCES, encode  # test_quantize imports them from here too


def search(model, memory, state, limits, beam, no_repeat_ngram=0, vocab=None, prefix=None, **options):
    if beam == 1:
        return greedy(model, memory, state, limits, vocab=vocab, no_repeat_ngram=no_repeat_ngram, prefix=prefix)
    return beam_search(model, memory, state, beam, limits, vocab=vocab, no_repeat_ngram=no_repeat_ngram,
                       prefix=prefix, **options)


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


def repeats(tokens, n) -> bool:
    """Whether ``tokens`` holds some n-gram twice."""
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) < len(grams)


def plain_coverage_penalty(attention_rows, real, beta):
    """Wu et al. (2016), eq. 14, position by position: ``attention_rows`` one list a step."""
    total = 0.0
    for i in range(real):
        covered = sum(row[i] for row in attention_rows)
        total += math.log(min(max(covered, 1e-6), 1.0))
    return beta * total


def reference_beam_search(model, memory, state, beam, limit, alpha, no_repeat_ngram=0, coverage=0.0, prefix=()):
    """The same rules as beam_search, written plainly for one sentence (batch 1), hypothesis by
    hypothesis, with a full sort over every continuation; a continuation that would hold an
    n-gram of ``no_repeat_ngram`` pieces twice is impossible; a finished hypothesis gains the
    coverage penalty of weight ``coverage`` over the attention of all its steps; at step t below
    len(``prefix``) the one possible continuation is prefix[t], with its log-probability."""
    real = int(memory.mask.sum())
    alive = [([], 0.0, state, [])]
    finished = []
    for t in range(limit):
        expansions = []
        for tokens, score, hyp_state, seen in alive:
            prev = torch.tensor([tokens[-1] if tokens else BOS])
            logits, next_state, weights = model.decode_step(prev, memory, hyp_state)
            attended = seen + [weights[0].float().tolist()]
            logp = logits[0].float().log_softmax(-1)
            if t < len(prefix):  # forced, whatever a ban or the limit would say
                forced = torch.full_like(logp, float("-inf"))
                forced[prefix[t]] = logp[prefix[t]]
                expansions += [(score + value, tokens, token, next_state, attended)
                               for token, value in enumerate(forced.tolist())]
                continue
            if t + 1 >= limit:
                logp = torch.where(torch.arange(logp.numel()) == EOS, logp, torch.full_like(logp, float("-inf")))
            for token, value in enumerate(logp.tolist()):
                if token in (PAD, BOS) or no_repeat_ngram and repeats(tokens + [token], no_repeat_ngram):
                    value = float("-inf")  # never an output, as in beam_search
                expansions.append((score + value, tokens, token, next_state, attended))
        expansions.sort(key=lambda e: -e[0])
        top = expansions[: 2 * beam]
        for score, tokens, token, _, attended in top[:beam]:
            if token == EOS and score > float("-inf") and len(finished) < beam:
                penalty = plain_coverage_penalty(attended, real, coverage) if coverage else 0.0
                finished.append((tokens, score / length_penalty(t + 1, alpha) + penalty))
        alive = [(tokens + [token], score, s, a) for score, tokens, token, s, a in top if token != EOS][:beam]
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


# ---------------------------------------------------------------- a beam-search step's parts, against plain versions

def random_beams(gen, sent, beams, t, src_len=5, hidden=4, soonest=99) -> Beams:
    """Beams of the live sentences ``sent`` with random tokens, scores, attention and states."""
    live, rows = len(sent), len(sent) * beams
    memory = Memory(torch.randn(live, src_len, 3, generator=gen), torch.randn(live, src_len, 2, generator=gen),
                    torch.ones(live, src_len, dtype=torch.bool))
    state = DecoderState((torch.randn(2, rows, hidden, generator=gen), torch.randn(2, rows, hidden, generator=gen)),
                         torch.randn(rows, hidden, generator=gen))
    return Beams(torch.tensor(sent), torch.randn(live, beams, generator=gen),
                 torch.randint(SPECIAL, 50, (rows, t), generator=gen),
                 torch.randint(SPECIAL, 50, (rows,), generator=gen), memory, state,
                 torch.rand(rows, t, src_len, generator=gen), soonest)


def random_continuations(gen, live, beams, n, eos_every=3) -> Continuations:
    """n continuations per sentence, best first, each of one of its beams; about one in ``eos_every`` adds EOS."""
    scores = torch.randn(live, n, generator=gen).sort(dim=1, descending=True).values
    rows = torch.arange(live).unsqueeze(1) * beams + torch.randint(0, beams, (live, n), generator=gen)
    tokens = torch.randint(SPECIAL, 50, (live, n), generator=gen)
    tokens[torch.randint(0, eos_every, (live, n), generator=gen) == 0] = EOS
    return Continuations(scores, rows, tokens, tokens == EOS)


def test_start_beams_and_step_bounds_against_plain_loops():
    gen = torch.Generator().manual_seed(0)
    max_lens, min_lens = torch.tensor([5, 9, 4, 6]), torch.tensor([2, 3, 7, 1])
    memory = Memory(torch.randn(4, 5, 3, generator=gen), torch.randn(4, 5, 2, generator=gen),
                    torch.ones(4, 5, dtype=torch.bool))
    start = start_beams(memory, None, max_lens, return_attention=True)
    assert start.sent.tolist() == [0, 1, 2, 3] and start.scores.tolist() == [[0.0]] * 4 and start.soonest == 4
    assert start.prev.tolist() == [BOS] * 4 and start.seqs.shape == (4, 0) and start.history.shape == (4, 0, 5)
    assert start_beams(memory, None, max_lens, return_attention=False).history is None
    sent, beams_per = [0, 2, 3], 2
    beams = random_beams(gen, sent, beams_per, 0, soonest=int(max_lens[sent].min()))
    for t in range(10):
        early, force = step_bounds(t, beams, max_lens, min_lens)
        plain_early = [t + 1 < int(min_lens[s]) for s in sent for _ in range(beams_per)]
        plain_force = [t + 1 >= int(max_lens[s]) for s in sent for _ in range(beams_per)]
        assert early.tolist() == plain_early
        assert force.tolist() == plain_force if any(plain_force) else force is None
        assert step_bounds(t, beams, max_lens, None)[0] is None


def plain_step_candidates(logits, scores, early, force):
    """Per row: log-softmax by hand, PAD and BOS never, EOS only when allowed, plus the hypothesis' score."""
    beams = len(scores[0])
    out = []
    for row, values in enumerate(logits):
        lse = math.log(sum(math.exp(v) for v in values))
        logp = [v - lse for v in values]
        for token in range(len(logp)):
            never = token in (PAD, BOS) or (token == EOS and early[row]) or (token != EOS and force[row])
            logp[token] = -math.inf if never else logp[token]
        out.append([v + scores[row // beams][row % beams] for v in logp])
    return out


@pytest.mark.parametrize("bounds", [True, False])
def test_step_candidates_against_a_plain_loop(bounds):
    gen = torch.Generator().manual_seed(1)
    live, beams, columns = 3, 2, 9
    logits = torch.randn(live * beams, columns, generator=gen) * 3
    scores = torch.randn(live, beams, generator=gen)
    scores[1, 1] = -math.inf  # a beam out of the race
    early = torch.tensor([True, False, False, True, False, False]) if bounds else None
    force = torch.tensor([False, False, True, True, False, False]) if bounds else None
    got = step_candidates(logits.clone(), scores, early, force)
    plain = plain_step_candidates(logits.tolist(), scores.tolist(), early.tolist() if bounds else [False] * 6,
                                  force.tolist() if bounds else [False] * 6)
    torch.testing.assert_close(got, torch.tensor(plain).view(live, beams, columns))


@pytest.mark.parametrize("shortlist", [False, True])
def test_best_continuations_against_a_brute_force_loop(shortlist):
    gen = torch.Generator().manual_seed(2)
    live, beams, columns, n = 4, 3, 11, 6
    candidates = torch.randn(live, beams, columns, generator=gen)
    candidates[0, :, EOS] += 5.0  # EOS among the best, from every beam
    candidates[2, 1:] = -math.inf  # one beam alone
    candidates[3, :, 2:] = -math.inf  # fewer real continuations (6 - 2) than n
    ids = torch.tensor([PAD, UNK, BOS, 7, 8, 9, EOS, 20, 21, 30, 40]) if shortlist else None
    vocab = OutputVocab(ids, None) if shortlist else None
    top = best_continuations(candidates, n, vocab)
    for s in range(live):
        plain = sorted(((candidates[s, b, c].item(), s * beams + b, c) for b in range(beams) for c in range(columns)
                        if math.isfinite(candidates[s, b, c].item())), reverse=True)[:n]
        real = len(plain)
        assert top.scores[s, :real].tolist() == [score for score, _, _ in plain]
        assert top.rows[s, :real].tolist() == [row for _, row, _ in plain]
        tokens = [int(ids[c]) if shortlist else c for _, _, c in plain]
        assert top.tokens[s, :real].tolist() == tokens
        assert top.ends[s, :real].tolist() == [token == EOS for token in tokens]
        assert top.scores[s, real:].tolist() == [-math.inf] * (n - real) and not top.ends[s, real:].any()
    candidates = torch.randn(2, 2, 4, generator=gen)  # n == beams x columns: every continuation is taken
    candidates[:, :, EOS] = -math.inf  # EOS not allowed (a row too short to end): an impossible EOS does not end
    top = best_continuations(candidates, 8, None)
    assert (top.tokens == EOS).sum() == 4 and not top.ends.any()


def test_survivors_against_a_plain_loop():
    gen = torch.Generator().manual_seed(3)
    k = 3
    top = random_continuations(gen, 6, k, 2 * k, eos_every=2)
    pick, scores = survivors(top.scores, top.ends, k)
    for s, (row_scores, row_ends) in enumerate(zip(top.scores.tolist(), top.ends.tolist())):
        order = [j for j in range(2 * k) if not row_ends[j]] + [j for j in range(2 * k) if row_ends[j]]
        assert pick[s].tolist() == order[:k]
        assert scores[s].tolist() == [-math.inf if row_ends[j] else row_scores[j] for j in order[:k]]


def plain_finish(finished, sent, top, seqs, history, weights, t, alpha, k):
    """``finished``: per sentence a list of (tokens, score, attention rows); the EOS continuations among
    each sentence's first k join it, best first, while it has fewer than k."""
    for i, s in enumerate(sent):
        for j in range(k):
            if top.ends[i, j] and len(finished[s]) < k:
                row = int(top.rows[i, j])
                finished[s].append((seqs[row].tolist(), top.scores[i, j].item() / length_penalty(t + 1, alpha),
                                    history[row].tolist() + [weights[row].tolist()]))


def test_finish_against_a_plain_list_version():
    gen = torch.Generator().manual_seed(4)
    batch, k, limit, t, src_len, alpha = 5, 3, 7, 4, 5, 0.6
    sent = [0, 1, 3, 4]  # sentence 2 has left the batch
    finished = Finished.empty(batch, k, limit, src_len, torch.device("cpu"), return_attention=True)
    plain = [[] for _ in range(batch)]
    for s, ended_before in [(1, 2), (3, 3), (4, 1)]:  # sentence 3 is full: its EOS continuations are ignored
        for j in range(ended_before):
            tokens, score = [5 + j] * (j + 1), -1.0 - j
            finished.scores[s, j], finished.tokens[s, j, : len(tokens)] = score, torch.tensor(tokens)
            plain[s].append((tokens, score, None))
        finished.count[s] = ended_before
    beams = random_beams(gen, sent, k, t, src_len)
    top = random_continuations(gen, len(sent), k, 2 * k, eos_every=2)
    ends = torch.tensor([[0, 1, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]).bool()
    top = top._replace(tokens=top.tokens.masked_fill(ends, EOS).masked_fill(~ends, 9), ends=ends)
    weights = torch.rand(len(sent) * k, src_len, generator=gen)
    finish(finished, beams, top, weights, t, alpha)
    plain_finish(plain, sent, top, beams.seqs, beams.history, weights, t, alpha, k)
    # sentence 0's second EOS ranks below k; 1, 3 and 4 have more EOS than room
    assert finished.count.tolist() == [len(hyps) for hyps in plain] == [1, 3, 0, 3, 3]
    for s in range(batch):
        for j, (tokens, score, attention) in enumerate(plain[s]):
            assert finished.tokens[s, j].tolist() == tokens + [PAD] * (limit - len(tokens))
            assert finished.scores[s, j].item() == pytest.approx(score, rel=1e-6)
            if attention is not None:
                torch.testing.assert_close(finished.attention[s, j], torch.tensor(attention))
        assert finished.scores[s, len(plain[s]):].tolist() == [-math.inf] * (k - len(plain[s]))


@pytest.mark.parametrize("beams_before", [1, 3])  # the first step continues one beam per sentence
def test_advance_against_a_plain_loop(beams_before):
    gen = torch.Generator().manual_seed(5)
    k, t, live, src_len = 3, 2, 4, 5
    beams = random_beams(gen, [0, 2, 3, 5], beams_before, t, src_len)
    step_state = random_beams(gen, [0, 2, 3, 5], beams_before, t, src_len).state  # the step's new states
    weights = torch.rand(live * beams_before, src_len, generator=gen)
    top = random_continuations(gen, live, beams_before, 2 * k)
    top = top._replace(ends=top.ends & (torch.arange(2 * k) < k + 1))  # at most k - 1 of the later ones end
    after = advance(beams, step_state, weights, top, k)
    rows, tokens, scores = [], [], []
    for s in range(live):
        alive = [j for j in range(2 * k) if not top.ends[s, j]][:k]
        rows += [int(top.rows[s, j]) for j in alive]
        tokens += [int(top.tokens[s, j]) for j in alive]
        scores.append([top.scores[s, j].item() for j in alive])
    assert after.scores.tolist() == scores and after.prev.tolist() == tokens
    assert after.seqs.tolist() == [beams.seqs[row].tolist() + [token] for row, token in zip(rows, tokens)]
    assert after.history.tolist() == [beams.history[row].tolist() + [weights[row].tolist()] for row in rows]
    assert [h[:, rows].tolist() for h in step_state.hidden] == [h.tolist() for h in after.state.hidden]
    assert after.state.feed.tolist() == step_state.feed[rows].tolist()
    assert after.sent is beams.sent and after.memory is beams.memory


def test_drop_done_against_a_plain_loop():
    gen = torch.Generator().manual_seed(6)
    k, t = 2, 3
    sent = [0, 1, 3, 4, 6]
    max_lens = torch.tensor([9, 9, 9, 4, 9, 9, 7])
    finished = Finished.empty(7, k, 9, 5, torch.device("cpu"), return_attention=False)
    finished.count[1] = k  # sentence 1 has its k; 3 reaches its limit; 4 has nothing left alive
    beams = random_beams(gen, sent, k, t, soonest=4)
    beams.scores[3] = -math.inf
    after = drop_done(beams, finished, t, max_lens, k)
    kept = [i for i, s in enumerate(sent) if finished.count[s] < k and t + 1 < max_lens[s]
            and any(math.isfinite(v) for v in beams.scores[i].tolist())]
    rows = [i * k + j for i in kept for j in range(k)]
    assert after.sent.tolist() == [sent[i] for i in kept] == [0, 6]
    assert after.scores.tolist() == [beams.scores[i].tolist() for i in kept]
    assert after.memory.values.tolist() == [beams.memory.values[i].tolist() for i in kept]
    for name in ("seqs", "prev", "history"):
        assert getattr(after, name).tolist() == [getattr(beams, name)[row].tolist() for row in rows]
    assert after.state.feed.tolist() == [beams.state.feed[row].tolist() for row in rows]
    assert [h.tolist() for h in after.state.hidden] == [h[:, rows].tolist() for h in beams.state.hidden]
    assert after.soonest == min(int(max_lens[sent[i]]) for i in kept) == 7
    assert drop_done(after, finished, t, max_lens, k) is after  # none done: the same beams
    finished.count[[0, 6]] = k
    assert drop_done(after, finished, t, max_lens, k) is None  # all done


def test_finished_best_against_a_plain_sort():
    gen = torch.Generator().manual_seed(7)
    batch, k, limit, src_len, n_best = 3, 4, 6, 5, 3
    finished = Finished.empty(batch, k, limit, src_len, torch.device("cpu"), return_attention=True)
    filled = [4, 1, 0]
    for s, count in enumerate(filled):
        for j in range(count):
            length = int(torch.randint(0, limit, (1,), generator=gen))
            finished.tokens[s, j, :length] = torch.randint(SPECIAL, 50, (length,), generator=gen)
            finished.scores[s, j] = torch.randn(1, generator=gen).item()
            finished.attention[s, j] = torch.rand(limit, src_len, generator=gen)
    src_real = [5, 2, 3]
    results = finished.best(n_best, src_real)
    for s, hyps in enumerate(results):
        order = sorted(range(filled[s]), key=lambda j: -finished.scores[s, j].item())[:n_best]
        tokens = [[v for v in finished.tokens[s, j].tolist() if v != PAD] for j in order]
        assert [h.tokens for h in hyps] == tokens
        assert [h.score for h in hyps] == [finished.scores[s, j].item() for j in order]
        for h, j in zip(hyps, order):
            assert torch.equal(h.attention, finished.attention[s, j][: len(h.tokens) + 1, : src_real[s]])
    assert finished.best(n_best, src_real)[2] == []
    assert all(h.attention is None for hyps in finished._replace(attention=None).best(n_best, src_real) for h in hyps)


def test_a_first_beam_step_against_a_plain_sort(search_model, tokenizer):
    # the whole search against a plain one is test_beam_search_equals_a_plain_reference; here, one step's outcome
    with torch.no_grad():
        search_model.decoder.output.bias[EOS] += 10.0  # so that hypotheses end at once
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    k, alpha, batch = 3, 0.6, len(SENTENCES)
    beams = start_beams(memory, state, limits, return_attention=False)
    finished = Finished.empty(batch, k, int(limits.max()), memory.mask.size(1), torch.device("cpu"), False)
    with torch.no_grad():
        logp = search_model.decode_step(beams.prev, memory, state)[0].float().log_softmax(-1).tolist()
        after = beam_step(search_model, beams, finished, 0, limits, None, alpha, None)
    for s in range(batch):
        ranked = sorted(((v, token) for token, v in enumerate(logp[s]) if token not in (PAD, BOS)), reverse=True)
        ended = [v / length_penalty(1, alpha) for v, token in ranked[:k] if token == EOS]
        alive = [(v, token) for v, token in ranked[: 2 * k] if token != EOS][:k]
        assert after.prev[s * k: (s + 1) * k].tolist() == [token for _, token in alive]
        assert after.scores[s].tolist() == pytest.approx([v for v, _ in alive], abs=1e-6)
        assert finished.scores[s, : len(ended)].tolist() == pytest.approx(ended, abs=1e-6)
        assert int(finished.count[s]) == len(ended)
    assert finished.count.tolist() == [1] * batch  # each sentence's one beam had EOS among its best


# ---------------------------------------------------------------- n-gram blocking

def plain_bans(history, n):
    """The tokens that would complete an n-gram ``history`` already holds, checked one by one."""
    held = {tuple(history[i: i + n]) for i in range(len(history) - n + 1)}
    last = history[len(history) - n + 1:] if n > 1 else []
    return {token for token in range(max(history, default=0) + 1) if tuple(last + [token]) in held}


@pytest.mark.parametrize("shortlist", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_repeat_bans_against_a_plain_check(n, shortlist):
    gen = torch.Generator().manual_seed(10 + n)
    ids = torch.tensor([PAD, UNK, BOS, EOS, 5, 7, 8, 11, 12, 20]) if shortlist else None
    vocab = OutputVocab(ids, None) if shortlist else None
    tokens = ids[SPECIAL:] if shortlist else torch.arange(SPECIAL, SPECIAL + 3)  # few tokens: many repeats
    for t in range(12):
        seqs = tokens[torch.randint(0, len(tokens), (6, t), generator=gen)]  # (rows, t)
        seqs[0] = tokens[0]  # a row that loops on one token
        banned = repeat_bans(seqs, n, vocab)
        if n == 0 or t < n:
            assert banned is None
            continue
        assert banned.shape == (6, t - n + 1)
        for row, history in zip(banned, seqs.tolist()):
            columns = set(row.tolist()) - {PAD}
            assert ({int(ids[c]) for c in columns} if shortlist else columns) == plain_bans(history, n)
        logits = torch.randn(6, len(ids) if shortlist else 30, generator=gen)
        blocked = step_candidates(logits.clone(), torch.zeros(6, 1), None, None, banned).view(6, -1)
        free = step_candidates(logits.clone(), torch.zeros(6, 1), None, None)
        for row, history in enumerate(seqs.tolist()):
            never = {c for c in range(logits.size(1)) if (int(ids[c]) if shortlist else c) in plain_bans(history, n)}
            assert {c for c in range(logits.size(1)) if blocked[row, c] == -math.inf} == never | {PAD, BOS}
            assert torch.equal(blocked[row, sorted(set(range(logits.size(1))) - never)],
                               free.view(6, -1)[row, sorted(set(range(logits.size(1))) - never)])


def looping(model):
    """``model`` made to loop: two tokens far likelier than any other, EOS never likely."""
    with torch.no_grad():
        model.decoder.output.bias[SPECIAL + 4] += 12.0
        model.decoder.output.bias[SPECIAL + 9] += 11.0
        model.decoder.output.bias[EOS] -= 20.0
    return model


def a_shortlist(model, size=30):
    return model.output_vocab(torch.cat([torch.arange(SPECIAL), torch.arange(SPECIAL + 2, SPECIAL + 2 + size)]))


@pytest.mark.parametrize("beam, shortlist", [(1, False), (3, True)])
def test_blocking_stops_a_model_that_loops(search_model, tokenizer, beam, shortlist):
    model = looping(search_model)
    vocab = a_shortlist(model) if shortlist else None
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    free = search(model, memory, state, limits, beam, vocab=vocab)
    assert all(repeats(hyps[0].tokens, 4) for hyps in free)  # it loops
    for n in (2, 4):
        blocked = search(model, memory, state, limits, beam, no_repeat_ngram=n, vocab=vocab, n_best=beam)
        for hyps, limit in zip(blocked, limits.tolist()):
            assert len(hyps[0].tokens) == limit - 1  # still kept from ending, it goes on to its limit...
            assert not any(repeats(h.tokens, n) for h in hyps)  # ...without a repeated n-gram
            if vocab is not None:
                assert {token for h in hyps for token in h.tokens} <= set(vocab.ids.tolist())


def test_blocking_beam_search_equals_a_plain_reference(search_model, tokenizer, n=2):
    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    results = beam_search(model, memory, state, 3, limits, alpha=0.6, no_repeat_ngram=n)
    free = beam_search(model, memory, state, 3, limits, alpha=0.6)
    assert any(repeats(hyps[0].tokens, n) for hyps in free)  # so that blocking has something to change
    for i, hyps in enumerate(results):
        rows = torch.tensor([i])
        tokens, score = reference_beam_search(model, memory.select(rows), state.select(rows), 3, int(limits[i]), 0.6,
                                              no_repeat_ngram=n)
        assert hyps[0].tokens == tokens and not repeats(tokens, n)
        assert hyps[0].score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("beam", [1, 4])
def test_blocking_off_or_with_nothing_to_block_changes_nothing(search_model, tokenizer, beam):
    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    options = {"alpha": 0.6, "n_best": 2} if beam > 1 else {}
    free = search(model, memory, state, limits, beam, **options)
    for n in (0, int(limits.max()) + 1):  # off, and longer than any output
        same = search(model, memory, state, limits, beam, no_repeat_ngram=n, **options)
        assert [[(h.tokens, h.score) for h in hyps] for hyps in same] == [[(h.tokens, h.score) for h in hyps]
                                                                         for hyps in free]
    if beam == 1:  # greedy: an output without a repeated n-gram is never blocked
        blocked = greedy(model, memory, state, limits, no_repeat_ngram=3)
        for g, b in zip(free, blocked):
            assert repeats(g[0].tokens, 3) or g[0].tokens == b[0].tokens


@pytest.mark.parametrize("beam", [1, 4])
def test_blocking_batch_equals_one_by_one(search_model, tokenizer, beam):
    model = looping(search_model)  # the longest outputs, with a shortlist
    vocab = a_shortlist(model)
    options = {} if beam == 1 else {"n_best": 3}
    together = search(model, *encode(model, tokenizer, SENTENCES), beam, no_repeat_ngram=2, vocab=vocab, **options)
    for sentence, hyps in zip(SENTENCES, together):
        alone = search(model, *encode(model, tokenizer, [sentence]), beam, no_repeat_ngram=2, vocab=vocab, **options)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=1e-4)


def test_coverage_penalty_against_a_plain_loop():
    gen = torch.Generator().manual_seed(5)
    coverage = torch.rand(6, 7, generator=gen) * 2  # some positions covered more than once
    coverage[0, 3] = 0.0  # never attended: the floor, not -inf
    mask = torch.arange(7).unsqueeze(0) < torch.tensor([7, 5, 1, 7, 3, 6]).unsqueeze(1)
    got = coverage_penalty(coverage, mask, 0.4)
    for row in range(6):
        real = int(mask[row].sum())
        assert float(got[row]) == pytest.approx(plain_coverage_penalty([coverage[row].tolist()], real, 0.4), abs=1e-5)
    assert torch.isfinite(got).all() and (got <= 0).all()
    assert coverage_penalty(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 1.0).tolist() == [0.0, 0.0]


def test_coverage_beam_search_equals_a_plain_reference(search_model, tokenizer, beta=2.0):
    # the penalty follows each hypothesis through the beams' reordering and the sentences' leaving
    model = search_model
    with torch.no_grad():
        model.decoder.output.bias[EOS] += 4.0  # hypotheses that end early, with little of the source attended
    memory, state, limits = encode(model, tokenizer, SENTENCES, ratio=0.3)  # the longest sources outlast the limit
    results = beam_search(model, memory, state, 3, limits, alpha=0.6, coverage=beta)
    free = beam_search(model, memory, state, 3, limits, alpha=0.6)
    assert any(r[0].score != f[0].score for r, f in zip(results, free))  # so that the penalty has changed something
    for i, hyps in enumerate(results):
        rows = torch.tensor([i])
        tokens, score = reference_beam_search(model, memory.select(rows), state.select(rows), 3, int(limits[i]), 0.6,
                                              coverage=beta)
        assert hyps[0].tokens == tokens
        assert hyps[0].score == pytest.approx(score, abs=1e-4)


def test_coverage_off_changes_nothing(search_model, tokenizer):
    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    options = {"alpha": 0.6, "n_best": 2, "no_repeat_ngram": 2, "return_attention": True}
    free = beam_search(model, memory, state, 3, limits, **options)
    off = beam_search(model, memory, state, 3, limits, coverage=0.0, **options)
    for f, o in zip(free, off):
        assert [(h.tokens, h.score) for h in f] == [(h.tokens, h.score) for h in o]
        for a, b in zip(f, o):
            assert torch.equal(a.attention, b.attention)


def test_coverage_batch_equals_one_by_one(search_model, tokenizer):
    model = search_model
    vocab = a_shortlist(model)
    options = {"n_best": 3, "coverage": 0.4, "vocab": vocab, "no_repeat_ngram": 2}
    together = search(model, *encode(model, tokenizer, SENTENCES, ratio=0.3), 4, **options)
    for sentence, hyps in zip(SENTENCES, together):
        alone = search(model, *encode(model, tokenizer, [sentence], ratio=0.3), 4, **options)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=1e-4)


@pytest.mark.parametrize("beam", [1, 8])
def test_attention_memory_follows_the_outputs_not_their_limit(search_model, tokenizer, beam):
    # outputs of a few pieces under a limit of 1,000: the attention kept must grow with the steps taken, where
    # a buffer of batch x beam x limit x src_len floats would have been the largest allocation by far
    from torch.profiler import ProfilerActivity, profile

    model = search_model
    memory, state, limits = encode(model, tokenizer, SENTENCES * 4)
    limits = torch.full_like(limits, 1000)
    with torch.no_grad():
        bias = model.decoder.output.bias.clone()
        model.decoder.output.bias[EOS] = 8.0  # every hypothesis ends within a few steps
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            hyps = (greedy(model, memory, state, limits, return_attention=True) if beam == 1
                    else beam_search(model, memory, state, beam, limits, return_attention=True))
    finally:
        with torch.no_grad():
            model.decoder.output.bias.copy_(bias)
    assert max(len(h[0].tokens) for h in hyps) < 10
    batch, src_len = memory.mask.shape
    buffer = batch * beam * 1000 * src_len * 4  # bytes
    assert max(event.cpu_memory_usage for event in prof.events()) < buffer / 4
    with_attention = [h[0].attention.shape for h in hyps]
    assert with_attention == [(len(h[0].tokens) + 1, int(n)) for h, n in zip(hyps, memory.mask.sum(1))]


def prefix_of(prefixes):
    """Prefixes (lists of ids) as the searches take them: (batch, longest), PAD past each."""
    out = torch.full((len(prefixes), max(map(len, prefixes))), PAD, dtype=torch.long)
    for row, ids in enumerate(prefixes):
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


PREFIXES = [[SPECIAL + 5, SPECIAL + 9], [], [SPECIAL + 20], [SPECIAL + 9, SPECIAL + 9, SPECIAL + 9], [SPECIAL + 27]]


@pytest.mark.parametrize("beam", [1, 3])
def test_outputs_begin_with_their_prefix(search_model, tokenizer, beam):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    prefix = prefix_of(PREFIXES)
    longer = limits + (prefix != PAD).sum(1)
    options = {} if beam == 1 else {"n_best": 3}
    results = search(search_model, memory, state, longer, beam, no_repeat_ngram=2, prefix=prefix, **options)
    for ids, hyps in zip(PREFIXES, results):  # also where the prefix repeats an n-gram that would be banned
        assert hyps and all(h.tokens[: len(ids)] == ids for h in hyps)


def test_beam_with_a_prefix_equals_a_plain_reference(search_model, tokenizer):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    prefix = prefix_of(PREFIXES)
    longer = limits + (prefix != PAD).sum(1)
    results = beam_search(search_model, memory, state, 3, longer, alpha=0.6, prefix=prefix)
    for i, hyps in enumerate(results):
        rows = torch.tensor([i])
        tokens, score = reference_beam_search(search_model, memory.select(rows), state.select(rows), 3,
                                              int(longer[i]), 0.6, prefix=PREFIXES[i])
        assert hyps[0].tokens == tokens
        assert hyps[0].score == pytest.approx(score, abs=1e-4)


def test_greedy_with_a_prefix_scores_the_prefix_too(search_model, tokenizer):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES[:1])
    ids = PREFIXES[0]
    hyp = greedy(search_model, memory, state, limits + len(ids), prefix=prefix_of([ids]))[0][0]
    total, prev = 0.0, torch.tensor([BOS])
    with torch.no_grad():
        for token in hyp.tokens + [EOS]:
            logits, state, _ = search_model.decode_step(prev, memory, state)
            total += float(logits[0].log_softmax(-1)[token])
            prev = torch.tensor([token])
    assert hyp.score == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("beam", [1, 3])
def test_no_prefix_rows_are_untouched_by_others_prefixes(search_model, tokenizer, beam):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    plain = search(search_model, memory, state, limits, beam)
    empty = prefix_of([[]] * len(SENTENCES) + [[SPECIAL]])[:-1]  # a prefix of PAD only: nothing forced
    assert [h[0].tokens for h in search(search_model, memory, state, limits, beam, prefix=empty)] == \
        [h[0].tokens for h in plain]
    mixed = search(search_model, memory, state, limits + (prefix_of(PREFIXES) != PAD).sum(1), beam,
                   prefix=prefix_of(PREFIXES))
    for ids, got, want in zip(PREFIXES, mixed, plain):
        if not ids:
            assert got[0].tokens == want[0].tokens
            assert got[0].score == pytest.approx(want[0].score, abs=1e-4)


def test_prefix_pieces_outside_a_shortlist_are_forced(search_model, tokenizer):
    vocab = a_shortlist(search_model, size=10)  # ids SPECIAL + 2 .. SPECIAL + 11, and the special ones
    ids = [SPECIAL + 30, SPECIAL + 40]
    with_ids = search_model.output_vocab(torch.cat([vocab.ids, torch.tensor(ids)]).unique())
    memory, state, limits = encode(search_model, tokenizer, SENTENCES[:1])
    hyp = greedy(search_model, memory, state, limits + 2, vocab=with_ids, prefix=prefix_of([ids]))[0][0]
    assert hyp.tokens[:2] == ids
    assert set(hyp.tokens[2:]) <= set(with_ids.ids.tolist())


def prefix_translator(model, tokenizer, **options):
    from translate.translator import DecodeOptions, Translator

    from .test_shortlist import lexicon_for

    options = {"inter_threads": 1, "shortlist": 3, "shortlist_frequent": 5, **options}
    return Translator(model, tokenizer, DecodeOptions(**options), lexicon=lexicon_for(tokenizer))


@pytest.mark.parametrize("options", [{"beam": 1}, {"beam": 3, "n_best": 2}, {"sample": True, "n_best": 2}])
def test_translations_begin_with_the_prefix_even_outside_the_shortlist(search_model, tokenizer, options):
    decoder = prefix_translator(search_model, tokenizer, **options)
    prefixes = ["The big", "", "I think that", "dog", "Tom"]
    results = decoder.translate(SENTENCES, prefixes=prefixes)
    for sentence, prefix, nbest in zip(SENTENCES, prefixes, results):
        ids = tokenizer.encode_tgt([prefix])[0]
        outside = set(ids) - set(decoder.lexicon.shortlist(torch.tensor([tokenizer.encode_src([sentence])[0]]),
                                                           3, 5).ids.tolist())
        assert prefix != "The big" or outside  # the test forces pieces the shortlist lacks
        for translation in nbest:
            assert translation.tokens[: len(ids)] == ids
            assert translation.text.startswith(tokenizer.decode_tgt([ids])[0])
    one = decoder.translate(SENTENCES, decoder.options.__class__(**{**options, "inter_threads": 1, "shortlist": 3,
                                                                    "shortlist_frequent": 5, "prefix": "The big"}))
    assert all(nbest[0].text.startswith("The big") for nbest in one)  # options.prefix: every line's


def test_an_empty_prefix_is_no_prefix(search_model, tokenizer):
    decoder = prefix_translator(search_model, tokenizer, beam=3)
    plain = [[(t.text, t.score) for t in nbest] for nbest in decoder.translate(SENTENCES)]
    assert [[(t.text, t.score) for t in nbest] for nbest in
            decoder.translate(SENTENCES, prefixes=[""] * len(SENTENCES))] == plain
