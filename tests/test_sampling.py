"""Sampling (``search.Sampler``, ``DecodeOptions.sample``) against plain references: the set of
tokens top-k and top-p allow, the frequencies of many draws, greedy at temperature 0 or top-k 1,
and seeds that give the same draws whatever the batch."""

import math

import numpy as np
import pytest
import torch

from translate.errors import ConfigError
from translate.search import Sampler, greedy, sampling_distribution
from translate.tokenizer import BOS, EOS
from translate.translator import DecodeOptions, Translator

from .conftest import SENTENCES, encode
from .test_shortlist import lexicon_for


def plain_allowed(logp: list[float], top_k: int, top_p: float) -> set[int]:
    """The columns a row may draw, computed plainly: the k likeliest (ties with the k-th kept), then
    the likeliest of those until their probability (renormalised over them) reaches top_p."""
    finite = [i for i, v in enumerate(logp) if v > -math.inf]
    ranked = sorted(finite, key=lambda i: -logp[i])
    if 0 < top_k < len(logp):
        kth = logp[ranked[min(top_k, len(ranked)) - 1]]
        ranked = [i for i in ranked if logp[i] >= kth]
    total = sum(math.exp(logp[i]) for i in ranked)
    kept, mass = [], 0.0
    for i in ranked:
        if mass >= top_p - 1e-9:
            break
        kept.append(i)
        mass += math.exp(logp[i]) / total
    return set(kept)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (40, 0.3)])
def test_top_k_and_top_p_allow_what_a_plain_reference_allows(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 30, generator=gen) * 2
    logits[3, 10:] = -math.inf  # a row that may produce few columns
    logp = logits.log_softmax(-1)
    probs = sampling_distribution(logp, 1.0, top_k, top_p)
    for row, p in zip(logp.tolist(), probs):
        assert {i for i, v in enumerate(p.tolist()) if v > 0} == plain_allowed(row, top_k, top_p)
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
        kept = p > 0  # within the set, in proportion to the model's probabilities
        expected = torch.tensor(row).exp()[kept]
        torch.testing.assert_close(p[kept], expected / expected.sum(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.7)])
def test_draws_follow_the_distribution(temperature, top_k, top_p):
    """Many draws from one toy distribution: each token's frequency within 5 standard errors of
    softmax(logp / temperature) over the allowed set, and never a token outside it."""
    logp = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -math.inf, 1.5, -0.5]]).log_softmax(-1)
    draws = 40000
    rng = np.random.default_rng(7)
    picked = Sampler([rng] * draws, temperature, top_k, top_p).pick(logp.expand(draws, -1), torch.arange(draws))
    counts = torch.bincount(picked, minlength=logp.size(1)).double() / draws
    allowed = plain_allowed((logp[0] / temperature).log_softmax(-1).tolist(), top_k, top_p)
    scaled = (logp[0] / temperature).exp()
    expected = torch.tensor([float(scaled[i]) if i in allowed else 0.0 for i in range(logp.size(1))]).double()
    expected /= expected.sum()
    assert set(torch.nonzero(counts).squeeze(1).tolist()) <= allowed
    tolerance = 5 * (expected * (1 - expected) / draws).sqrt() + 1e-9
    assert ((counts - expected).abs() <= tolerance).all(), (counts, expected)


def sampled(model, memory, state, limits, seed=0, **settings):
    batch = memory.mask.size(0)
    draws = [np.random.default_rng([seed, row]) for row in range(batch)]
    return greedy(model, memory, state, limits, sampler=Sampler(draws, **settings))


@pytest.mark.parametrize("settings", [{"temperature": 0.0}, {"top_k": 1}, {"temperature": 1e-4}])
def test_temperature_zero_or_top_k_one_is_greedy(search_model, tokenizer, settings):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    plain = greedy(search_model, memory, state, limits)
    drawn = sampled(search_model, memory, state, limits, **settings)
    assert [h[0].tokens for h in drawn] == [h[0].tokens for h in plain]
    assert [h[0].score for h in drawn] == pytest.approx([h[0].score for h in plain], abs=1e-4)


