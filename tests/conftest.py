"""Shared fixtures: a small generated corpus, a tiny tokenizer, config and model."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from translate.config import Config, load_config
from translate.model import build_model
from translate.tokenizer import Tokenizer

WORDS = {
    "el": "the", "gato": "cat", "perro": "dog", "come": "eats", "bebe": "drinks", "agua": "water",
    "pan": "bread", "rojo": "red", "grande": "big", "casa": "house", "ve": "sees", "niño": "child",
    "libro": "book", "lee": "reads", "y": "and", "pequeño": "small", "mira": "watches", "sol": "sun",
}


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Word-for-word pairs: easy enough for a tiny model to learn in a few hundred steps."""
    rng = random.Random(seed)
    spanish = sorted(WORDS)
    pairs = []
    for _ in range(n):
        words = [rng.choice(spanish) for _ in range(rng.randint(2, 6))]
        pairs.append((" ".join(words).capitalize() + ".", " ".join(WORDS[w] for w in words).capitalize() + "."))
    return pairs


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("spa\teng\n" + "".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on the GPU on purpose (test_cuda.py); every other test module "
                                       "sees no GPU (_no_gpu_unless_marked)")


@pytest.fixture(scope="module", autouse=True)
def _no_gpu_unless_marked(request):
    """A module not marked ``cuda`` sees no GPU, as on a machine without one: ``auto`` (train.device,
    ``--device``, ``Translator.load``'s default) is the CPU, where the expected outputs were written
    and decoding defaults to the CPU's precision (``CPU_PRECISION``). Module-scoped and autouse, so
    that it is in place before the module's own fixtures train or load a model."""
    if request.node.get_closest_marker("cuda") is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return {
        "train": write_tsv(root / "train.tsv", make_pairs(600, seed=1)),
        "dev": write_tsv(root / "dev.tsv", make_pairs(40, seed=2)),
        "test": write_tsv(root / "test.tsv", make_pairs(30, seed=3)),
    }


@pytest.fixture(scope="session")
def tokenizer(corpus) -> Tokenizer:
    pairs = make_pairs(600, seed=1)
    return Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=80)


def tiny_overrides(corpus: dict[str, Path]) -> dict[str, object]:
    return {
        "data.train": str(corpus["train"]), "data.dev": str(corpus["dev"]), "data.test": str(corpus["test"]),
        "tokenizer.vocab_size": 80, "model.embed_dim": 16, "model.hidden_dim": 32,
        "model.dropout": 0.1,  # not the default's: what the tiny runs' expected outputs were written with
        # PyTorch's initialisation, as those outputs were written with: in a few dozen steps it learns
        # faster than the default's uniform one, whose lead comes later (docs/benchmarks.md, "Tuning the defaults")
        "model.init_uniform": 0,
        "train.batch_tokens": 400,
        "train.eval_every": 10, "train.max_minutes": 0, "train.max_steps": 20, "train.lr": 0.01, "train.threads": 1,
        # a schedule that leaves teacher forcing after 5 steps, so the tiny runs feed predictions too
        "train.teacher_forcing": "inverse_sigmoid", "train.tf_warmup": 5, "train.tf_k": 10,
        # on the CPU, where the expected outputs were written and a step count gives the same weights bit for
        # bit, whatever the machine has (the runs in subprocesses too); test_cuda.py sets train.device=cuda
        "train.device": "cpu",
    }


def cli_train_args(corpus: dict[str, Path], run_dir: Path, **extra: object) -> list[str]:
    """``translate train`` arguments for a tiny run in ``run_dir`` (``extra``: more config keys)."""
    args = ["train", "--run-dir", str(run_dir)]
    for key, value in {**tiny_overrides(corpus), **extra}.items():
        args += ["--set", f"{key}={value}"]
    return args


def env_with_repo(**extra: str) -> dict[str, str]:
    """This process's environment for a child that imports this checkout: the repository put
    ahead of the caller's own PYTHONPATH, which the child still needs (packages installed there)."""
    import os

    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def kill_after_first_checkpoint(command: list[str], run_dir: Path) -> None:
    """Starts a training ``command`` that writes ``run_dir`` and SIGKILLs it soon after its first
    last.pt, failing the test if the run ended by itself first (then nothing was interrupted)."""
    import subprocess
    import time

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.kill()
    assert proc.wait() == -9, "the run ended before the kill: nothing was interrupted"


