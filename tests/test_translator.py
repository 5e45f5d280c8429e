"""The Translator: options, precisions, batching and threads, streaming, loading a checkpoint."""

import dataclasses
import json
import os
import pickle
import re
import threading
from dataclasses import replace

import pytest
import torch

from translate import translator as translator_module
from translate.casual import kept_capitals
from translate.checkpoint import save_checkpoint
from translate.config import load_config
from translate.encoded import Encoded
from translate.errors import ConfigError, UserError
from translate.model import build_model
from translate.quantize import Int8Linear
from translate.search import beam_search
from translate.translator import DecodeOptions, Translator, decode_workers

from .conftest import SENTENCES, encode


def texts(nbests):
    return [[t.text for t in nbest] for nbest in nbests]


def test_options_are_hashable_values():
    assert DecodeOptions() == DecodeOptions(beam=5) and hash(DecodeOptions()) == hash(DecodeOptions(beam=5))
    assert len({DecodeOptions(), DecodeOptions(beam=1), DecodeOptions()}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        DecodeOptions().beam = 3


@pytest.mark.parametrize("options, message", [
    ({"beam": 2, "n_best": 3}, "n_best (3) cannot exceed the beam size (2)"),
    ({"beam": 0}, "beam must be an integer from 1 to 64, not 0"),
    ({"n_best": 0}, "n_best must be an integer from 1 to 64"),
    ({"batch_tokens": 0}, "batch_tokens must be 1 or more"),
    ({"max_src_len": 0}, "max_src_len must be 1 or more"),
    ({"batch_sentences": -1}, "batch_sentences must be 0 or more"),
    ({"inter_threads": -2}, "inter_threads must be an integer from 0 to 64"),
    ({"max_len_ratio": 0.0}, "max_len_ratio must be positive and at most 100, not 0.0"),
    ({"max_len_ratio": float("inf")}, "max_len_ratio must be positive and at most 100, not inf"),
    ({"alpha": float("nan")}, "alpha must be a number from 0 to 100, not nan"),
    ({"beam": "3"}, "beam must be an integer from 1 to 64, not '3'"),
    ({"return_attention": 1}, "return_attention must be True or False"),
    ({"copy_unknown": "yes"}, "copy_unknown must be True or False"),
    ({"fold_accents": 0}, "fold_accents must be True or False, not 0"),
    ({"copy_numbers": "yes"}, "copy_numbers must be True or False, not 'yes'"),
    ({"split": "words"}, "split must be one of sentences, clauses, phrases, none, not 'words'"),
])
def test_bad_options_say_what_is_wrong(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DecodeOptions(**options)


def _outside(name: str) -> list[tuple[str, float]]:
    """Values of option ``name`` just outside its bounds, below and (where it has one) above."""
    bound = DecodeOptions.BOUNDS[name]
    step = 1 if bound.kind is int else 0.5
    values = [bound.low if bound.low_open else bound.low - step]
    if bound.high is not None:
        values.append(bound.high + step)
    return [(name, value) for value in values]


def test_every_option_but_the_attention_flag_has_its_bounds():
    fields = {f.name for f in dataclasses.fields(DecodeOptions)}
    # checked on their own
    switches = {"return_attention", "restore_casual", "copy_unknown", "copy_numbers", "fold_accents", "split", "sample",
                "prefix", "glossary"}
    assert set(DecodeOptions.BOUNDS) == fields - switches
    assert DecodeOptions.BOUNDS["beam"].high == DecodeOptions.MAX_BEAM
    edges = {name: bound.high if bound.high is not None else bound.low + 1 for name, bound in
             DecodeOptions.BOUNDS.items()}
    edges["n_best"] = edges["beam"]  # at most the beam
    assert DecodeOptions(**edges) == DecodeOptions(**edges)  # the highest values are allowed...
    lowest = {name: bound.low for name, bound in DecodeOptions.BOUNDS.items() if not bound.low_open}
    assert DecodeOptions(**lowest).beam == 1  # ...and so are the lowest


@pytest.mark.parametrize("name, value", [case for name in DecodeOptions.BOUNDS for case in _outside(name)])
def test_cli_serve_and_repl_reject_what_decode_options_rejects(name, value):
    from types import SimpleNamespace

    from click.testing import CliRunner

    from translate.cli import DECODING_FLAGS, main
    from translate.errors import RequestError
    from translate.repl import Repl
    from translate.serve import OPTION_FIELDS, parse_request

    message = f"must be {DecodeOptions.BOUNDS[name].describe()}, not {value!r}"
    with pytest.raises(ConfigError, match=re.escape(f"{name} {message}")):
        DecodeOptions(**{name: value})
    if name in DECODING_FLAGS:  # the flag's range is the bound (checked before the checkpoint is looked for)
        flag = "--" + name.replace("_", "-")
        result = CliRunner().invoke(main, ["decode", "nowhere.pt", flag, str(value)])
        assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output
        assert "is not in the range" in result.output
    if name in OPTION_FIELDS:  # a request's field, named as the request names it
        with pytest.raises(RequestError, match=re.escape(f'"{name}" {message}')) as error:
            parse_request(json.dumps({"sentences": ["a"], name: value}).encode(), 8, 100)
        assert error.value.status == 400
    if name == "beam":
        repl = Repl(SimpleNamespace(tokenizer=None, options=DecodeOptions()))
        assert repl.command(f":beam {value}") == (f"usage: :beam N; {name} {message}", False)
        assert repl.options.beam == DecodeOptions().beam


def test_precisions_leave_the_model_alone(search_model, tokenizer, monkeypatch):
    model = search_model
    plain = Translator(model, tokenizer)
    assert plain.model is model and plain.dtype is None
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        Translator(model, tokenizer, precision="fp8")
    monkeypatch.setattr(translator_module, "cpu_has_bf16", lambda: False)
    emulated = Translator(model, tokenizer, precision="bf16")
    assert emulated.model is model and emulated.precision == "fp32" and "no native bf16" in emulated.note
    monkeypatch.setattr(translator_module, "cpu_has_bf16", lambda: True)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    fast = Translator(model, tokenizer, precision="bf16")
    assert fast.model is not model and next(fast.model.parameters()).dtype == torch.bfloat16
    assert fast.dtype == torch.bfloat16  # decodes under autocast, which keeps softmax in fp32
    small = Translator(model, tokenizer, precision="int8")
    assert small.model is not model and isinstance(small.model.decoder.output, Int8Linear)
    assert isinstance(model.decoder.output, torch.nn.Linear) and next(model.parameters()).dtype == torch.float32
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), name
    for translator in (fast, small):
        out = translator.translate(SENTENCES, DecodeOptions(beam=3))
        assert len(out) == len(SENTENCES) and all(isinstance(t[0].text, str) for t in out)
        assert all(torch.isfinite(torch.tensor(t[0].score)) for t in out)


def test_translations_are_the_searches_in_input_order(search_model, tokenizer):
    # batches of two sentences, taken in length order, and put back in the order they came in
    model = search_model
    options = DecodeOptions(beam=3, n_best=2, max_len_ratio=1.5, batch_sentences=2, inter_threads=1)
    out = Translator(model, tokenizer, options).translate(SENTENCES)
    memory, state, limits = encode(model, tokenizer, SENTENCES, ratio=1.5)
    for nbest, hyps in zip(out, beam_search(model, memory, state, 3, limits, options.alpha, n_best=2,
                                            no_repeat_ngram=options.no_repeat_ngram)):
        assert [t.tokens for t in nbest] == [h.tokens for h in hyps]
        assert [t.text for t in nbest] == tokenizer.decode_tgt([h.tokens for h in hyps])
        assert [t.score for t in nbest] == pytest.approx([h.score for h in hyps], abs=1e-4)


def test_options_given_to_a_call_replace_the_defaults(search_model, tokenizer):
    translator = Translator(search_model, tokenizer, DecodeOptions(beam=1))
    assert all(len(nbest) == 1 for nbest in translator.translate(SENTENCES))
    three = translator.translate(SENTENCES, DecodeOptions(beam=3, n_best=3))
    assert texts(three) == texts(Translator(search_model, tokenizer, DecodeOptions(beam=3, n_best=3))
                                 .translate(SENTENCES))
    assert max(len(nbest) for nbest in three) == 3


@pytest.mark.parametrize("processes", [False, True])
def test_batches_in_parallel_equal_one_at_a_time(search_model, tokenizer, monkeypatch, processes):
    threads = torch.get_num_threads()
    assert threading.active_count() == 1, threading.enumerate()  # no test leaves a thread behind: forking is safe
    monkeypatch.setattr(translator_module, "can_fork", lambda device: processes)
    runs = []
    for name in ("_in_parallel", "_in_processes"):
        run = getattr(translator_module, name)
        monkeypatch.setattr(translator_module, name, lambda *args, run=run, name=name: runs.append(name) or run(*args))
    translator = Translator(search_model, tokenizer, DecodeOptions(batch_sentences=2))
    alone = translator.translate(SENTENCES, DecodeOptions(beam=3, n_best=2, batch_sentences=2, inter_threads=1,
                                                          return_attention=True))
    for beam in (3, 1):
        options = DecodeOptions(beam=beam, n_best=min(beam, 2), batch_sentences=2, inter_threads=2,
                                return_attention=True)
        parallel = translator.translate(SENTENCES, options)
        if beam == 3:
            assert [[t.tokens for t in n] for n in parallel] == [[t.tokens for t in n] for n in alone]
            assert [t.score for n in parallel for t in n] == pytest.approx([t.score for n in alone for t in n],
                                                                           abs=1e-4)
            for n, m in zip(parallel, alone):  # attention comes back from a process as a tensor too
                assert all(torch.allclose(t.attention, u.attention, atol=1e-5) for t, u in zip(n, m))
        assert len(parallel) == len(SENTENCES) and all(len(n) == min(beam, 2) for n in parallel)
    assert runs == ["_in_parallel"] + 2 * ["_in_processes" if processes else "_in_parallel"]
    assert torch.get_num_threads() == threads  # the workers' share is not left behind


def _die(item):
    os._exit(3)  # as a process that the kernel kills for memory


def test_a_decoding_process_that_dies_is_a_one_line_error(search_model, tokenizer, monkeypatch):
    assert threading.active_count() == 1
    monkeypatch.setattr(translator_module, "can_fork", lambda device: True)
    monkeypatch.setattr(translator_module, "_run_in_process", _die)
    translator = Translator(search_model, tokenizer, DecodeOptions(batch_sentences=2, inter_threads=2))
    with pytest.raises(UserError, match="a decoding process ended without a result"):
        translator.translate(SENTENCES)


@pytest.mark.parametrize("beam", [3, 1])
def test_a_hypothesis_owns_its_attention_and_sends_no_more_out_of_a_process(search_model, tokenizer, beam):
    # a search's attention is a view of its tensor for the whole batch, which pickling a view (out of a
    # decoding process) would take along in full; the translator hands out copies of the same values
    translator = Translator(search_model, tokenizer)
    options = DecodeOptions(beam=beam, n_best=min(beam, 2), batch_sentences=len(SENTENCES), inter_threads=1,
                            return_attention=True)
    src = Encoded(tokenizer.encode_src(SENTENCES))
    batch, = translator_module.decode_batches(src, options)
    searched = translator._search(src, batch, options)  # the plain reference: the one batch searched
    got = dict(translator.translate_ids(src, options))
    assert sorted(got) == list(range(len(SENTENCES)))
    for index, hyps in zip(batch, searched):
        assert [h.tokens for h in got[index]] == [h.tokens for h in hyps]
        for mine, theirs in zip(got[index], hyps):
            assert torch.equal(mine.attention, theirs.attention)
            assert mine.attention.untyped_storage().nbytes() == mine.attention.numel() * mine.attention.element_size()
        assert len(pickle.dumps(got[index])) < len(pickle.dumps(hyps)) / 2


def test_decode_workers(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    threads = torch.get_num_threads()
    assert decode_workers(cpu, 3, 10, fork=False) == (3, False) and decode_workers(cpu, 3, 10, fork=True) == (3, True)
    assert decode_workers(cpu, 4, 2, fork=True) == (2, True) and decode_workers(cpu, 4, 1, fork=True) == (1, False)
    assert decode_workers(cuda, 0, 9, fork=True) == (1, False) and decode_workers(cuda, 3, 9) == (3, False)
    assert decode_workers(cpu, 0, 99, fork=False) == (min(2, threads), False)
    assert decode_workers(cpu, 0, 99, fork=True) == (threads, threads > 1)  # one process a thread
    assert not translator_module.can_fork(cuda)
    monkeypatch.setattr(translator_module.threading, "active_count", lambda: 2)  # as in a server
    assert not translator_module.can_fork(cpu)


def test_empty_and_odd_lines(search_model, tokenizer):
    lines = ["", "   ", "猫 🐈 ✓", "el gato " * 1250]  # the last: 10,000 characters
    truncated = []
    out = Translator(search_model, tokenizer, DecodeOptions(beam=2)).translate(lines, on_truncate=truncated.append)
    assert out[0][0].text == "" and out[1][0].text == ""
    assert all(isinstance(t[0].text, str) for t in out)
    assert truncated == [1]


def test_stream_equals_the_whole(search_model, tokenizer):
    lines = SENTENCES * 2 + ["", "el gato " * 300]
    translator = Translator(search_model, tokenizer, DecodeOptions(beam=2, max_src_len=50))
    truncated = []
    streamed = list(translator.stream(iter(lines), chunk_lines=3, on_truncate=truncated.append))
    assert texts(streamed) == texts(translator.translate(lines))
    assert truncated == [1]  # heard from the chunk that had the long line


def test_a_model_in_training_decodes_in_eval_mode_and_goes_on_training(tokenizer):
    # as validation during training uses it: fp32, no copy; dropout would make every decoding differ
    torch.manual_seed(5)
    config = load_config(overrides={"model.embed_dim": 16, "model.hidden_dim": 32, "model.dropout": 0.5})
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).train()
    translator = Translator(model, tokenizer, DecodeOptions(beam=2, inter_threads=1), amp=True)
    assert translator.model is model
    first, second = translator.translate(SENTENCES), translator.translate(SENTENCES)
    assert model.training
    assert [[t.score for t in n] for n in first] == [[t.score for t in n] for n in second]
    model.eval()
    assert texts(first) == texts(translator.translate(SENTENCES))


@pytest.fixture()
def checkpoint(tiny_model, tokenizer, tmp_path):
    config = load_config(overrides={"model.embed_dim": 16, "model.hidden_dim": 32, "model.dropout": 0.0,
                                    "train.amp": False})
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, {"config": config.to_dict(), "model": tiny_model.state_dict(),
                           "tokenizer": {"src": tokenizer.src_proto, "tgt": tokenizer.tgt_proto},
                           "tokenizer_fingerprint": tokenizer.fingerprint, "progress": {"step": 7}})
    return path


