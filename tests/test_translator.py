"""The Translator: options, precisions, batching and threads, streaming, loading a checkpoint."""

import dataclasses
import json
import os
import re
import threading

import pytest
import torch

from translate import translator as translator_module
from translate.checkpoint import save_checkpoint
from translate.config import load_config
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
    assert set(DecodeOptions.BOUNDS) == fields - {"return_attention"}
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
    for nbest, hyps in zip(out, beam_search(model, memory, state, 3, limits, n_best=2,
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