def test_a_sample_scores_the_model_log_probability_of_its_tokens(search_model, tokenizer):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES[:2])
    for row, hyps in enumerate(sampled(search_model, memory, state, limits, temperature=1.5)):
        rows = torch.tensor([row])
        mem, st = memory.select(rows), state.select(rows)
        prev, total = torch.tensor([BOS]), 0.0
        with torch.no_grad():
            for token in hyps[0].tokens + [EOS]:
                logits, st, _ = search_model.decode_step(prev, mem, st)
                total += float(logits[0].log_softmax(-1)[token])
                prev = torch.tensor([token])
        assert hyps[0].score == pytest.approx(total, abs=1e-4)


def translator(model, tokenizer, **options):
    return Translator(model, tokenizer, DecodeOptions(sample=True, inter_threads=1, shortlist=0, **options))


def texts(results):
    return [[t.text for t in nbest] for nbest in results]


def test_same_seed_same_output_and_another_seed_another(search_model, tokenizer):
    lines = SENTENCES * 2
    first = texts(translator(search_model, tokenizer, seed=1, n_best=3).translate(lines))
    assert texts(translator(search_model, tokenizer, seed=1, n_best=3).translate(lines)) == first
    assert texts(translator(search_model, tokenizer, seed=2, n_best=3).translate(lines)) != first
    assert first[: len(SENTENCES)] == first[len(SENTENCES):]  # a sentence's draws depend on its text, not its place


def test_batch_equals_one_by_one(search_model, tokenizer):
    decoder = translator(search_model, tokenizer, seed=5, n_best=2, top_p=0.9)
    together = decoder.translate(SENTENCES)
    in_ones = decoder.translate(SENTENCES, DecodeOptions(sample=True, seed=5, n_best=2, top_p=0.9, shortlist=0,
                                                        inter_threads=1, batch_sentences=1))
    for sentence, nbest, ones in zip(SENTENCES, together, in_ones):
        alone = decoder.translate([sentence])[0]
        assert [t.text for t in alone] == [t.text for t in nbest] == [t.text for t in ones]
        assert [t.score for t in alone] == pytest.approx([t.score for t in nbest], abs=1e-4)


def test_n_draws_likeliest_first_not_deduplicated(search_model, tokenizer):
    results = translator(search_model, tokenizer, n_best=8, temperature=0.0).translate(SENTENCES[:2])
    for nbest in results:
        assert len(nbest) == 8 and len({t.text for t in nbest}) == 1  # temperature 0: 8 times the same
    results = translator(search_model, tokenizer, n_best=6).translate(SENTENCES)
    for nbest in results:
        scores = [t.score for t in nbest]
        assert len(nbest) == 6 and scores == sorted(scores, reverse=True)


def test_sampling_keeps_to_each_sentence_shortlist(search_model, tokenizer):
    lexicon = lexicon_for(tokenizer)
    decoder = Translator(search_model, tokenizer, DecodeOptions(sample=True, shortlist=3, shortlist_frequent=5,
                                                                inter_threads=1, restore_casual=False,
                                                                copy_unknown=False, split="none"), lexicon=lexicon)
    for sentence, nbest in zip(SENTENCES, decoder.translate(SENTENCES)):
        src = torch.tensor([tokenizer.encode_src([sentence])[0]])
        allowed = set(lexicon.shortlist(src, 3, 5).ids.tolist())
        assert set(nbest[0].tokens) <= allowed


def test_sampling_with_int8(search_model, tokenizer):
    from translate.quantize import int8_available

    if not int8_available():
        pytest.skip("this torch build lacks the int8 kernels")
    options = DecodeOptions(sample=True, seed=3, shortlist=0, inter_threads=1, n_best=2)
    decoder = Translator(search_model, tokenizer, options, precision="int8")
    assert decoder.precision == "int8"
    assert texts(decoder.translate(SENTENCES)) == texts(decoder.translate(SENTENCES))