def test_load_reads_a_checkpoint(checkpoint, tiny_model, tokenizer):
    options = DecodeOptions(beam=2, n_best=2)
    loaded = Translator.load(checkpoint, options, precision="fp32", device=torch.device("cpu"))
    assert loaded.progress == {"step": 7} and loaded.config.model.hidden_dim == 32
    assert loaded.amp == "off" and loaded.options == options and loaded.device.type == "cpu"
    assert texts(loaded.translate(SENTENCES)) == texts(Translator(tiny_model, tokenizer, options).translate(SENTENCES))
    # with no precision given it loads as the command line decodes by default
    default = Translator.load(checkpoint, options, device=torch.device("cpu"))
    assert default.precision == Translator(tiny_model, tokenizer, options, precision="auto").precision


def test_without_the_int8_ops_decoding_falls_back_to_fp32_and_says_so(checkpoint, monkeypatch):
    """torch is retiring torch.ops.quantized: a build without its ops decodes in fp32 with a note."""
    from translate import quantize

    real = torch.ops.quantized

    class Retired:
        def __getattr__(self, name):
            if name in quantize.INT8_OPS:
                raise AttributeError(f"no op {name}")
            return getattr(real, name)

    monkeypatch.setattr(torch.ops, "quantized", Retired())
    assert not quantize.int8_available()
    loaded = Translator.load(checkpoint, precision="int8", device=torch.device("cpu"))
    assert loaded.precision == "fp32" and "lacks the int8 kernels" in loaded.note
    assert not any(isinstance(m, Int8Linear) for m in loaded.model.modules())
    assert len(loaded.translate(SENTENCES)) == len(SENTENCES)
    assert Translator.load(checkpoint, device=torch.device("cpu")).note is None


