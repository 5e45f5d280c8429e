import pytest
import torch

from translate.config import load_config
from translate.model import build_model
from translate.search import _top_candidates, beam_search, greedy, length_penalty, max_lengths, translate_lines
from translate.tokenizer import BOS, EOS

SENTENCES = ["El gato come pan.", "Y.", "El niño grande lee el libro rojo y mira el sol.", "Perro.",
             "El perro pequeño bebe agua."]


def encode(model, tokenizer, sentences):
    from translate.data import Encoded, collate

    batch = collate(Encoded(tokenizer.encode_src(sentences)), None, list(range(len(sentences))))
    memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    return memory, state, max_lengths(batch.src_lengths, 1.5)


@pytest.fixture(params=["lstm-bahdanau", "gru-luong-general-feed"])
def model(request, tokenizer):
    cell, _, attention = request.param.partition("-")
    feed = attention.endswith("-feed")
    attention = attention.removesuffix("-feed")
    torch.manual_seed(3)
    config = load_config(overrides={"model.cell": cell, "model.attention": attention, "model.input_feeding": feed,
                                    "model.embed_dim": 16, "model.hidden_dim": 32, "model.dropout": 0.0})
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    # sharpen the output so that search makes real choices: a random model is nearly uniform
    with torch.no_grad():
        model.decoder.output.bias.normal_(0, 2)
    return model


def test_beam_one_equals_greedy(model, tokenizer):
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    by_greedy = greedy(model, memory, state, limits, return_attention=True)
    by_beam = beam_search(model, memory, state, 1, limits, return_attention=True)
    for g, b in zip(by_greedy, by_beam):
        assert g[0].tokens == b[0].tokens
        torch.testing.assert_close(g[0].attention, b[0].attention)


@pytest.mark.parametrize("beam", [1, 4])
def test_batch_equals_one_by_one(model, tokenizer, beam):
    # full precision: bf16 kernels may round differently for different batch shapes
    batched = translate_lines(model, tokenizer, SENTENCES, beam=beam, n_best=min(beam, 3), amp=False)
    for sentence, together in zip(SENTENCES, batched):
        alone = translate_lines(model, tokenizer, [sentence], beam=beam, n_best=min(beam, 3), amp=False)[0]
        assert [t.tokens for t in alone] == [t.tokens for t in together]
        assert [t.score for t in alone] == pytest.approx([t.score for t in together], abs=1e-4)


def test_n_best_sorted_and_distinct(model, tokenizer):
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    results = beam_search(model, memory, state, 5, limits, n_best=5)
    for hyps in results:
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True) and len(hyps) >= 1
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)


def test_lengths_respect_limits(model, tokenizer):
    memory, state, _ = encode(model, tokenizer, SENTENCES)
    limits = torch.full((len(SENTENCES),), 3)
    for hyps in greedy(model, memory, state, limits) + beam_search(model, memory, state, 3, limits, n_best=3):
        assert all(len(h.tokens) <= 2 for h in hyps)  # 3 counting EOS


def test_beam_not_worse_than_greedy_in_model_score(model, tokenizer):
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    greedy_hyps = greedy(model, memory, state, limits)
    beam_hyps = beam_search(model, memory, state, 8, limits, alpha=0.0)
    for g, b in zip(greedy_hyps, beam_hyps):
        assert b[0].score >= g[0].score - 1e-4


def test_empty_and_odd_lines(model, tokenizer):
    lines = ["", "   ", "猫 🐈 ✓", "el gato " * 1250]  # the last: 10,000 characters
    truncated = []
    out = translate_lines(model, tokenizer, lines, beam=2, on_truncate=truncated.append)
    assert out[0][0].text == "" and out[1][0].text == ""
    assert all(isinstance(t[0].text, str) for t in out)
    assert truncated == [1]


def test_n_best_cannot_exceed_beam(model, tokenizer):
    memory, state, limits = encode(model, tokenizer, SENTENCES[:1])
    with pytest.raises(ValueError, match="cannot exceed"):
        beam_search(model, memory, state, 2, limits, n_best=3)


