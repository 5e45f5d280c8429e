"""Ensembles (ensemble.py) against plain references written here: an ensemble of one is its model
bit for bit; of two, a step-by-step loop over the mean of the two models' log-probabilities; greedy
is beam 1; a batch is its sentences one by one; shortlists are the union of the models'; int8 is
the ensemble of the int8 copies; the command line decodes, scores and evaluates with --ensemble,
and refuses models with different tokenizers in one line."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import SENTENCES, encode, make_pairs
from translate.checkpoint import save_checkpoint
from translate.cli import main
from translate.config import load_config
from translate.encoded import Encoded
from translate.ensemble import Ensemble, EnsembleLexicon, ensemble_lexicon
from translate.model import build_model
from translate.quantize import int8_available, quantized_copy
from translate.search import NOT_OUTPUT, beam_search, greedy
from translate.serve import model_info
from translate.shortlist import Lexicon, build_lexicon
from translate.tokenizer import BOS, EOS, Tokenizer
from translate.translator import DecodeOptions, Translator

ARCHITECTURES = [("lstm", "bahdanau", "luong", False), ("gru", "luong-general", "luong", True),
                 ("lstm", "luong-dot", "bahdanau", False)]


def config_of(architecture: int):
    cell, attention, decoder, feed = ARCHITECTURES[architecture]
    return load_config(overrides={"model.cell": cell, "model.attention": attention, "model.decoder": decoder,
                                  "model.input_feeding": feed, "model.embed_dim": 16, "model.hidden_dim": 32,
                                  "model.dropout": 0.0, "train.amp": False})


def sharp_model(tokenizer, seed: int, architecture: int):
    """A tiny random model whose output is sharpened so that search makes real choices."""
    torch.manual_seed(seed)
    model = build_model(config_of(architecture).model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    with torch.no_grad():
        model.decoder.output.bias.normal_(0, 2)
    return model


@pytest.fixture()
def pair(tokenizer):
    """Two models of different architectures that share the tokenizer."""
    return sharp_model(tokenizer, 3, 0), sharp_model(tokenizer, 4, 1)


def lexicon_of(tokenizer, seed: int):
    pairs = make_pairs(80, seed=seed)
    return build_lexicon(Encoded(tokenizer.encode_src([s for s, _ in pairs])),
                         Encoded(tokenizer.encode_tgt([t for _, t in pairs])),
                         tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, iterations=2)


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [h.tokens for h in x] == [h.tokens for h in y]
        assert [h.score for h in x] == [h.score for h in y]
        assert all((h.attention is None and g.attention is None) or torch.equal(h.attention, g.attention)
                   for h, g in zip(x, y))


@pytest.mark.parametrize("architecture", [0, 1, 2])
def test_an_ensemble_of_one_is_its_model_bit_for_bit(tokenizer, architecture):
    model = sharp_model(tokenizer, 3, architecture)
    one = Ensemble([model]).eval()
    for search in (lambda m, mem, st, lim: greedy(m, mem, st, lim, return_attention=True, no_repeat_ngram=2),
                   lambda m, mem, st, lim: beam_search(m, mem, st, 3, lim, n_best=3, return_attention=True,
                                                       coverage=0.5)):
        same(search(one, *encode(one, tokenizer, SENTENCES)), search(model, *encode(model, tokenizer, SENTENCES)))
    ids = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21, 34])
    alone = greedy(model, *encode(model, tokenizer, SENTENCES), vocab=model.output_vocab(ids))
    same(greedy(one, *encode(one, tokenizer, SENTENCES), vocab=one.output_vocab(ids)), alone)


def reference_greedy(models, tokenizer, sentence: str, ratio: float = 1.5):
    """Greedy decoding of one sentence, written out: at each step every model's log-softmax, their
    mean, normalised, PAD and BOS never produced, EOS forced at the length limit; the summed score
    and the mean attention of each step."""
    encoded = [encode(m, tokenizer, [sentence], ratio) for m in models]
    limit = int(encoded[0][2][0])
    states = [state for _, state, _ in encoded]
    prev, tokens, score, attention = torch.tensor([BOS]), [], 0.0, []
    for t in range(limit):
        logps, weights = [], []
        for i, (model, (memory, _, _)) in enumerate(zip(models, encoded)):
            logits, states[i], w = model.decode_step(prev, memory, states[i])
            logps.append(torch.log_softmax(logits[0].float(), -1))
            weights.append(w[0])
        logp = torch.log_softmax(sum(logps) / len(models), -1)
        for banned in NOT_OUTPUT:
            logp[banned] = float("-inf")
        token = EOS if t + 1 >= limit else int(logp.argmax())
        score += float(logp[token])
        attention.append(sum(weights) / len(models))
        if token == EOS:
            break
        tokens.append(token)
        prev = torch.tensor([token])
    return tokens, score, torch.stack(attention)


@torch.no_grad()
def test_an_ensemble_of_two_is_the_mean_of_their_log_probabilities_step_by_step(tokenizer, pair):
    ensemble = Ensemble(pair).eval()
    got = greedy(ensemble, *encode(ensemble, tokenizer, SENTENCES), return_attention=True)
    differs = False
    for sentence, (hyp,) in zip(SENTENCES, got):
        tokens, score, attention = reference_greedy(pair, tokenizer, sentence)
        assert hyp.tokens == tokens and hyp.score == pytest.approx(score, abs=1e-4)
        torch.testing.assert_close(hyp.attention, attention, atol=1e-5, rtol=1e-5)
        differs |= all(reference_greedy([m], tokenizer, sentence)[0] != tokens for m in pair)
    assert differs, "the ensemble decodes as one of its models on every sentence: the test shows nothing"


class PlainMean:
    """The mean of two models' log-probabilities as a model, written plainly: stacked states and
    memories as lists, no ``Ensemble`` code."""

    def __init__(self, models):
        self.models = models

    def encode(self, src, lengths, mask):
        out = [m.encode(src, lengths, mask) for m in self.models]
        return _Listed([m for m, _ in out], out[0][0].mask), _Listed([s for _, s in out])

    def decode_step(self, prev, memory, state, vocab=None):
        assert vocab is None
        out = [m.decode_step(prev, mem, st) for m, mem, st in zip(self.models, memory.items, state.items)]
        logp = torch.stack([torch.log_softmax(logits.float(), -1) for logits, _, _ in out]).mean(0)
        return logp, _Listed([s for _, s, _ in out]), torch.stack([w.float() for _, _, w in out]).mean(0)


class _Listed:
    def __init__(self, items, mask=None):
        self.items, self.mask = items, mask

    def select(self, index):
        return _Listed([item.select(index) for item in self.items], None if self.mask is None else self.mask[index])


@torch.no_grad()
def test_beam_and_n_best_over_an_ensemble_are_those_over_a_plain_mean_and_beam_1_is_greedy(tokenizer, pair):
    ensemble = Ensemble(pair).eval()
    memory, state, limits = encode(ensemble, tokenizer, SENTENCES)
    plain = PlainMean(pair)
    got = beam_search(ensemble, memory, state, 4, limits, n_best=3, return_attention=True)
    plain_memory, plain_state, _ = encode(plain, tokenizer, SENTENCES)
    want = beam_search(plain, plain_memory, plain_state, 4, limits, n_best=3, return_attention=True)
    for x, y in zip(got, want):
        assert [h.tokens for h in x] == [h.tokens for h in y]
        assert [h.score for h in x] == pytest.approx([h.score for h in y], abs=1e-5)
    one = beam_search(ensemble, memory, state, 1, limits, alpha=0.0)
    for (b,), (g,) in zip(one, greedy(ensemble, memory, state, limits)):
        assert b.tokens == g.tokens and b.score == pytest.approx(g.score, abs=1e-5)


def test_the_shortlist_of_an_ensemble_is_the_union_of_its_models_shortlists(tokenizer):
    lexicons = (lexicon_of(tokenizer, 5), lexicon_of(tokenizer, 6))
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(ids + [EOS]) for ids in tokenizer.encode_src(SENTENCES)],
                                          batch_first=True)
    union = EnsembleLexicon(lexicons).shortlist(src, 3, 5)
    own = [[i for i, ok in zip(union.ids.tolist(), row) if ok] for row in union.allowed.tolist()]
    grew = False
    for row, sentence in zip(own, src):
        alone = [set(lexicon.shortlist(sentence[sentence != 0].unsqueeze(0), 3, 5).ids.tolist())
                 for lexicon in lexicons]
        assert row == sorted(alone[0] | alone[1])
        grew |= alone[0] != alone[1]
    assert grew, "the two lexicons give the same shortlists: the test shows nothing"
    assert ensemble_lexicon([lexicons[0]]) is lexicons[0] and ensemble_lexicon([lexicons[0], None]) is None
    # the target letters (fold_accents) come from both models' target pieces, or from neither where one lacks counts
    assert torch.equal(EnsembleLexicon(lexicons).target_counts, lexicons[0].target_counts + lexicons[1].target_counts)
    older = Lexicon(lexicons[1].translations, lexicons[1].frequent)
    assert EnsembleLexicon((lexicons[0], older)).target_counts is None


@pytest.mark.parametrize("beam", [1, 3])
def test_a_batch_decodes_as_its_sentences_one_by_one_with_the_union_of_shortlists(tokenizer, pair, beam):
    lexicon = EnsembleLexicon((lexicon_of(tokenizer, 5), lexicon_of(tokenizer, 6)))
    options = DecodeOptions(beam=beam, n_best=beam, shortlist=3, shortlist_frequent=5, inter_threads=1)
    translator = Translator(Ensemble(pair), tokenizer, options, lexicon=lexicon)
    together = translator.translate(SENTENCES)
    for sentence, nbest in zip(SENTENCES, together):
        alone = translator.translate([sentence])[0]
        assert [t.text for t in alone] == [t.text for t in nbest]
        assert [t.score for t in alone] == pytest.approx([t.score for t in nbest], abs=1e-5)


@pytest.mark.skipif(not int8_available(), reason="this torch build lacks the int8 kernels")
def test_int8_decodes_the_ensemble_of_the_models_int8_copies(tokenizer, pair):
    options = DecodeOptions(beam=3, inter_threads=1, shortlist=0)
    got = Translator(Ensemble(pair), tokenizer, options, precision="int8")
    assert got.precision == "int8" and all(m is not p for m, p in zip(got.model.models, pair))
    want = Translator(Ensemble([quantized_copy(m) for m in pair]), tokenizer, options, precision="fp32")
    assert [n[0].text for n in got.translate(SENTENCES)] == [n[0].text for n in want.translate(SENTENCES)]


def save(path, model, tokenizer, architecture: int, lexicon=None):
    payload = {"config": config_of(architecture).to_dict(), "model": model.state_dict(),
               "tokenizer": {"src": tokenizer.src_proto, "tgt": tokenizer.tgt_proto},
               "tokenizer_fingerprint": tokenizer.fingerprint, "progress": {"step": 7}}
    if lexicon is not None:
        payload["lexicon"] = lexicon.state()
    save_checkpoint(path, payload)
    return str(path)


def test_the_command_line_decodes_scores_and_evaluates_an_ensemble(tokenizer, pair, tmp_path):
    first = save(tmp_path / "a.pt", pair[0], tokenizer, 0, lexicon_of(tokenizer, 5))
    second = save(tmp_path / "b.pt", pair[1], tokenizer, 1, lexicon_of(tokenizer, 6))
    options = DecodeOptions(beam=2, inter_threads=1, shortlist=3)
    translator = Translator.load(first, options, "fp32", "cpu", ensemble=[second])
    assert isinstance(translator.model, Ensemble) and isinstance(translator.lexicon, EnsembleLexicon)
    want = [n[0].text for n in translator.translate(SENTENCES)]
    assert want != [n[0].text for n in Translator.load(first, options, "fp32", "cpu").translate(SENTENCES)]
    runner = CliRunner()
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    ref.write_text("".join(t + "\n" for t in want), encoding="utf-8")
    flags = ["--ensemble", second, "--fp32", "--device", "cpu", "--shortlist", "3"]
    decoded = runner.invoke(main, ["decode", first, *flags, "--beam", "2", "--inter-threads", "1", "-i", str(src)])
    assert decoded.exit_code == 0, decoded.output
    assert decoded.output.splitlines() == want
    out = tmp_path / "scores.txt"
    scored = runner.invoke(main, ["score", first, *flags, "--src", str(src), "--ref", str(ref), "-o", str(out)])
    assert scored.exit_code == 0, scored.output
    pairs = translator.score_pairs(SENTENCES, want)
    assert out.read_text().splitlines() == [f"{p.per_piece:.4f}\t{p.logprob:.4f}" for p in pairs]
    evaluated = runner.invoke(main, ["eval", first, *flags, "--beam", "2", "--inter-threads", "1", "--src", str(src),
                                     "--ref", str(ref), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert '"bleu": 100.0' in evaluated.output
    typed = runner.invoke(main, ["repl", first, *flags, "--beam", "2"], input=SENTENCES[0] + "\n")
    assert typed.exit_code == 0, typed.output
    assert want[0] in typed.output
    assert model_info(first, 7, [second]) == {"model": "a.pt", "step": 7, "ensemble": ["b.pt"]}


def test_models_with_different_tokenizers_are_a_one_line_error_naming_both(tokenizer, pair, tmp_path):
    pairs = make_pairs(600, seed=1)
    other = Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=70)
    assert other.fingerprint != tokenizer.fingerprint
    first = save(tmp_path / "a.pt", pair[0], tokenizer, 0)
    model = build_model(config_of(0).model, other.src_vocab_size, other.tgt_vocab_size)
    second = save(tmp_path / "other.pt", model, other, 0)
    result = CliRunner().invoke(main, ["decode", first, "--ensemble", second, "--device", "cpu"], input="Hola.\n")
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]
    assert first in message and second in message and "tokenizer" in message
    assert "Traceback" not in result.output
