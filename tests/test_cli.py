"""End to end through the command line: train a tiny model, then eval, decode and the repl."""

import json

import pytest
import torch
from click.testing import CliRunner

from translate.checkpoint import load_checkpoint, load_model
from translate.cli import main

from .conftest import cli_train_args


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    result = CliRunner().invoke(main, cli_train_args(corpus, run_dir, **{"train.eval_every": 100,
                                                                          "train.max_steps": 300}))
    assert result.exit_code == 0, result.output
    return run_dir, result


def test_train_writes_run(trained):
    run_dir, result = trained
    for name in ("best.pt", "last.pt", "src.model", "tgt.model", "metrics.jsonl", "config.yaml", "train.log"):
        assert (run_dir / name).is_file()
    assert "best dev BLEU" in result.output and "tok/s" in result.output


def test_eval_json_and_text(trained, corpus):
    run_dir, _ = trained
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(run_dir), "--test", str(corpus["test"]), "--json", "--beam", "3"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert {"bleu", "chrf", "ter", "signature"} <= set(scores)
    assert scores["bleu"] > 5 and "tok:13a" in scores["signature"]
    text = runner.invoke(main, ["eval", str(run_dir / "best.pt"), "--test", str(corpus["test"])])
    assert text.exit_code == 0 and "BLEU" in text.output and "chrF" in text.output and "TER" in text.output


def test_eval_greedy_matches_validation(trained):
    run_dir, _ = trained
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in records if r["kind"] == "dev"), key=lambda r: r["dev_bleu"])
    _, _, config, _ = load_model(run_dir)  # the dev set's path is in the checkpoint
    dev = CliRunner().invoke(main, ["eval", str(run_dir), "--test", config.data.dev, "--beam", "1", "--json"])
    assert json.loads(dev.output)["bleu"] == pytest.approx(best["dev_bleu"], abs=0.01)