def test_a_precision_flag_on_a_gpu_model_is_noted_not_silently_ignored(search_model, tokenizer, monkeypatch):
    model, precision, note = translator_module._model_for(search_model, "fp32")
    assert model is search_model and note is None
    fake = torch.nn.Parameter(torch.zeros(1, device="meta"))  # a model off the CPU
    monkeypatch.setattr(search_model, "parameters", lambda: iter([fake]))
    model, precision, note = translator_module._model_for(search_model, "int8")
    assert model is search_model and precision == "fp32" and "--int8 is for CPU decoding" in note




def test_scoring_pairs_is_forced_decoding_one_pair_at_a_time(search_model, tokenizer):
    """Reference: each pair alone through the teacher-forced forward pass, its log-probabilities
    summed over the target pieces and EOS."""
    from translate.data import collate
    from translate.encoded import Encoded

    targets = ["The cat eats bread.", "No.", "A big dog drinks the water of the red house.", "Dog.", "Water."]
    scores = Translator(search_model, tokenizer, DecodeOptions(batch_tokens=12)).score_pairs(SENTENCES, targets)
    for source, target, got in zip(SENTENCES, targets, scores):
        batch = collate(Encoded(tokenizer.encode_src([source])), Encoded(tokenizer.encode_tgt([target])), [0])
        with torch.no_grad():
            logp = search_model(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in).log_softmax(-1)
        expected = logp[0].gather(1, batch.tgt_out[0].unsqueeze(1)).sum()
        assert got.logprob == pytest.approx(float(expected), rel=1e-4, abs=1e-4)
        assert got.pieces == len(tokenizer.encode_tgt([target])[0]) + 1
        assert got.per_piece == pytest.approx(got.logprob / got.pieces)
    with pytest.raises(ValueError, match="5 sources but 1 targets"):
        Translator(search_model, tokenizer).score_pairs(SENTENCES, ["x"])