@pytest.mark.parametrize("field, value, message", [
    ("top_p", 0.0, "top_p must be positive and at most 1, not 0.0"),
    ("top_p", 1.5, "top_p must be positive and at most 1"),
    ("temperature", -1.0, "temperature must be from 0 (the likeliest token) to 100"),
    ("top_k", -1, "top_k must be 0 or more"),
    ("seed", -3, "seed must be 0 or more"),
    ("sample", "yes", "sample must be True or False"),
    ("prefix", 3, "prefix must be text of at most 1000 characters"),
])
def test_bad_sampling_options_are_one_line_errors(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        DecodeOptions(**{field: value})
    assert "\n" not in str(error.value)


def test_sampling_draws_n_best_whatever_the_beam():
    assert DecodeOptions(sample=True, beam=1, n_best=4).n_best == 4
    with pytest.raises(ConfigError, match="cannot exceed the beam"):
        DecodeOptions(beam=1, n_best=4)


def test_serve_requests_sample_and_prefix():
    import json

    from translate.errors import RequestError
    from translate.serve import parse_request

    def parse(**fields):
        return parse_request(json.dumps({"sentences": ["Hola."], **fields}).encode(), 8, 100).options

    assert parse() == DecodeOptions()  # nothing asked: the default decoding
    options = parse(sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=4, n_best=8, beam=1, prefix="The")
    assert (options.sample, options.temperature, options.top_k, options.top_p, options.seed, options.n_best,
            options.prefix) == (True, 0.7, 20, 0.9, 4, 8, "The")
    for fields, message in [({"sample": "yes"}, '"sample" must be true or false'),
                            ({"prefix": 3}, '"prefix" must be text of at most 1000 characters'),
                            ({"prefix": "x" * 1001}, '"prefix" must be text of at most 1000 characters'),
                            ({"top_p": 0}, '"top_p" must be positive and at most 1, not 0')]:
        with pytest.raises(RequestError, match=message) as error:
            parse(**fields)
        assert error.value.status == 400 and "\n" not in str(error.value)


def test_repl_commands_set_sampling_and_prefix():
    from types import SimpleNamespace

    from translate.repl import Repl

    repl = Repl(SimpleNamespace(tokenizer=None, options=DecodeOptions()))
    assert repl.command(":sample on") == ("sample on", False) and repl.options.sample
    assert repl.command(":temperature 0.5") == ("temperature 0.5", False) and repl.options.temperature == 0.5
    assert repl.command(":top-k 7")[0] == "top-k 7" and repl.options.top_k == 7
    assert repl.command(":top-p 0.8")[0] == "top-p 0.8" and repl.options.top_p == 0.8
    assert repl.command(":seed 9")[0] == "seed 9" and repl.options.seed == 9
    assert repl.command(":top-p 2")[0] == "usage: :top-p; top_p must be positive and at most 1, not 2.0"
    assert repl.command(":top-k x")[0] == "usage: :top-k T with T 0 or more"
    assert repl.command(":sample maybe")[0] == "usage: :sample on|off"
    assert repl.command(":prefix The big")[0] == "prefix 'The big'" and repl.options.prefix == "The big"
    assert repl.command(":prefix")[0] == "no prefix" and repl.options.prefix == ""
    assert repl.options.top_p == 0.8  # a bad value leaves the option as it was


def test_decode_command_samples_and_forces_prefixes(run_with_steps, tmp_path):
    from click.testing import CliRunner

    from translate.cli import main

    runner = CliRunner()
    lines = "El gato come pan.\nEl perro bebe agua.\n"

    def decode(*args, text=lines):
        result = runner.invoke(main, ["decode", str(run_with_steps), "--shortlist", "0", *args], input=text)
        assert result.exit_code == 0, result.output
        return result.output

    drawn = decode("--sample", "--beam", "1", "--n-best", "3", "--seed", "4", "--top-p", "0.95")
    assert len(drawn.splitlines()) == 6 and drawn == decode("--sampling", "--beam", "1", "--n-best", "3", "--seed",
                                                            "4", "--top-p", "0.95")
    assert all(line.split("\t")[2].startswith("the cat") for line in
               decode("--prefix", "the cat", "--n-best", "2").splitlines())
    tabbed = decode("--prefix-tab", "--beam", "2", text="El gato come pan.\tthe dog\nEl perro bebe agua.\n")
    plain = decode("--beam", "2", text="El perro bebe agua.\n")
    assert tabbed.splitlines()[0].startswith("the dog") and tabbed.splitlines()[1] == plain.strip()
    too_long = runner.invoke(main, ["decode", str(run_with_steps), "--prefix", "x" * 1001], input=lines)
    assert too_long.exit_code != 0 and "prefix must be text of at most 1000 characters" in too_long.output
    assert "Traceback" not in too_long.output
    scored = runner.invoke(main, ["eval", str(run_with_steps), "--shortlist", "0", "--beam", "2", "--prefix",
                                  "the cat", "-o", str(tmp_path / "eval.txt")])  # eval scores prefixed output
    assert scored.exit_code == 0, scored.output
    outputs = (tmp_path / "eval.txt").read_text(encoding="utf-8").splitlines()
    assert outputs and all(line.startswith("the cat") for line in outputs)


def test_sampling_and_a_prefix_with_an_ensemble(tokenizer):
    from translate.ensemble import Ensemble

    from .test_ensemble import sharp_model

    models = Ensemble([sharp_model(tokenizer, 1, 0), sharp_model(tokenizer, 2, 1)])
    decoder = Translator(models, tokenizer, DecodeOptions(sample=True, seed=2, n_best=3, shortlist=0, inter_threads=1))
    drawn = decoder.translate(SENTENCES, prefixes=["the dog"] + [""] * (len(SENTENCES) - 1))
    ids = tokenizer.encode_tgt(["the dog"])[0]
    assert all(t.tokens[: len(ids)] == ids for t in drawn[0])
    assert texts(drawn) == texts(decoder.translate(SENTENCES, prefixes=["the dog"] + [""] * (len(SENTENCES) - 1)))
    assert texts(drawn[1:]) == texts([decoder.translate([line])[0] for line in SENTENCES[1:]])


def test_libretranslate_requests_sample_and_prefix_as_extensions(tiny_service):
    import json
    import urllib.parse

    translator, call = tiny_service
    sampled = DecodeOptions(shortlist=0, sample=True, temperature=1.5, top_k=50, seed=3, beam=5, n_best=3)
    expected = [t.text for t in translator.translate(["El gato come pan."], sampled)[0]]
    fields = {"q": "El gato come pan.", "target": "en", "alternatives": 2, "sample": True, "temperature": 1.5,
              "top_k": 50, "seed": 3}
    status, answer = call(json.dumps(fields).encode())
    assert status == 200 and [answer["translatedText"], *answer["alternatives"]] == expected
    form = urllib.parse.urlencode({**fields, "sample": "true"}).encode()  # a form's values are text
    assert call(form, "application/x-www-form-urlencoded") == (200, answer)
    prefixed = translator.translate(["El gato come pan."], DecodeOptions(shortlist=0, prefix="The dog"))[0][0]
    status, answer = call(json.dumps({"q": "El gato come pan.", "target": "en", "prefix": "The dog"}).encode())
    assert status == 200 and answer["translatedText"] == prefixed.text and prefixed.text.startswith("The dog")
    for bad, message in (({"sample": "yes"}, '"sample" must be true or false'),
                         ({"top_p": 0}, '"top_p" must be positive'), ({"prefix": 3}, '"prefix" must be text'),
                         ({"sample": True, "glossary": [["gato", "dog"]]}, "cannot be used with sampling")):
        status, error = call(json.dumps({"q": "Hola.", "target": "en", **bad}).encode())
        assert status == 400 and message in error["error"] and "\n" not in error["error"], error
