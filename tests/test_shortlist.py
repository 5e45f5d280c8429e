"""Decoding shortlists: the IBM Model 1 lexicon against a plain reference, the shortlists it gives,
and searches over a shortlist against searches over the whole vocabulary masked to it."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from translate.checkpoint import load_checkpoint
from translate.cli import main
from translate.encoded import Encoded
from translate.errors import CheckpointError
from translate.quantize import int8_available, quantized_copy
from translate.search import beam_search, greedy
from translate.shortlist import SPECIAL, TOP, Lexicon, build_lexicon
from translate.tokenizer import EOS
from translate.translator import DecodeOptions, Translator

from .conftest import SENTENCES, encode


def ibm1_reference(pairs, iterations):
    """IBM Model 1 as the textbook writes it (Koehn, 2010, figure 4.3), the source EOS as the empty word."""
    t = {}
    for src, tgt in pairs:
        for s in [*src, EOS]:
            for w in tgt:
                t[(s, w)] = 1.0
    for _ in range(iterations):
        count, total = {}, {}
        for src, tgt in pairs:
            src = [*src, EOS]
            for w in tgt:
                norm = sum(t[(s, w)] for s in src)
                for s in src:
                    share = t[(s, w)] / norm
                    count[(s, w)] = count.get((s, w), 0.0) + share
                    total[s] = total.get(s, 0.0) + share
        t = {(s, w): c / total[s] for (s, w), c in count.items()}
    return t


def random_pairs(n, src_vocab, tgt_vocab, seed=0):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        src = [rng.randrange(SPECIAL, src_vocab) for _ in range(rng.randint(1, 6))]
        tgt = [rng.randrange(SPECIAL, tgt_vocab) for _ in range(rng.randint(1, 6))]
        pairs.append((src, tgt))
    return pairs


def test_the_lexicon_ranks_as_plain_ibm_model_1():
    pairs = random_pairs(60, 14, 12)
    lexicon = build_lexicon(Encoded([s for s, _ in pairs]), Encoded([t for _, t in pairs]), 14, 12, iterations=4)
    reference = ibm1_reference(pairs, 4)
    compared = 0
    for s in range(14):
        ranked = sorted(((p, -w) for (src, w), p in reference.items() if src == s), reverse=True)
        expected = [-negative for _, negative in ranked]
        got = [w for w in lexicon.translations[s].tolist() if w >= 0]
        assert len(got) == len(expected), s
        for i in range(len(expected) - 1):  # positions whose probabilities are not a near tie
            if ranked[i][0] - ranked[i + 1][0] > 1e-4:
                assert set(got[: i + 1]) == set(expected[: i + 1]), (s, i)
                compared += 1
    assert compared > 20
    assert (lexicon.translations[:SPECIAL - 1] == -1).all()  # PAD, UNK, BOS never occur in a source


def test_the_lexicon_finds_a_word_for_word_mapping():
    rng = random.Random(1)
    mapping = {s: 40 - s for s in range(SPECIAL, 30)}  # source piece s is target piece 40 - s
    pairs = []
    for _ in range(400):
        src = [rng.randrange(SPECIAL, 30) for _ in range(rng.randint(2, 7))]
        tgt = [mapping[s] for s in src]
        rng.shuffle(tgt)  # in any order
        pairs.append((src, tgt))
    lexicon = build_lexicon(Encoded([s for s, _ in pairs]), Encoded([t for _, t in pairs]), 30, 41)
    assert all(int(lexicon.translations[s, 0]) == t for s, t in mapping.items())
    counts = torch.bincount(torch.tensor([w for _, tgt in pairs for w in tgt]), minlength=41)
    assert (counts[lexicon.frequent.long()].diff() <= 0).all()  # most frequent first
    assert sorted(lexicon.frequent.tolist()) == list(range(41))
    assert torch.equal(lexicon.target_counts, counts)  # every pair fitted: the targets' own counts
    again = Lexicon.from_state(lexicon.state())
    assert torch.equal(again.target_counts, counts) and again.check(30, 41) is again
    with pytest.raises(CheckpointError, match="target counts do not fit"):
        again.check(30, 40 + 2)
    assert Lexicon.from_state({k: v for k, v in lexicon.state().items() if k != "target_counts"}).target_counts is None
    accented = dataclasses.replace(lexicon, accented=torch.tensor([5, 29], dtype=torch.int32))
    assert torch.equal(Lexicon.from_state(accented.state()).accented, accented.accented)
    assert lexicon.accented is None and "accented" not in lexicon.state()  # not counted: not known
    with pytest.raises(CheckpointError, match="accented words hold source ids outside"):
        dataclasses.replace(lexicon, accented=torch.tensor([30], dtype=torch.int32)).check(30, 41)


def test_pieces_outside_the_sample_still_get_their_translations():
    # pairs beyond max_links are left out, but not the pieces only they hold: a rare name or number
    rng = random.Random(2)
    mapping = {s: 60 - s for s in range(SPECIAL, 40)}  # source piece s is target piece 60 - s
    pairs = []
    for _ in range(600):  # pieces 4 to 29 are common, in sentences of 2 to 7
        src = [rng.randrange(SPECIAL, 30) for _ in range(rng.randint(2, 7))]
        pairs.append((src, [mapping[s] for s in src]))
    for rare in range(30, 40):  # each of 30 to 39 in one pair, among the common ones
        src = [rng.randrange(SPECIAL, 30), rare, rng.randrange(SPECIAL, 30)]
        pairs.insert(rng.randrange(len(pairs)), (src, [mapping[s] for s in src]))
    src, tgt = Encoded([s for s, _ in pairs]), Encoded([t for _, t in pairs])
    total = int(((src.lengths + 1) * tgt.lengths).sum())
    lexicon = build_lexicon(src, tgt, 40, 61, max_links=total // 8)
    assert all(int(lexicon.translations[s, 0]) == t for s, t in mapping.items())
    whole = build_lexicon(src, tgt, 40, 61)
    assert torch.equal(lexicon.translations[30:40, 0], whole.translations[30:40, 0])


def own_shortlists(shortlist):
    return [[i for i, ok in zip(shortlist.ids.tolist(), row) if ok] for row in shortlist.allowed.tolist()]


def test_a_shortlist_is_the_specials_the_frequent_and_the_translations_of_each_sentence():
    translations = torch.full((10, TOP), -1, dtype=torch.int32)
    translations[5, :3] = torch.tensor([20, 21, 22])
    translations[6, :2] = torch.tensor([23, 7])
    translations[EOS, :1] = torch.tensor([24])
    translations[0, :1] = torch.tensor([25])  # (PAD's: never a sentence's, since padding is no source piece)
    lexicon = Lexicon(translations, torch.tensor([9, 8, 30, 31, 0, 1], dtype=torch.int32))
    src = torch.tensor([[5, 6, EOS], [6, EOS, 0]])  # 0: padding
    batch = lexicon.shortlist(src, per_piece=2, frequent=2)
    assert batch.ids.tolist() == [0, 1, 2, 3, 7, 8, 9, 20, 21, 23, 24]  # the union: the columns scored
    assert own_shortlists(batch) == [[0, 1, 2, 3, 7, 8, 9, 20, 21, 23, 24], [0, 1, 2, 3, 7, 8, 9, 23, 24]]
    batch = lexicon.shortlist(src, per_piece=1, frequent=0)
    assert own_shortlists(batch) == [[0, 1, 2, 3, 20, 23, 24], [0, 1, 2, 3, 23, 24]]
    for row, sentence in zip(own_shortlists(batch), src):  # a sentence's own is its shortlist alone
        alone = lexicon.shortlist(sentence[sentence != 0].unsqueeze(0), per_piece=1, frequent=0)
        assert alone.ids.tolist() == row and alone.allowed.all()
    with pytest.raises(ValueError, match="per_piece must be from 1 to 64"):
        lexicon.shortlist(src, per_piece=0, frequent=2)
    again = Lexicon.from_state(lexicon.state())
    assert torch.equal(again.translations, translations) and torch.equal(again.frequent, lexicon.frequent)


def shortlist_ids(vocab_size, seed=0):
    ids = torch.randperm(vocab_size - SPECIAL, generator=torch.Generator().manual_seed(seed))[: vocab_size // 3]
    return torch.cat([torch.arange(SPECIAL), ids + SPECIAL]).sort().values


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_a_restricted_step_gives_the_full_steps_columns(search_model, tokenizer, int8):
    if int8 and not int8_available():
        pytest.skip("this torch build has no int8 kernels")
    model = quantized_copy(search_model) if int8 else search_model
    memory, state, _ = encode(model, tokenizer, SENTENCES)
    ids = shortlist_ids(tokenizer.tgt_vocab_size)
    prev = torch.tensor([EOS, 5, 9, 12, 30])
    with torch.no_grad():
        full, full_state, _ = model.decode_step(prev, memory, state)
        part, part_state, _ = model.decode_step(prev, memory, state, model.output_vocab(ids))
    assert part.shape == (len(SENTENCES), len(ids))
    torch.testing.assert_close(part, full[:, ids], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part_state.hidden, full_state.hidden)


class Masked:
    """The reference: the whole vocabulary scored, every token outside ``ids`` at -inf."""

    def __init__(self, model, ids):
        self.model = model
        self.outside = torch.ones(model.decoder.output.out_features, dtype=torch.bool)
        self.outside[ids] = False

    def decode_step(self, prev, memory, state, vocab=None):
        assert vocab is None
        logits, state, weights = self.model.decode_step(prev, memory, state)
        return logits.masked_fill(self.outside, float("-inf")), state, weights


@pytest.mark.parametrize("beam", [1, 3])
def test_search_over_a_shortlist_is_search_over_the_vocabulary_masked_to_it(search_model, tokenizer, beam):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    ids = shortlist_ids(tokenizer.tgt_vocab_size, seed=beam)
    vocab = search_model.output_vocab(ids)
    if beam == 1:
        got = greedy(search_model, memory, state, limits, vocab=vocab)
        expected = greedy(Masked(search_model, ids), memory, state, limits)
    else:
        got = beam_search(search_model, memory, state, beam, limits, n_best=beam, vocab=vocab)
        expected = beam_search(Masked(search_model, ids), memory, state, beam, limits, n_best=beam)
    allowed = set(ids.tolist())
    for mine, theirs in zip(got, expected):
        assert [h.tokens for h in mine] == [h.tokens for h in theirs]
        assert [h.score for h in mine] == pytest.approx([h.score for h in theirs], abs=1e-4)
        assert all(set(h.tokens) <= allowed for h in mine)
    whole = search_model.output_vocab(torch.arange(tokenizer.tgt_vocab_size))
    unrestricted = greedy(search_model, memory, state, limits)
    assert [h[0].tokens for h in greedy(search_model, memory, state, limits, vocab=whole)] == \
        [h[0].tokens for h in unrestricted]


def lexicon_for(tokenizer, per_source=3):
    """A lexicon that lets each source piece through to a few target pieces of its own."""
    translations = torch.full((tokenizer.src_vocab_size, TOP), -1, dtype=torch.int32)
    rng = torch.Generator().manual_seed(0)
    for s in range(SPECIAL, tokenizer.src_vocab_size):
        translations[s, :per_source] = torch.randint(SPECIAL, tokenizer.tgt_vocab_size, (per_source,), generator=rng)
    frequent = torch.arange(tokenizer.tgt_vocab_size, dtype=torch.int32)
    return Lexicon(translations, frequent)


def test_the_translator_scores_each_batchs_shortlist_or_with_0_the_whole_vocabulary(search_model, tokenizer):
    lexicon = lexicon_for(tokenizer)
    one_by_one = DecodeOptions(beam=2, batch_sentences=1, inter_threads=1, shortlist_frequent=5)
    plain = Translator(search_model, tokenizer, one_by_one)
    listed = Translator(search_model, tokenizer, one_by_one, lexicon=lexicon)
    off = DecodeOptions(beam=2, batch_sentences=1, inter_threads=1, shortlist=0)
    assert [[t.tokens for t in n] for n in listed.translate(SENTENCES, off)] == \
        [[t.tokens for t in n] for n in plain.translate(SENTENCES)]
    encoded = tokenizer.encode_src(SENTENCES)
    for ids, nbest, full in zip(encoded, listed.translate(SENTENCES), plain.translate(SENTENCES)):
        allowed = set(lexicon.shortlist(torch.tensor([ids + [EOS]]), one_by_one.shortlist, 5).ids.tolist())
        assert set(nbest[0].tokens) <= allowed
        if not set(full[0].tokens) <= allowed:
            assert nbest[0].tokens != full[0].tokens


def test_bad_shortlist_options():
    from translate.errors import ConfigError

    with pytest.raises(ConfigError, match="shortlist must be from 0 .the whole vocabulary. to 64, not 65"):
        DecodeOptions(shortlist=65)
    with pytest.raises(ConfigError, match="shortlist_frequent must be 0 or more"):
        DecodeOptions(shortlist_frequent=-1)
    result = CliRunner().invoke(main, ["decode", "nowhere.pt", "--shortlist", "65"])
    assert result.exit_code == 2 and "65 is not in the range 0<=x<=64" in result.output


def test_the_lexicon_keeps_how_many_words_the_training_sources_hold():
    rng = np.random.default_rng(3)
    starts = np.zeros(30, dtype=bool)
    starts[[5, 7, 9]] = True  # pieces that start a word; the others go on one
    sources = [rng.integers(4, 30, rng.integers(1, 40)).tolist() for _ in range(2000)]
    targets = [rng.integers(4, 20, 5).tolist() for _ in sources]
    lexicon = build_lexicon(Encoded(sources), Encoded(targets), 30, 20, iterations=1, word_starts=starts)
    words = [sum(starts[i] for i in source) for source in sources]
    assert lexicon.source_words == int(np.ceil(np.percentile(words, 99.9))) and lexicon.source_words > 5
    assert build_lexicon(Encoded(sources), Encoded(targets), 30, 20, iterations=1).source_words == 0  # not asked
    again = Lexicon.from_state(lexicon.state())
    assert again.source_words == lexicon.source_words and torch.equal(again.translations, lexicon.translations)
    older = {"translations": lexicon.translations, "frequent": lexicon.frequent}  # a checkpoint from before
    assert Lexicon.from_state(older).source_words == 0


def test_runs_keep_their_lexicon_in_every_checkpoint_and_average(run_with_steps, tmp_path):
    last = load_checkpoint(run_with_steps / "last.pt")["lexicon"]
    assert last["translations"].shape[1] == TOP and (last["translations"][EOS] >= 0).any()
    assert int(last["source_words"][0]) > 0  # the run's sources' length, counted
    assert last["accented"].dtype == torch.int32 and last["accented"].dim() == 1  # counted (none in these sources)
    for name in ("best.pt", "step-20.pt", "step-30.pt"):
        saved = load_checkpoint(run_with_steps / name)["lexicon"]
        assert torch.equal(saved["translations"], last["translations"]), name
    out = tmp_path / "avg.pt"
    assert CliRunner().invoke(main, ["average", str(run_with_steps), "--last", "2", "-o", str(out)]).exit_code == 0
    assert torch.equal(load_checkpoint(out)["lexicon"]["frequent"], last["frequent"])
    translator = Translator.load(out)
    assert translator.lexicon is not None and torch.equal(translator.lexicon.frequent, last["frequent"])


def bundled_test_sentences(n):
    from translate.config import BUNDLED_DATA

    lines = (BUNDLED_DATA / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines[:n]]


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_each_sentence_decodes_alike_alone_and_batched_with_any_others(run_with_steps, beam, precision):
    # each sentence's shortlist is its own: the union a batch scores may not change what it may produce;
    # and in int8 (the CPU default) each sentence's activations are quantised with scales of their own
    if precision == "int8" and not int8_available():
        pytest.skip("this torch build has no fbgemm int8 kernels")
    options = DecodeOptions(beam=beam, n_best=beam, shortlist=2, shortlist_frequent=4, inter_threads=1)
    translator = Translator.load(run_with_steps / "last.pt", options, precision=precision)
    assert translator.precision == precision
    sentences = bundled_test_sentences(40)
    alone = {s: translator.translate([s])[0] for s in sentences}
    rng = random.Random(beam)
    for _ in range(3):
        chosen = rng.sample(sentences, rng.randint(2, len(sentences)))  # a random subset in a random order
        for sentence, nbest in zip(chosen, translator.translate(chosen)):
            assert [t.text for t in nbest] == [t.text for t in alone[sentence]], sentence
            assert [t.score for t in nbest] == pytest.approx([t.score for t in alone[sentence]], abs=1e-4)
    batch = translator.lexicon.shortlist(torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, 0]]), 2, 4)
    assert not batch.allowed.all()  # the sentences' shortlists differ, so the test can tell


def test_scores_of_pairs_use_the_shortlist_that_decoding_uses(run_with_steps):
    from dataclasses import replace

    from .conftest import make_pairs

    options = DecodeOptions(beam=1, shortlist=2, shortlist_frequent=4, no_repeat_ngram=0, copy_unknown=False,
                            restore_casual=False, split="none", inter_threads=1)
    translator = Translator.load(run_with_steps / "last.pt", options, precision="fp32")
    sources = [s for s, _ in make_pairs(40, seed=5)]  # a tiny model's outputs: not all re-encode as made
    best = [nbest[0] for nbest in translator.translate(sources)]
    scored = translator.score_pairs(sources, [t.text for t in best])
    compared = 0
    for hyp, pair in zip(best, scored):  # greedy's score is the log-probability of what it produced
        if translator.tokenizer.encode_tgt([hyp.text])[0] == hyp.tokens:
            assert pair.logprob == pytest.approx(hyp.score, abs=1e-4)
            compared += 1
    assert compared >= 10
    whole = translator.score_pairs(sources, [t.text for t in best], replace(options, shortlist=0))
    assert all(w.logprob < s.logprob for w, s in zip(whole, scored))  # normalised over every piece: less each
    outside = [i for i in range(SPECIAL, translator.tokenizer.tgt_vocab_size)
               if i not in translator.lexicon.shortlist(torch.tensor([[EOS]]), 2, 4).ids.tolist()]
    text = translator.tokenizer.decode_tgt([[outside[0]]])[0]
    assert translator.score_pairs([""], [text])[0].logprob == float("-inf")  # decoding could not produce it