def test_progress_hears_of_every_sentence_translated(search_model, tokenizer):
    heard = []
    lines = [*SENTENCES, "", "Otro."]
    Translator(search_model, tokenizer, DecodeOptions(batch_tokens=10)).translate(lines, on_progress=heard.append)
    assert sum(heard) == len(lines)


def test_auto_precision_is_the_cpu_default_and_falls_back_quietly(search_model, tokenizer, monkeypatch):
    monkeypatch.setattr(translator_module, "CPU_PRECISION", "int8")
    auto = Translator(search_model, tokenizer, precision="auto")
    if translator_module.int8_available():
        assert auto.precision == "int8" and isinstance(auto.model.decoder.output, Int8Linear) and auto.note is None
    monkeypatch.setattr(translator_module, "int8_available", lambda: False)
    fallback = Translator(search_model, tokenizer, precision="auto")
    assert fallback.precision == "fp32" and fallback.model is search_model and fallback.note is None
    asked = Translator(search_model, tokenizer, precision="int8")  # asked for by name: said out loud
    assert asked.precision == "fp32" and "lacks the int8 kernels" in asked.note
    monkeypatch.setattr(translator_module, "CPU_PRECISION", "fp32")
    assert Translator(search_model, tokenizer, precision="auto").model is search_model