@pytest.fixture(scope="module")
def run_with_steps(corpus, tmp_path_factory):
    """A tiny run of 30 steps through the command line that kept the weights of its last two
    validations (step-20.pt, step-30.pt)."""
    from click.testing import CliRunner

    from translate.cli import main

    run_dir = tmp_path_factory.mktemp("avg") / "run"
    result = CliRunner().invoke(main, cli_train_args(corpus, run_dir, **{
        "train.max_steps": 30, "train.eval_every": 10, "train.keep_checkpoints": 2}))
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture()
def tiny_config(corpus) -> Config:
    return load_config(overrides=tiny_overrides(corpus))


@pytest.fixture()
def tiny_model(tokenizer):
    torch.manual_seed(0)
    # PyTorch's initialisation: its larger random weights make an untrained model's outputs depend
    # on its inputs by more than the tests' tolerances
    config = load_config(overrides={"model.embed_dim": 16, "model.hidden_dim": 32, "model.dropout": 0.0,
                                    "model.init_uniform": 0})
    return build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()


@pytest.fixture()
def tiny_service(tiny_model, tokenizer):
    """A translation service over ``tiny_model`` (no shortlist) and a function that POSTs a body to
    its /translate and gives the status and the parsed answer; the batcher closed afterwards."""
    import io
    import json

    from translate.serve import RequestBatcher, TranslationService
    from translate.translator import DecodeOptions, Translator

    translator = Translator(tiny_model, tokenizer, DecodeOptions(shortlist=0))
    batcher = RequestBatcher(translator, max_wait_ms=1)
    service = TranslationService(batcher, max_body=1 << 16, max_sentences=8, info={})

    def call(body: bytes, content_type: str = "application/json") -> tuple[int, object]:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        response = service.respond("POST", "/translate", headers, io.BytesIO(body))
        return response.status, json.loads(response.body)

    yield translator, call
    batcher.close()


@pytest.fixture()
def tiny_tokenizer_file(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    return str(tmp_path / "src.model")


def tiny(corpus, tokenizer_file, **extra):
    return load_config(overrides={**tiny_overrides(corpus), "tokenizer.model": tokenizer_file, **extra})


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """A fresh datasets cache, so that the test sees the first tokenization and then the reuse."""
    import datasets

    cache = tmp_path / "hf"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


# ---------------------------------------------------------------- decoding: test_search, test_translator, test_quantize

SENTENCES = ["El gato come pan.", "Y.", "El niño grande lee el libro rojo y mira el sol.", "Perro.",
             "El perro pequeño bebe agua."]


def encode(model, tokenizer, sentences, ratio: float = 1.5):
    """``sentences`` encoded as one batch: the memory, the decoder's first state and the length
    limits that the searches take."""
    from translate.data import collate
    from translate.encoded import Encoded
    from translate.search import max_lengths

    batch = collate(Encoded(tokenizer.encode_src(sentences)), None, list(range(len(sentences))))
    memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    return memory, state, max_lengths(batch.src_lengths, ratio)


@pytest.fixture(params=[("lstm", "bahdanau", "luong", False), ("gru", "luong-general", "luong", True),
                        ("lstm", "luong-dot", "bahdanau", False)],
                ids=["lstm-bahdanau", "gru-luong-general-feed", "lstm-luong-dot-bahdanau-decoder"])
def search_model(request, tokenizer):
    """A tiny random model, in three architectures, whose output is sharpened so that search makes
    real choices (a random model's is nearly uniform)."""
    cell, attention, decoder, feed = request.param
    torch.manual_seed(3)
    config = load_config(overrides={"model.cell": cell, "model.attention": attention, "model.decoder": decoder,
                                    "model.input_feeding": feed, "model.embed_dim": 16, "model.hidden_dim": 32,
                                    "model.dropout": 0.0})
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    with torch.no_grad():
        model.decoder.output.bias.normal_(0, 2)
    return model


def package_messages(caplog) -> list[str]:
    """The messages the package logged (its ``translate.*`` loggers) while ``caplog`` listened."""
    return [r.getMessage() for r in caplog.records if r.name.split(".")[0] == "translate"]


@pytest.fixture(autouse=True)
def _train_logs_closed():
    """A trainer built but never run leaves its train.log attached to the package's logger: closed
    after each test (last attached first, so the logger gets its level back)."""
    yield
    from translate.rundir import TrainLog

    for handler in reversed([h for h in logging.getLogger("translate").handlers if isinstance(h, TrainLog)]):
        handler.close()