def test_decode_file_and_n_best(trained, tmp_path):
    run_dir, _ = trained
    src = tmp_path / "in.txt"
    src.write_text("El gato come pan.\n\nEl perro bebe agua.\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    runner = CliRunner()
    result = runner.invoke(main, ["decode", str(run_dir), "-i", str(src), "-o", str(out), "--beam", "4"])
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    assert "cat" in lines[0].lower()
    nbest = runner.invoke(main, ["decode", str(run_dir), "--beam", "3", "--n-best", "3"], input="El sol.\n")
    rows = [line.split("\t") for line in nbest.output.strip().split("\n")]
    assert len(rows) == 3 and all(r[0] == "0" for r in rows)
    assert [float(r[1]) for r in rows] == sorted((float(r[1]) for r in rows), reverse=True)
    stdin = runner.invoke(main, ["decode", str(run_dir), "--beam", "1"], input="El gato.\nEl perro.\n")
    assert stdin.exit_code == 0 and len(stdin.output.strip().split("\n")) == 2
    bf16 = runner.invoke(main, ["decode", str(run_dir), "--beam", "2", "--bf16"], input="El gato.\nEl perro.\n")
    assert bf16.exit_code == 0 and len(bf16.output.strip().split("\n")) == 2, bf16.output
    int8 = runner.invoke(main, ["decode", str(run_dir), "-i", str(src), "--beam", "4", "--int8",
                               "--inter-threads", "3"])
    assert int8.exit_code == 0 and "cat" in int8.output.split("\n")[0].lower(), int8.output
    both = runner.invoke(main, ["decode", str(run_dir), "--bf16", "--int8"], input="El gato.\n")
    assert both.exit_code == 2 and "exclude each other" in both.output and "Traceback" not in both.output
    both = runner.invoke(main, ["decode", str(run_dir), "--fp32", "--int8"], input="El gato.\n")
    assert both.exit_code == 2 and "--fp32 and --int8 exclude each other" in both.output


def test_decoding_precision_defaults_to_the_cpu_choice(trained, tmp_path):
    """With no flag a CPU decodes as --int8 does (the measured default); --fp32 asks for full precision."""
    from translate.translator import CPU_PRECISION, Translator

    run_dir, _ = trained
    src = tmp_path / "in.txt"
    src.write_text("El gato come pan.\nEl perro bebe agua en la casa.\nEl sol.\n", encoding="utf-8")
    runner = CliRunner()
    outputs = {}
    for flags in ([], ["--fp32"], [f"--{CPU_PRECISION}"]):
        result = runner.invoke(main, ["decode", str(run_dir), "-i", str(src), "--n-best", "2", "--beam", "2", *flags])
        assert result.exit_code == 0, result.output
        outputs[" ".join(flags)] = result.output
    assert outputs[""] == outputs[f"--{CPU_PRECISION}"]
    for precision, flag in (("fp32", "--fp32"), (CPU_PRECISION, "")):
        translator = Translator.load(run_dir, precision=precision)
        nbest = translator.translate(src.read_text(encoding="utf-8").splitlines(),
                                     translator.options.__class__(beam=2, n_best=2))
        expected = "".join(f"{i}\t{t.score:.4f}\t{t.text}\n" for i, hyps in enumerate(nbest) for t in hyps)
        assert outputs[flag] == expected


def test_repl_through_stdin(trained):
    run_dir, _ = trained
    session = "El gato come pan.\n:beam 1\nEl perro.\n:attn\n:help\n\n:bogus\n:quit\nnot reached\n"
    result = CliRunner().invoke(main, ["repl", str(run_dir)], input=session)
    assert result.exit_code == 0, result.output
    out = result.output.split("\n")
    assert "cat" in out[0].lower()
    assert out[1] == "beam 1"
    assert "</s>" in result.output and "| " in result.output  # the attention table
    assert ":beam N" in result.output and "unknown command :bogus" in result.output
    assert "not reached" not in result.output
    small = CliRunner().invoke(main, ["repl", str(run_dir), "--int8"], input="El gato come pan.\n:attn\n:quit\n")
    assert small.exit_code == 0 and "cat" in small.output.split("\n")[0].lower(), small.output
    assert "</s>" in small.output  # attention comes out of the int8 copy too


def test_resume_continues_a_run(trained, corpus, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(trained[0], run_dir)
    result = CliRunner().invoke(main, ["train", "--run-dir", str(run_dir), "--resume", "--max-steps", "310"])
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output and "at step 310" in result.output


def test_the_default_initialisation_trains_saves_and_decodes(corpus, tmp_path):
    """The tiny runs above start from PyTorch's initialisation; the default's uniform one goes
    through training, the checkpoint and decoding too."""
    run_dir = tmp_path / "uniform"
    result = CliRunner().invoke(main, cli_train_args(corpus, run_dir, **{"model.init_uniform": 0.1,
                                                                         "train.max_steps": 3}))
    assert result.exit_code == 0, result.output
    model, _, config, _ = load_model(run_dir / "last.pt")
    assert config.model.init_uniform == 0.1
    # three steps at LR 0.01 move no weight far from +-0.1 (PyTorch's embeddings reach past 2)
    assert max(p.abs().max().item() for p in model.parameters()) < 0.2
    decoded = CliRunner().invoke(main, ["decode", str(run_dir), "--beam", "2"], input="El gato come pan.\n")
    assert decoded.exit_code == 0, decoded.output


BAD = [
    (["train", "--set", "model.hiden_dim=3"], "unknown config key 'model.hiden_dim'; valid keys:"),
    (["train", "--set", "model.layers=two"], "model.layers must be of type int"),
    (["train", "--train", "/nonexistent/train.tsv"], "file not found"),
    (["eval", "/nonexistent/run"], "checkpoint not found"),
    (["decode", "/nonexistent/model.pt"], "checkpoint not found"),
    (["repl", "/nonexistent/model.pt"], "checkpoint not found"),
    (["decode", "/nonexistent/model.pt", "--beam", "2", "--n-best", "3"], "--n-best (3) cannot exceed --beam (2)"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    result = CliRunner().invoke(main, [*args, *(["--run-dir", str(tmp_path / "r")] if args[0] == "train" else [])])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


DECODING_FLAGS = ["--beam", "--n-best", "--max-len-ratio", "--alpha", "--fp32", "--bf16", "--int8", "--device",
                  "--inter-threads"]
PRECISION_FLAGS = ["--fp32", "--bf16", "--int8"]


@pytest.mark.parametrize("command, flags", [
    ("eval", ["--beam", "--alpha", *PRECISION_FLAGS, "--device", "--inter-threads"]),
    ("decode", DECODING_FLAGS),
    ("repl", ["--beam", *PRECISION_FLAGS, "--device"]),
    ("serve", [*PRECISION_FLAGS, "--device"]),
    ("attend", ["--beam", *PRECISION_FLAGS]),
    ("score", [*PRECISION_FLAGS, "--device"]),
])
def test_each_command_has_its_decoding_flags(command, flags):
    usage = CliRunner().invoke(main, [command, "--help"]).output
    assert [flag for flag in DECODING_FLAGS if f"  {flag} " in usage] == flags


def test_bad_files_for_eval_and_decode(trained, tmp_path):
    run_dir, _ = trained
    runner = CliRunner()
    (tmp_path / "a.txt").write_text("uno\ndos\n")
    (tmp_path / "b.txt").write_text("one\n")
    result = runner.invoke(main, ["eval", str(run_dir), "--src", str(tmp_path / "a.txt"), "--ref",
                                  str(tmp_path / "b.txt")])
    assert result.exit_code == 2 and "has 2 lines but" in result.output
    (tmp_path / "empty.txt").write_text("")
    result = runner.invoke(main, ["eval", str(run_dir), "--src", str(tmp_path / "empty.txt"), "--ref",
                                  str(tmp_path / "empty.txt")])
    assert result.exit_code == 2 and "holds no sentences to score" in result.output and "Traceback" not in result.output
    (tmp_path / "latin1.txt").write_bytes("añb\n".encode("latin-1"))
    result = runner.invoke(main, ["decode", str(run_dir), "-i", str(tmp_path / "latin1.txt")])
    assert result.exit_code == 2 and "line 1: not valid UTF-8" in result.output
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    result = runner.invoke(main, ["decode", str(tmp_path / "junk.pt")], input="hola\n")
    assert result.exit_code == 2 and "not a readable checkpoint" in result.output
    whole = (run_dir / "last.pt").read_bytes()  # decoding maps the file: a cut one must still fail cleanly
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    result = runner.invoke(main, ["decode", str(tmp_path / "cut.pt")], input="hola\n")
    assert result.exit_code == 2 and "not a readable checkpoint" in result.output
    assert result.output.count("\n") == 1


def test_odd_lines_decode(trained):
    run_dir, _ = trained
    lines = ["", "   ", "🙂🙂", "猫が好きです", "el gato " * 1250]
    result = CliRunner().invoke(main, ["decode", str(run_dir), "--beam", "2"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") >= len(lines)
    assert "truncated" in result.output


def test_repl_odd_lines(trained):
    run_dir, _ = trained
    lines = ["   ", "🙂🙂", "猫が好きです", "el gato " * 1250, ":attn", ":beam x", ":beam 0"]
    result = CliRunner().invoke(main, ["repl", str(run_dir)], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert result.output.count("usage: :beam N") == 2


def test_split_data_needs_an_input_and_writes_into_data(tmp_path, monkeypatch):
    runner = CliRunner()
    missing = runner.invoke(main, ["split-data"])
    assert missing.exit_code == 2 and "Missing option '--input'" in missing.output
    source = tmp_path / "all.tsv"
    source.write_text("spa\teng\n" + "".join(f"s{i}\te{i}\n" for i in range(20)), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # --out-dir defaults to data/ in the working directory
    result = runner.invoke(main, ["split-data", "--input", str(source), "--dev-size", "3", "--test-size", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "test 4 pairs, dev 3 pairs, train 13 pairs in data"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dev.tsv", "test.tsv", "train.tsv"]


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("translate, version ")


def test_quiet_and_verbose_training(corpus, tmp_path):
    def args(name):
        return cli_train_args(corpus, tmp_path / name, **{"train.max_steps": 2})

    quiet = CliRunner().invoke(main, ["--quiet", *args("q")])
    assert quiet.exit_code == 0, quiet.output
    assert "done:" in quiet.output and "training pairs" not in quiet.output
    verbose = CliRunner().invoke(main, ["--verbose", *args("v")])
    assert verbose.exit_code == 0 and "configuration:" in verbose.output and "hidden_dim: 32" in verbose.output
    normal = CliRunner().invoke(main, args("n"))
    assert "training pairs" in normal.output and "configuration:" not in normal.output


def test_decode_scores_and_the_score_command(trained, tmp_path):
    from translate.translator import DecodeOptions, Translator

    run_dir, _ = trained
    runner = CliRunner()
    with_scores = runner.invoke(main, ["decode", str(run_dir), "--beam", "3", "--scores"],
                                input="El gato come pan.\nEl perro.\n")
    rows = [line.split("\t") for line in with_scores.output.strip().split("\n")]
    plain = runner.invoke(main, ["decode", str(run_dir), "--beam", "3"], input="El gato come pan.\nEl perro.\n")
    assert [r[1] for r in rows] == plain.output.strip().split("\n") and all(float(r[0]) < 0 for r in rows)

    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("El gato come pan.\nEl perro bebe agua.\nEl gato come pan.\n", encoding="utf-8")
    ref.write_text("The cat eats bread.\nThe dog drinks water.\nWater the bread drinks.\n", encoding="utf-8")
    result = runner.invoke(main, ["score", str(run_dir), "--src", str(src), "--ref", str(ref)])
    assert result.exit_code == 0, result.output
    rows = [[float(x) for x in line.split("\t")] for line in result.stdout.strip().split("\n")]
    assert "scoring over each source's shortlist (--shortlist 50), as decoding does" in result.stderr
    expected = Translator.load(run_dir, DecodeOptions()).score_pairs(src.read_text().split("\n")[:3],
                                                                      ref.read_text().split("\n")[:3])
    assert rows == [[round(p.per_piece, 4), round(p.logprob, 4)] for p in expected]
    assert rows[0][0] > rows[2][0]  # the right translation beats a scrambled one
    ref.write_text("only one line\n", encoding="utf-8")
    short = runner.invoke(main, ["score", str(run_dir), "--src", str(src), "--ref", str(ref)])
    assert short.exit_code == 2 and "must match line for line" in short.output and "Traceback" not in short.output


def test_a_progress_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from translate import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    with cli._progress_bar(3) as advance:
        for _ in range(3):
            advance(1)
    assert "0/3" in screen.getvalue() and "lines" in screen.getvalue()
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    with cli._progress_bar(3) as advance:
        advance(3)
    assert piped.getvalue() == ""


def test_export_writes_a_folder_every_command_takes(trained, tmp_path, corpus):
    from safetensors.torch import load_file

    from translate.checkpoint import load_model as load

    run_dir, _ = trained
    folder = tmp_path / "shared"
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(run_dir), "-o", str(folder), "--beam", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "lexicon.safetensors",
                                                        "model.safetensors", "src.model", "tgt.model"]
    assert torch.equal(load_file(folder / "lexicon.safetensors")["translations"],
                       load_checkpoint(run_dir / "best.pt")["lexicon"]["translations"])
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "| BLEU | chrF | TER |" in card and "nrefs:1" in card and "parameters" in card
    evaluated = json.loads(runner.invoke(main, ["eval", str(run_dir), "--beam", "2", "--json"]).output)
    assert f"| {evaluated['bleu']:.2f} | {evaluated['chrf']:.2f} | {evaluated['ter']:.2f} |" in card  # as eval scores
    weights = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    assert "decoder.output.weight" in config["tied"] and "decoder.output.weight" not in weights  # stored once
    model, _, saved, _ = load(folder)
    original, _, _, _ = load(run_dir)
    for name, value in original.state_dict().items():
        assert (model.state_dict()[name] == value).all(), name
    assert model.decoder.output.weight is model.decoder.embed.weight  # still tied once loaded
    for args in (["decode", str(folder), "--beam", "2"], ["decode", str(run_dir), "--beam", "2"]):
        out = runner.invoke(main, args, input="El gato come pan.\n")
        assert out.exit_code == 0, out.output
    assert runner.invoke(main, ["decode", str(folder)], input="El perro.\n").output == \
        runner.invoke(main, ["decode", str(run_dir)], input="El perro.\n").output
    info = runner.invoke(main, ["info", str(folder), "--json"])
    assert json.loads(info.output)["parameters"] == model.parameter_count()
    (folder / "model.safetensors").write_bytes(b"junk")
    broken = runner.invoke(main, ["decode", str(folder)], input="El perro.\n")
    assert broken.exit_code == 2 and "not a readable exported model" in broken.output
    assert "Traceback" not in broken.output


def one_line_error(result) -> bool:
    return (result.exit_code == 2 and "Traceback" not in result.output
            and len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1)


def test_an_export_is_complete_or_absent_and_scores_only_on_a_test_set_in_its_languages(trained, tmp_path,
                                                                                        monkeypatch):
    from translate import export as export_module
    from translate.checkpoint import save_checkpoint
    from translate.config import BUNDLED_DATA, load_config

    run_dir, _ = trained
    payload = load_checkpoint(run_dir / "best.pt")
    # as a model of a user's own files is (trained with --src-lang es --tgt-lang en, data.test left as it is)
    payload["config"]["data"].update(src_lang="es", tgt_lang="en", test=load_config().data.test)
    save_checkpoint(tmp_path / "es-en.pt", payload)
    runner = CliRunner()
    folder = tmp_path / "es-en"
    result = runner.invoke(main, ["export", str(tmp_path / "es-en.pt"), "-o", str(folder)])
    assert result.exit_code == 0, result.output
    assert "no test set in es/en" in result.output and str(BUNDLED_DATA.parent) not in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "lexicon.safetensors",
                                                        "model.safetensors", "src.model", "tgt.model"]
    assert "## Scores" not in (folder / "README.md").read_text(encoding="utf-8")
    evaluated = runner.invoke(main, ["eval", str(tmp_path / "es-en.pt")])  # eval says so too, as one line
    assert one_line_error(evaluated) and "no test set in es/en" in evaluated.output
    assert str(BUNDLED_DATA.parent) not in evaluated.output
    test = tmp_path / "test.tsv"
    test.write_text("es\ten\nEl gato come pan.\tThe cat eats bread.\nEl perro.\tThe dog.\n", encoding="utf-8")
    result = runner.invoke(main, ["export", str(tmp_path / "es-en.pt"), "-o", str(folder), "--test", str(test)])
    assert result.exit_code == 0 and "BLEU" in result.output, result.output
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "## Scores" in card and "(2 sentences)" in card
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "model_card", failing)  # the export fails after the weights are written
    for target in (folder, tmp_path / "new"):
        failed = runner.invoke(main, ["export", str(tmp_path / "es-en.pt"), "-o", str(target), "--no-scores"])
        assert failed.exit_code != 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the earlier export, whole
    assert not (tmp_path / "new").exists()  # absent
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left beside
    monkeypatch.undo()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = runner.invoke(main, ["export", str(tmp_path / "es-en.pt"), "-o", str(tmp_path / "mine"), "--no-scores"])
    assert one_line_error(refused) and "holds files an export does not write (notes.txt)" in refused.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_damaged_or_crafted_export_is_a_one_line_error(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run_dir, _ = trained
    good = tmp_path / "good"
    assert CliRunner().invoke(main, ["export", str(run_dir), "-o", str(good), "--no-scores"]).exit_code == 0
    weights, lexicon = load_file(good / "model.safetensors"), load_file(good / "lexicon.safetensors")
    meta = json.loads((good / "config.json").read_text())
    vocab = meta["config"]["tokenizer"]["vocab_size"]

    def crafted(name, config=None, weights_file=None, lexicon_file=None):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        if weights_file is not None:
            save_file(weights_file, str(folder / "model.safetensors"), metadata={"format": "translate-export"})
        if lexicon_file is not None:
            save_file(lexicon_file, str(folder / "lexicon.safetensors"))
        return folder

    first = next(iter(weights))
    far = lexicon["translations"].clone()
    far[5, 0] = vocab + 7  # a target id past the output layer
    cases = {
        crafted("list", config=[meta]): "not a translate export",
        crafted("config", config={**meta, "config": 5}): "config.json is damaged (config",
        crafted("tied", config={**meta, "tied": {"decoder.output.weight": "no.such.weight"}}): "damaged (tied",
        crafted("tied-list", config={**meta, "tied": ["x"]}): "damaged (tied",
        crafted("progress", config={**meta, "progress": "x"}): "damaged (progress",
        crafted("missing", weights_file={k: v for k, v in weights.items() if k != first}): "weights do not fit",
        crafted("ids", lexicon_file={**lexicon, "translations": far}): "target ids outside the vocabulary",
        crafted("no-frequent", lexicon_file={"translations": lexicon["translations"]}): "lexicon is incomplete",
    }
    for folder, message in cases.items():
        result = CliRunner().invoke(main, ["decode", str(folder)], input="El perro.\n")
        assert one_line_error(result) and message in result.output, (folder.name, result.output)