# lines of several sentences, as the tiny model's vocabulary writes them, among blank and single ones
SPLIT_LINES = ["El gato come pan. El perro bebe agua.", "", "Perro.", "  El niño lee.  Perro grande.   El sol.  ",
               "   "]


def test_a_split_line_is_its_sentences_translated_one_by_one_and_joined(search_model, tokenizer):
    # the reference: every line's sentences, cut by hand, translated whole in one call (one batch,
    # as the split lines' sentences are), then joined line by line
    options = DecodeOptions(beam=3, restore_casual=False, inter_threads=1)
    translator = Translator(search_model, tokenizer, options)
    got = translator.translate(SPLIT_LINES)
    assert len(got) == len(SPLIT_LINES)
    sentences = [[s for s in re.split(r"(?<=\.)\s+", line.strip()) if s] for line in SPLIT_LINES]
    alone = iter(translator.translate([s for line in sentences for s in line], replace(options, split="none")))
    for line, nbest in zip(sentences, got):
        parts = [next(alone)[0] for _ in line]
        assert nbest[0].text == " ".join(t.text for t in parts if t.text)
        assert nbest[0].tokens == [i for t in parts for i in t.tokens]
        if len(parts) > 1:  # the summed log-probability, normalised over all the pieces
            lengths = [len(t.tokens) + 1 for t in parts]
            logprob = sum(t.score * translator_module.length_penalty(n, options.alpha) for t, n in zip(parts, lengths))
            whole = translator_module.length_penalty(sum(lengths), options.alpha)
            assert nbest[0].score == pytest.approx(logprob / whole)
        elif parts:
            assert nbest[0].score == parts[0].score
    assert got[1][0].text == "" and got[4][0].text == ""


def test_phrases_are_the_comma_pieces_translated_one_by_one_mended_and_joined(search_model, tokenizer):
    # the reference: the pieces cut by hand, translated whole in one call, mended by a plain rule
    # (a final "." becomes "," and the next piece is lowercased, but for names)
    pieces = ["el gato come pan y el perro bebe agua y el niño lee,", "el niño lee y el sol come pan y el perro bebe,",
              "el perro grande bebe agua."]
    line = " ".join(pieces)  # 27 words: over PHRASE_WORDS
    options = DecodeOptions(beam=2, n_best=2, restore_casual=False, inter_threads=1)
    translator = Translator(search_model, tokenizer, options)
    assert translator.options.split == "phrases"
    got = translator.translate([line])[0]
    alone = translator.translate(pieces, replace(options, split="none"))
    kept = kept_capitals(tokenizer)
    for rank in range(2):
        texts = [nbest[rank].text for nbest in alone]
        for i in range(2):
            texts[i] = texts[i][:-1] + "," if texts[i].endswith(".") else texts[i]
            word = texts[i + 1].split(" ")[0]
            if word[:1].isupper() and word not in kept and word not in line and not word[1:2].isupper():
                texts[i + 1] = texts[i + 1][:1].lower() + texts[i + 1][1:]
        assert got[rank].text == " ".join(t for t in texts if t)
        assert got[rank].tokens == [i for nbest in alone for i in nbest[rank].tokens]


def test_a_clause_as_long_as_the_training_sources_is_left_whole(search_model, tokenizer, monkeypatch):
    from tests.test_shortlist import lexicon_for
    from translate.segment import PHRASE_WORDS

    line = ("el gato come pan y el perro bebe agua y el niño lee, el niño lee y el sol come pan y el perro bebe, "
            "el perro grande bebe agua.")  # one clause of 30 words
    options = DecodeOptions(beam=2, restore_casual=False, inter_threads=1, shortlist=0)
    assert Translator(search_model, tokenizer, options).phrase_words == PHRASE_WORDS  # no lexicon: the default
    for words, pieces in ((20, 3), (29, 3), (30, 1), (40, 1)):
        lexicon = dataclasses.replace(lexicon_for(tokenizer), source_words=words)
        translator = Translator(search_model, tokenizer, options, lexicon=lexicon)
        assert translator.phrase_words == max(PHRASE_WORDS, words)
        seen, real = [], translator._translate_pieces

        def spy(pieces_in, *rest, seen=seen, real=real):
            seen.append(list(pieces_in))
            return real(pieces_in, *rest)

        monkeypatch.setattr(translator, "_translate_pieces", spy)
        got = translator.translate([line])[0][0]
        assert len(seen[0]) == pieces
        if pieces == 1:
            assert got.text == translator.translate([line], replace(options, split="none"))[0][0].text