def test_greedy_drops_finished_sentences_without_changing_results(model, tokenizer):
    # the batch shrinks as sentences end; every sentence must still get its own full result
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    together = greedy(model, memory, state, limits)
    for i in range(len(SENTENCES)):
        rows = torch.tensor([i])
        alone = greedy(model, memory.select(rows), state.select(rows), limits[rows])[0][0]
        assert alone.tokens == together[i][0].tokens
        assert alone.score == pytest.approx(together[i][0].score, abs=1e-4)


def test_inference_model_copies_leave_the_model_alone(model, tokenizer, monkeypatch):
    from translate import search
    from translate.quantize import Int8Linear

    assert search.inference_model(model, "fp32") is model
    with pytest.raises(ValueError, match="unknown precision"):
        search.inference_model(model, "fp8")
    monkeypatch.setattr(search, "cpu_has_bf16", lambda: False)
    assert search.inference_model(model, "bf16") is model  # no native bf16: nothing to gain
    monkeypatch.setattr(search, "cpu_has_bf16", lambda: True)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    fast = search.inference_model(model, "bf16")
    assert fast is not model and next(fast.parameters()).dtype == torch.bfloat16
    small = search.inference_model(model, "int8")
    assert small is not model and isinstance(small.decoder.output, Int8Linear)
    assert isinstance(model.decoder.output, torch.nn.Linear) and next(model.parameters()).dtype == torch.float32
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name
    for copy in (fast, small):
        out = translate_lines(copy, tokenizer, SENTENCES, beam=3)
        assert len(out) == len(SENTENCES) and all(isinstance(t[0].text, str) for t in out)
        assert all(torch.isfinite(torch.tensor(t[0].score)) for t in out)

@pytest.mark.parametrize("live,beams,vocab,n", [(7, 5, 300, 10), (3, 1, 50, 4), (4, 3, 2, 6), (2, 1, 3, 10),
                                                (5, 4, 8, 8)])
def test_top_candidates_equal_a_full_top_k(live, beams, vocab, n):
    gen = torch.Generator().manual_seed(live * 100 + vocab)
    candidates = torch.randn(live, beams, vocab, generator=gen)
    candidates[0, 1:] = float("-inf")  # beams that are out of the race
    candidates[1, :, vocab // 2:] = float("-inf")
    scores, beam, token = _top_candidates(candidates, n)
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


def test_beam_search_equals_a_plain_reference(model, tokenizer):
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    results = beam_search(model, memory, state, 3, limits, alpha=0.6)
    for i, hyps in enumerate(results):
        rows = torch.tensor([i])
        tokens, score = reference_beam_search(model, memory.select(rows), state.select(rows), 3, int(limits[i]), 0.6)
        assert hyps[0].tokens == tokens
        assert hyps[0].score == pytest.approx(score, abs=1e-4)


def test_batches_in_parallel_equal_one_at_a_time(model, tokenizer):
    threads = torch.get_num_threads()
    alone = translate_lines(model, tokenizer, SENTENCES, beam=3, n_best=2, batch_sentences=2, inter_threads=1)
    for beam in (3, 1):
        parallel = translate_lines(model, tokenizer, SENTENCES, beam=beam, n_best=min(beam, 2), batch_sentences=2,
                                   inter_threads=2)
        if beam == 3:
            assert [[t.tokens for t in n] for n in parallel] == [[t.tokens for t in n] for n in alone]
            assert [t.score for n in parallel for t in n] == pytest.approx([t.score for n in alone for t in n],
                                                                           abs=1e-4)
        assert len(parallel) == len(SENTENCES) and all(len(n) == min(beam, 2) for n in parallel)
    assert torch.get_num_threads() == threads  # the workers' share is not left behind


def test_decode_workers():
    from translate.search import decode_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode_workers(cpu, 3, 10) == 3 and decode_workers(cpu, 4, 2) == 2 and decode_workers(cuda, 0, 9) == 1
    assert decode_workers(cpu, 0, 9) == (2 if torch.get_num_threads() >= 2 else 1)