def test_no_split_is_each_line_searched_whole(search_model, tokenizer):
    # the reference: the lines encoded and searched as one batch, as before lines were split
    options = DecodeOptions(beam=3, n_best=2, split="none", restore_casual=False, inter_threads=1)
    lines = [line for line in SPLIT_LINES if line.strip()]
    out = Translator(search_model, tokenizer, options).translate(lines)
    memory, state, limits = encode(search_model, tokenizer, lines, ratio=options.max_len_ratio)
    for nbest, hyps in zip(out, beam_search(search_model, memory, state, 3, limits, options.alpha, n_best=2,
                                            no_repeat_ngram=options.no_repeat_ngram)):
        assert [t.tokens for t in nbest] == [h.tokens for h in hyps]
        assert [t.text for t in nbest] == tokenizer.decode_tgt([h.tokens for h in hyps])


def test_n_best_of_a_split_line_joins_the_sentences_n_th_and_attention_is_block_diagonal(search_model, tokenizer):
    line = "El gato come pan. El perro bebe agua."
    translator = Translator(search_model, tokenizer, DecodeOptions(beam=3, n_best=3, return_attention=True,
                                                                   restore_casual=False))
    joined = translator.translate([line])[0]
    parts = translator.translate(["El gato come pan.", "El perro bebe agua."],
                                 replace(translator.options, split="none"))
    assert [t.text for t in joined] == [f"{a.text} {b.text}" for a, b in zip(*parts)]
    assert [t.score for t in joined] == sorted((t.score for t in joined), reverse=True)
    first, second, attention = parts[0][0], parts[1][0], joined[0].attention
    pieces = len(tokenizer.src_pieces(line))
    assert attention.shape == (len(joined[0].tokens) + 1, pieces + 1)
    assert torch.allclose(attention.sum(1), torch.ones(attention.size(0)), atol=1e-4)
    rows, cols = len(first.tokens), first.attention.size(1) - 1
    assert torch.equal(attention[:rows, :cols], first.attention[:rows, :cols])
    assert torch.equal(attention[rows:, cols:-1], second.attention[:, :-1])
    assert not attention[:rows, cols:-1].any() and not attention[rows:, :cols].any()


def test_progress_and_truncation_count_lines_not_sentences(search_model, tokenizer):
    heard, cut = [], []
    lines = [*SPLIT_LINES, "El gato. " + "el gato " * 40]
    translator = Translator(search_model, tokenizer, DecodeOptions(batch_tokens=10, max_src_len=30))
    translator.translate(lines, on_progress=heard.append, on_truncate=cut.append)
    assert sum(heard) == len(lines) and cut == [1]


def test_unknown_words_are_carried_into_the_output(search_model, tokenizer):
    lines = ["El gato Ωmega come pan.", "Ægir.", "El perro bebe agua."]
    assert all(tokenizer.src_unknown(line) for line in lines[:2]) and not tokenizer.src_unknown(lines[2])
    translator = Translator(search_model, tokenizer, DecodeOptions(beam=2, restore_casual=False))
    out = translator.translate(lines)
    assert "Ωmega" in out[0][0].text and "Ægir" in out[1][0].text
    off = translator.translate(lines, DecodeOptions(beam=2, copy_unknown=False, restore_casual=False))
    assert out[2][0].text == off[2][0].text  # a line without unknown words: the plain path
    assert out[0][0].attention is None  # decoded with attention for the copy; not asked for, not given
    # the reference: the line with its unknown words replaced by their stand-ins, decoded plainly
    decoded, words = translator_module.stand_ins(tokenizer, lines[0])
    assert decoded == lines[0].replace("Ωmega", words[0].name) and words[0].text == "Ωmega"
    alone = translator.translate([decoded], DecodeOptions(beam=2, copy_unknown=False, restore_casual=False))[0]
    assert [t.tokens for t in out[0]] == [t.tokens for t in alone]
    # the attention's columns are the pieces decoded, which source_pieces gives (the repl's and the page's labels)
    seen = translator.translate(lines[:1], DecodeOptions(beam=2, return_attention=True, restore_casual=False))[0][0]
    assert translator.source_pieces(lines[0], DecodeOptions(restore_casual=False)) == tokenizer.src_pieces(decoded)
    assert seen.attention.size(1) == len(tokenizer.src_pieces(decoded)) + 1


def test_a_stand_in_name_that_comes_through_gives_its_place_to_the_word(tokenizer):
    from translate.search import Hypothesis

    decoded, words = translator_module.stand_ins(tokenizer, "El Ωmega y Ærø come.")
    assert [w.text for w in words] == ["Ωmega", "Ærø"]
    names = [w.name for w in words]
    assert decoded == f"El {names[0]} y {names[1]} come."
    src_len = len(tokenizer.encode_src([decoded])[0]) + 1
    ids = tokenizer.encode_tgt([f"The {names[1]} eats."])[0]  # the first name is lost on the way
    attention = torch.full((len(ids) + 1, src_len), 0.01)
    attention[len(ids) - 2, words[0].first] = 0.9  # "eats" renders it, as far as attention tells
    got = translator_module.carry_unknown(tokenizer, Hypothesis(ids, -1.0, attention), words, src_len)
    assert got == "The Ærø Ωmega."


def test_a_word_met_twice_keeps_one_stand_in_and_no_stand_in_is_left_in_the_translation(tokenizer):
    from translate.search import Hypothesis

    decoded, words = translator_module.stand_ins(tokenizer, "El Ωmega y el Ωmega y Ærø.")
    assert [w.text for w in words] == ["Ωmega", "Ωmega", "Ærø"]
    first, again, other = (w.name for w in words)
    assert first == again != other and decoded == f"El {first} y el {first} y {other}."
    src_len = len(tokenizer.encode_src([decoded])[0]) + 1
    ids = tokenizer.encode_tgt([f"The {first} and the {first} and {other} {other}."])[0]
    hyp = Hypothesis(ids, -1.0, torch.full((len(ids) + 1, src_len), 0.1))
    got = translator_module.carry_unknown(tokenizer, hyp, words, src_len)
    assert got == "The Ωmega and the Ωmega and Ærø Ærø."
    assert not any(name in got for name in translator_module.STAND_INS)


def test_an_unknown_word_replaces_its_rendering_or_goes_in_after_its_word(tokenizer):
    from translate.search import Hypothesis

    ids = tokenizer.encode_tgt(["The cat eats bread."])[0]
    pieces = tokenizer.tgt_pieces(ids)
    cat = [i for i, p in enumerate(pieces) if p.startswith("▁")][1]  # the first piece of "cat"
    source = "El Ωmega come pan."
    (first, last, text), = tokenizer.src_unknown(source)
    src_len = len(tokenizer.encode_src([source])[0]) + 1
    attention = torch.full((len(ids) + 1, src_len), 0.01)
    attention[cat, first] = 0.9  # "cat" looks at the unknown word above all: it renders it
    hyp = Hypothesis(ids, -1.0, attention)
    assert translator_module.with_unknown(tokenizer, hyp, [(first, last, text)], src_len) == "The Ωmega eats bread."
    attention[cat, first], attention[cat, 0] = 0.3, 0.6  # it looks elsewhere more: the word goes in after it
    assert translator_module.with_unknown(tokenizer, hyp, [(first, last, text)], src_len) == "The cat Ωmega eats bread."
    empty = Hypothesis([], -1.0, torch.full((1, src_len), 0.1))
    assert translator_module.with_unknown(tokenizer, empty, [(first, last, text)], src_len) == "Ωmega"


def test_decode_split_flag(checkpoint):
    from click.testing import CliRunner

    from translate.cli import main

    text = "El gato come pan. El perro bebe agua.\n\nPerro.\n"
    runs = {split: CliRunner().invoke(main, ["decode", str(checkpoint), "--fp32", "--beam", "2",
                                             "--split", split], input=text) for split in ("none", "sentences")}
    translator = Translator.load(checkpoint, precision="fp32")
    for split, result in runs.items():
        assert result.exit_code == 0, result.output
        expected = translator.translate(text.splitlines(), DecodeOptions(beam=2, split=split))
        assert result.output.splitlines() == [n[0].text for n in expected]
    bad = CliRunner().invoke(main, ["decode", str(checkpoint), "--split", "words"], input=text)
    assert bad.exit_code == 2 and "Invalid value for '--split'" in bad.output


def test_the_repl_sets_the_split_and_shows_a_split_line_s_attention(search_model, tokenizer):
    from translate.repl import Repl

    repl = Repl(Translator(search_model, tokenizer, DecodeOptions(beam=2)))
    line = "El gato come pan. El perro bebe agua."
    assert repl.handle(line)[0] == Translator(search_model, tokenizer).translate([line], repl.options)[0][0].text
    assert len(repl.attention().splitlines()[0].split("|")[1].split()) == len(tokenizer.src_pieces(line)) + 1
    assert repl.command(":split none") == ("split none", False) and repl.options.split == "none"
    usage = "usage: :split MODE with MODE one of sentences, clauses, phrases, none"
    assert repl.command(":split words") == (usage, False)
    assert repl.options.split == "none"


@pytest.mark.parametrize("beam", [1, 3])
def test_no_finite_score_is_an_empty_translation_and_one_warning(checkpoint, monkeypatch, caplog, tmp_path, beam):
    # every score NaN, as an fp16 overflow gives: no n-best list may be empty (decode, eval and serve take its first)
    import logging

    from click.testing import CliRunner

    from translate.cli import main
    from translate.model import Seq2Seq

    real = Seq2Seq.decode_step

    def overflowing(self, prev, memory, state, vocab=None):
        logits, state, weights = real(self, prev, memory, state, vocab)
        return torch.full_like(logits, float("nan")), state, weights

    monkeypatch.setattr(Seq2Seq, "decode_step", overflowing)
    lines = [*SENTENCES, "El gato come. El perro bebe.", "Xyzzy come ☃."]
    translator = Translator.load(checkpoint, DecodeOptions(beam=beam, n_best=beam, inter_threads=1), precision="fp32")
    with caplog.at_level(logging.WARNING):
        got = translator.translate(lines)
    assert [[t.text for t in nbest] for nbest in got] == [[""]] * len(lines)
    warned = [r.getMessage() for r in caplog.records if "no translation with a finite score" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    attended = translator.translate(["El gato come pan."], DecodeOptions(beam=beam, return_attention=True))[0][0]
    assert attended.attention.shape == (1, len(translator.source_pieces("El gato come pan.")) + 1)
    decoded = CliRunner().invoke(main, ["decode", str(checkpoint), "--fp32", "--beam", str(beam)], input="Gato.\nY.\n")
    assert decoded.exit_code == 0 and decoded.stdout == "\n\n", decoded.output
    (tmp_path / "src").write_text("El gato come pan.\n")
    (tmp_path / "ref").write_text("The cat eats bread.\n")
    evaluated = CliRunner().invoke(main, ["eval", str(checkpoint), "--fp32", "--beam", str(beam), "--src",
                                          str(tmp_path / "src"), "--ref", str(tmp_path / "ref"), "--json"])
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["bleu"] == 0.0, evaluated.output


def on_a_gpu(model, monkeypatch):
    """``model`` as the Translator sees a model on CUDA (there is no GPU here)."""
    fake = type("Param", (), {"device": torch.device("cuda"), "dtype": torch.float32})()
    monkeypatch.setattr(model, "parameters", lambda: iter([fake]))


@pytest.mark.parametrize("native", [True, False])
def test_on_a_gpu_fp32_decodes_without_autocast_and_bf16_falls_back_without_native_bf16(
        search_model, tokenizer, monkeypatch, native):
    from translate import runtime

    monkeypatch.setattr(runtime, "cuda_has_bf16", lambda device: native)
    on_a_gpu(search_model, monkeypatch)
    for amp in ("auto", "bf16", "fp16", True):  # --fp32: full precision, whatever the checkpoint trained in
        asked = Translator(search_model, tokenizer, precision="fp32", amp=amp)
        assert (asked.dtype, asked.precision, asked.note) == (None, "fp32", None)
    expected = {("auto", True): torch.bfloat16, ("auto", False): torch.float16, ("fp16", True): torch.float16,
                ("fp16", False): torch.float16, ("off", True): None, ("off", False): None,
                ("bf16", True): torch.bfloat16, ("bf16", False): None}
    for (amp, has_bf16), dtype in expected.items():
        if has_bf16 != native:
            continue
        default = Translator(search_model, tokenizer, precision="auto", amp=amp)
        assert default.dtype == dtype and default.precision == {None: "fp32", torch.bfloat16: "bf16",
                                                                torch.float16: "fp16"}[dtype]
        assert (default.note is not None) == (amp == "bf16" and not native)  # trained in bf16: fp32, with a note
    if not native:
        note = Translator(search_model, tokenizer, precision="auto", amp="bf16").note
        assert "no native bf16" in note and "decoding in fp32" in note and "\n" not in note


def test_device_option(checkpoint, monkeypatch):
    from click.testing import CliRunner

    from translate.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["decode", str(checkpoint), "--device", "cuda"], input="Gato.\n")
    assert result.exit_code == 2 and "--device cuda but no CUDA GPU is visible; use --device auto" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["decode", str(checkpoint), "--device", "tpu"], input="Gato.\n")
    assert result.exit_code == 2 and "Invalid value for '--device'" in result.output
    on_cpu = CliRunner().invoke(main, ["decode", str(checkpoint), "--device", "cpu", "--fp32"], input="Gato.\n")
    assert on_cpu.exit_code == 0 and on_cpu.stdout == Translator.load(checkpoint, precision="fp32").translate(
        ["Gato."])[0][0].text + "\n"
    with pytest.raises(ConfigError, match="--device cuda but no CUDA GPU"):
        Translator.load(checkpoint, device="cuda")
