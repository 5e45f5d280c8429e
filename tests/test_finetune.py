"""Fine-tuning a trained model (train.init_from), mixed fine-tuning (data.mix) and extra dev sets
(data.extra_dev): what a run takes from its source and what starts fresh, where it came from, the
mixed shares, resume == uninterrupted, and one-line errors that write nothing."""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from translate.build import build_trainer, train
from translate.checkpoint import load_checkpoint
from translate.cli import main
from translate.data import MixedData
from translate.encoded import Encoded
from translate.export import export_model
from translate.schedules import LRSchedule, scaled_lr
from translate.tokenizer import Tokenizer
from translate.training import Trainer

from .conftest import cli_train_args, kill_after_first_checkpoint, make_pairs, tiny, write_tsv


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    """A tiny trained model: its run directory, and its export."""
    root = tmp_path_factory.mktemp("source")
    pairs = make_pairs(600, seed=1)
    (root / "tok").mkdir()
    Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=80).save(root / "tok")
    config = tiny(corpus, str(root / "tok" / "src.model"), **{"train.max_steps": 20, "train.eval_every": 10})
    train(config, root / "run")
    export_model(root / "run", root / "export", scores=False)
    return {"run": root / "run", "export": root / "export", "config": config, "root": root}


@pytest.fixture(scope="module")
def new_data(tmp_path_factory):
    """The new domain: other sentences of the same words, a training set, a dev set, and the dev set
    again as text files whose suffixes are not the columns' names."""
    root = tmp_path_factory.mktemp("new")
    dev = make_pairs(20, seed=12)
    (root / "words.dev.es").write_text("".join(s + "\n" for s, _ in dev), encoding="utf-8")
    (root / "words.dev.en").write_text("".join(t + "\n" for _, t in dev), encoding="utf-8")
    return {"train": write_tsv(root / "new.tsv", make_pairs(120, seed=11)),
            "dev": write_tsv(root / "newdev.tsv", dev), "pair": f"{root / 'words.dev'}.{{es,en}}"}


def finetune_config(corpus, source, new_data, **extra):
    """A fine-tuning run's config, with the tiny overrides (whose model.* and tokenizer.* are the
    source's: an override equal to the source's value is no conflict)."""
    return tiny(corpus, None, **{"train.init_from": str(source["run"]), "data.train": str(new_data["train"]),
                                 "data.dev": str(new_data["dev"]), "train.max_steps": 8, "train.eval_every": 4,
                                 **extra})


@pytest.mark.parametrize("where", ["checkpoint", "run", "export"])
def test_finetuning_starts_from_the_source_weights_with_a_fresh_run(corpus, source, new_data, tmp_path, where):
    given = {"checkpoint": source["run"] / "best.pt", "run": source["run"], "export": source["export"]}[where]
    config = finetune_config(corpus, source, new_data, **{"train.init_from": str(given)})
    trainer = build_trainer(config, tmp_path / "ft")
    best = load_checkpoint(source["run"] / "best.pt")
    weights = trainer.model.state_dict()
    assert weights.keys() == best["model"].keys()
    assert all(torch.equal(weights[name], best["model"][name]) for name in weights)
    assert trainer.progress.step == 0 and trainer.progress.best_bleu == -1 and not trainer.optimizer.state
    assert trainer.lr_schedule.state_dict() == LRSchedule(config.train, scaled_lr(config.train, 1)).state_dict()
    assert trainer.config.model == source["config"].model and trainer.config.tokenizer == source["config"].tokenizer
    assert trainer.config.data.train == str(new_data["train"]) and trainer.config.train.init_from == str(given)
    assert Tokenizer.load(tmp_path / "ft" / "src.model").fingerprint == best["tokenizer_fingerprint"]
    assert trainer.origin["step"] == best["progress"]["step"]
    assert "init_from: " in (tmp_path / "ft" / "config.yaml").read_text()
    # its dev figures are those of the checkpoint it saves: decoded without name stand-ins
    assert not trainer.validator.translator().stand_in_names


def test_a_finetuning_run_may_set_its_own_dropout_and_keeps_it_on_resume(corpus, source, new_data, tmp_path):
    # dropout is how the weights train, not what they are (OpenNMT-py's -dropout with -train_from)
    assert source["config"].model.dropout != 0.05
    config = finetune_config(corpus, source, new_data, **{"model.dropout": 0.05})
    trainer = build_trainer(config, tmp_path / "ft")
    assert trainer.config.model.dropout == 0.05
    assert trainer.config.model == source["config"].model.__class__(**{**source["config"].model.__dict__,
                                                                       "dropout": 0.05})
    rates = {module.p for module in trainer.model.modules() if isinstance(module, torch.nn.Dropout)}
    assert rates == {0.05}
    train(config, tmp_path / "ft")
    assert load_checkpoint(tmp_path / "ft" / "last.pt")["config"]["model"]["dropout"] == 0.05
    # unset, the source's; the same value on resume is no conflict
    assert build_trainer(finetune_config(corpus, source, new_data), tmp_path / "plain").config.model.dropout \
        == source["config"].model.dropout
    resumed = build_trainer(finetune_config(corpus, source, new_data, **{"model.dropout": 0.05,
                                                                         "train.max_steps": 12}),
                            tmp_path / "ft", resume=True)
    assert resumed.config.model.dropout == 0.05 and resumed.progress.step == 8


def test_provenance_in_the_checkpoint_info_and_card(corpus, source, new_data, tmp_path):
    result = train(finetune_config(corpus, source, new_data), tmp_path / "ft")
    assert result.steps == 8  # a fresh count and budget
    payload = load_checkpoint(tmp_path / "ft" / "last.pt")
    origin, best = payload["init_from"], load_checkpoint(source["run"] / "best.pt")
    assert origin["path"] == str((source["run"] / "best.pt").absolute())
    assert origin["sha256"] == hashlib.sha256((source["run"] / "best.pt").read_bytes()).hexdigest()
    assert (origin["step"], origin["best_dev_bleu"]) == (best["progress"]["step"], best["progress"]["best_bleu"])
    assert origin["init_from"] is None
    from translate.translator import Translator
    # its names were learned from the new data, which its vocabulary was not fitted on: no name stand-ins
    assert Translator.load(source["run"]).stand_in_names and not Translator.load(tmp_path / "ft").stand_in_names
    runner = CliRunner()
    info = json.loads(runner.invoke(main, ["info", str(tmp_path / "ft" / "last.pt"), "--json"]).output)
    assert info["init_from"] == origin and info["step"] == 8
    text = runner.invoke(main, ["info", str(tmp_path / "ft")]).output
    assert f"fine-tuned from {origin['path']} (step {origin['step']}" in text
    export_model(tmp_path / "ft", tmp_path / "export", scores=False)
    card = (tmp_path / "export" / "README.md").read_text(encoding="utf-8")
    assert f"- Fine-tuned from: {origin['path']} (step {origin['step']}" in card
    # fine-tuned again from that export: the chain of sources, newest first
    again = finetune_config(corpus, source, new_data, **{"train.init_from": str(tmp_path / "export"),
                                                          "train.max_steps": 2, "train.eval_every": 2})
    train(again, tmp_path / "again")
    chain = load_checkpoint(tmp_path / "again" / "last.pt")["init_from"]
    assert chain["path"] == str((tmp_path / "export").absolute()) and chain["init_from"] == origin
    text = runner.invoke(main, ["info", str(tmp_path / "again")]).output
    assert "which was from" in text and origin["path"] in text


def test_an_adapted_vocabulary_is_fitted_on_the_new_data_and_carries_the_shared_rows(corpus, source, new_data,
                                                                                    tmp_path):
    config = finetune_config(corpus, source, new_data, **{"train.init_vocab": "adapt"})
    trainer = build_trainer(config, tmp_path / "ft")
    best = load_checkpoint(source["run"] / "best.pt")
    old, new = Tokenizer(best["tokenizer"]["src"], best["tokenizer"]["tgt"]), Tokenizer.load(tmp_path / "ft")
    assert new.fingerprint != old.fingerprint and trainer.tokenizer.fingerprint == new.fingerprint
    assert trainer.config.tokenizer.model is None  # trained by the run, with the source's settings
    assert trainer.config.tokenizer.vocab_size == source["config"].tokenizer.vocab_size
    weights = trainer.model.state_dict()
    shared = [(i, old.src.piece_to_id(new.src.id_to_piece(i))) for i in range(4, new.src_vocab_size)]
    shared = [(i, j) for i, j in shared if j != old.src.unk_id()]
    assert shared and len(shared) < new.src_vocab_size - 4
    for i, j in shared:
        assert torch.equal(weights["encoder.embed.weight"][i], best["model"]["encoder.embed.weight"][j])
        assert torch.equal(weights["decoder.output.bias"][i], best["model"]["decoder.output.bias"][j])
    assert all(torch.equal(weights[k], best["model"][k]) for k in weights if "embed" not in k and "output" not in k)
    # its vocabulary was fitted on the data it learns names from: name stand-ins, as a run from scratch
    assert trainer.validator.translator().stand_in_names
    # from the model's export, the same start
    exported = finetune_config(corpus, source, new_data, **{"train.init_vocab": "adapt",
                                                             "train.init_from": str(source["export"])})
    again = build_trainer(exported, tmp_path / "export").model.state_dict()
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    # a given tokenizer is taken as the new one
    given = finetune_config(corpus, source, new_data, **{
        "train.init_vocab": "adapt", "tokenizer.model": str(source["root"] / "tok" / "src.model")})
    assert build_trainer(given, tmp_path / "given").tokenizer.fingerprint == old.fingerprint


def test_an_adapted_run_says_so_in_its_info_and_card(corpus, source, new_data, tmp_path):
    args = cli_train_args(corpus, tmp_path / "ft", **{"train.max_steps": 4, "train.eval_every": 2})
    args += ["--init-from", str(source["run"]), "--adapt-vocab", "--train", str(new_data["train"]),
             "--dev", str(new_data["dev"])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "ft" / "last.pt")["config"]["train"]["init_vocab"] == "adapt"
    text = CliRunner().invoke(main, ["info", str(tmp_path / "ft")]).output
    assert "vocabulary      adapted: a tokenizer of the fine-tuning data" in text
    export_model(tmp_path / "ft", tmp_path / "export", scores=False)
    assert "- Vocabulary: adapted to the fine-tuning data" in (tmp_path / "export" / "README.md").read_text()


def test_a_mixed_run_trains_its_tokenizer_on_the_mixed_share_of_characters(corpus, source, new_data, tmp_path):
    from translate.build import mixed_sample
    from translate.corpus import load_pairs, sample_sentences

    for ratio in (0.25, 1.0, 1000.0):
        config = finetune_config(corpus, source, new_data, **{"data.mix": str(corpus["train"]),
                                                               "data.mix_ratio": ratio})
        src, tgt = mixed_sample(config, 3000)
        sizes = [len(s) + len(t) for s, t in zip(src, tgt)]
        table = load_pairs(str(corpus["train"]), "spa", "eng", "train")
        if sum(sizes) < ratio * 3000:  # the whole corpus was not enough
            assert len(src) == len(table)
        else:  # the fewest pairs that reach the share
            assert sum(sizes[:-1]) < ratio * 3000 <= sum(sizes)
        every = zip(sample_sentences(table, "spa", len(table), 0), sample_sentences(table, "eng", len(table), 0))
        assert set(zip(src, tgt)) <= set(every)


def encoded(lengths):
    return Encoded([[5] * n for n in lengths]), Encoded([[6] * n for n in lengths])


def test_mixing_draws_a_seeded_fresh_sample_of_the_mixed_corpus_each_epoch():
    rng = np.random.default_rng(0)
    new = encoded(rng.integers(1, 20, 50))
    mixed_lengths = rng.integers(1, 20, 500)
    mixed_lengths[:40] = 30  # longer than max_len: never drawn
    data = MixedData(new, encoded(mixed_lengths), ratio=2.0, batch_tokens=200, seed=3, max_len=25)
    usable = mixed_lengths[mixed_lengths <= 25]
    want = round(2.0 * (new[0].lengths.sum() + 50) / (usable.mean() + 1))  # tokens with EOS, at the mean length
    assert want != 100 and (data.per_epoch, len(data)) == (want, 50 + want)
    drawn = []
    for epoch in range(3):
        pairs = np.concatenate(data.epoch_batches(epoch))
        assert len(pairs) == len(set(pairs.tolist())) == 50 + want  # every new pair, the mixed ones, each once
        assert set(range(50)) <= set(pairs.tolist())
        mixed = pairs[pairs >= 50] - 50
        assert len(mixed) == want and (mixed_lengths[mixed] <= 25).all()
        drawn.append(set(mixed.tolist()))
        again = MixedData(new, encoded(mixed_lengths), ratio=2.0, batch_tokens=200, seed=3, max_len=25)
        assert all(np.array_equal(a, b) for a, b in zip(again.epoch_batches(epoch), data.epoch_batches(epoch)))
    assert drawn[0] != drawn[1] != drawn[2]  # a new sample each epoch
    other = MixedData(new, encoded(mixed_lengths), ratio=2.0, batch_tokens=200, seed=4, max_len=25)
    other_pairs = np.concatenate(other.epoch_batches(0))
    assert set((other_pairs[other_pairs >= 50] - 50).tolist()) != drawn[0]  # another seed, another sample
    everything = MixedData(new, encoded(mixed_lengths), ratio=100.0, batch_tokens=200, seed=3, max_len=25)
    assert everything.per_epoch == 460  # more than there is: all the usable pairs


def test_mixing_counts_tokens_so_short_sentences_are_not_a_fraction_of_the_epoch():
    """Long new pairs (40 pieces) and short mixed ones (9): ratio 1 draws about as many mixed
    tokens as new ones, so about 4 mixed pairs per new pair."""
    new = encoded([40] * 200)
    mixed = encoded([9] * 5000)
    for ratio in (0.5, 1.0, 2.0):
        data = MixedData(new, mixed, ratio=ratio, batch_tokens=400, seed=1, max_len=80)
        drawn = np.flatnonzero(data.epoch_pairs(0))[200:]
        mixed_tokens, new_tokens = data.lengths[drawn].sum(), data.lengths[:200].sum()
        assert abs(mixed_tokens / new_tokens - ratio) < 0.01 and len(drawn) == round(ratio * 200 * 41 / 10)


def test_extra_dev_sets_are_scored_logged_and_plotted(corpus, new_data, tmp_path):
    """Any run (here one from scratch that mixes) scores its extra dev sets as eval scores them."""
    run_dir = tmp_path / "run"
    args = cli_train_args(corpus, run_dir, **{"train.max_steps": 6, "train.eval_every": 3})
    args += ["--train", str(new_data["train"]), "--mix", str(corpus["train"]), "--dev", str(corpus["dev"]),
             "--dev", str(new_data["dev"]), "--dev", new_data["pair"]]
    runner = CliRunner()
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    devs = [r for r in records if r["kind"] == "dev"]
    assert [r["step"] for r in devs] == [3, 6]
    for name in ("newdev", "words.dev"):
        assert all({f"{name}/loss", f"{name}/bleu", f"{name}/chrf"} <= set(r) for r in devs)
    for name, test in (("newdev", new_data["dev"]), ("dev", corpus["dev"])):
        scored = json.loads(runner.invoke(main, ["eval", str(run_dir / "last.pt"), "--test", str(test),
                                                 "--beam", "1", "--json"]).output)
        key = "dev_bleu" if name == "dev" else f"{name}/bleu"
        assert devs[-1][key] == pytest.approx(scored["bleu"], abs=0.01)
    assert devs[-1]["newdev/bleu"] == devs[-1]["words.dev/bleu"]  # the same pairs, read from text files
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert re.search(r"mixing \d+ of the 600 pairs .* their tokens per new token", log)
    assert "newdev: loss" in log and "words.dev: loss" in log
    from translate.plots import extra_dev_names

    assert extra_dev_names(devs) == ["newdev", "words.dev"]
    plotted = runner.invoke(main, ["plot", str(run_dir), "-o", str(tmp_path / "curves.png")])
    assert plotted.exit_code == 0 and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    export_model(run_dir, tmp_path / "export", scores=False)
    card = (tmp_path / "export" / "README.md").read_text(encoding="utf-8")
    assert f"- Mixed into each epoch: 1 token(s) of {corpus['train']} per training token" in card
    assert "Fine-tuned from" not in card


def test_extra_dev_sets_in_one_key_keep_their_braces(corpus):
    config = tiny(corpus, None, **{"data.extra_dev": "a.tsv, b.dev.{es,en},c"})
    assert config.data.extra_dev == ("a.tsv", "b.dev.{es,en}", "c")


def params(run_dir):
    return load_checkpoint(run_dir / "last.pt")["model"]


@pytest.mark.parametrize("vocabulary", ["keep", "adapt"])
def test_a_stopped_mixed_finetuning_run_resumes_as_if_uninterrupted(corpus, source, new_data, tmp_path,
                                                                     monkeypatch, vocabulary):
    """... without reading its source again (it is gone by then), with its own vocabulary or one
    adapted to its data."""
    shutil.copy(source["run"] / "best.pt", tmp_path / "source.pt")
    config = finetune_config(corpus, source, new_data, **{
        "train.init_from": str(tmp_path / "source.pt"), "data.mix": str(corpus["train"]), "data.mix_ratio": 0.5,
        "train.max_steps": 24, "train.eval_every": 5, "train.init_vocab": vocabulary})
    whole = train(config, tmp_path / "whole")
    assert whole.epochs >= 2  # the resumed run draws later epochs' samples too
    # an adapted vocabulary is fitted on the new pairs and on the mixed corpus's share
    assert ("of the mixed corpus" in (tmp_path / "whole" / "train.log").read_text()) == (vocabulary == "adapt")
    original = Trainer.train_step

    def stop(self, batches, group_tokens=None):
        result = original(self, batches, group_tokens)
        if self.progress.step + 1 >= 13:
            self.stop_signal = "SIGTERM"
        return result

    monkeypatch.setattr(Trainer, "train_step", stop)
    assert train(config, tmp_path / "split").progress.step == 13
    monkeypatch.setattr(Trainer, "train_step", original)
    (tmp_path / "source.pt").unlink()
    assert train(config, tmp_path / "split", resume=True).progress.step == 24
    weights, split = params(tmp_path / "whole"), params(tmp_path / "split")
    for name in weights:
        torch.testing.assert_close(split[name], weights[name], atol=1e-6, rtol=1e-5)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["init_from"] == load_checkpoint(
        tmp_path / "whole" / "last.pt")["init_from"]


@pytest.mark.slow
def test_sigkill_then_resume_of_a_mixed_finetuning_run_equals_uninterrupted(corpus, source, new_data, tmp_path):
    import subprocess
    import sys

    def command(run_dir, *extra):
        args = cli_train_args(corpus, run_dir, **{"train.max_steps": 80, "train.eval_every": 10})
        return [sys.executable, "-m", "translate", *args, "--init-from", str(source["run"]), "--train",
                str(new_data["train"]), "--dev", str(new_data["dev"]), "--mix", str(corpus["train"]), *extra]

    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True)
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(command(killed), killed)
    assert 0 < load_checkpoint(killed / "last.pt")["progress"]["step"] < 80
    resumed = subprocess.run(command(killed, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole, split = params(tmp_path / "whole"), params(killed)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def bad_sources(source, root):
    """A truncated checkpoint, a text file and a .pt that holds no model."""
    best = (source["run"] / "best.pt").read_bytes()
    (root / "truncated.pt").write_bytes(best[: len(best) // 2])
    (root / "notes.txt").write_text("not a model\n", encoding="utf-8")
    torch.save({"weights": torch.zeros(3)}, root / "random.pt")
    write_tsv(root / "empty.tsv", [])
    (root / "othertok").mkdir(exist_ok=True)
    Tokenizer.train([s for s, _ in make_pairs(300, seed=5)], [t for _, t in make_pairs(300, seed=5)],
                    vocab_size=60).save(root / "othertok")


BAD = [
    ({"init": "{root}/missing.pt"}, "--init-from {root}/missing.pt: checkpoint not found"),
    ({"init": "{root}/truncated.pt"}, "truncated.pt: not a readable checkpoint (truncated or corrupt"),
    ({"init": "{root}/notes.txt"}, "notes.txt: not a readable checkpoint (not a torch file)"),
    ({"init": "{root}/random.pt"}, "random.pt: not a translate checkpoint"),
    ({"set": "model.hidden_dim=64"}, "model.hidden_dim=64 conflicts with 32 of the model given with --init-from"),
    ({"set": "tokenizer.vocab_size=90"}, "tokenizer.vocab_size=90 conflicts with 80 of the model given"),
    ({"set": "tokenizer.model={root}/othertok/src.model"}, "is another tokenizer (fingerprint"),
    ({"train": "{root}/empty.tsv"}, "empty.tsv: the corpus is empty"),
    ({"mix": "{root}/empty.tsv"}, "empty.tsv: the corpus is empty"),
    ({"set": "data.streaming=true", "mix": "{new}"}, "drop data.streaming (--streaming) or data.mix (--mix)"),
    ({"set": "train.init_vocab=adapt", "train": "{root}/empty.tsv"}, "empty.tsv: the corpus is empty"),
    ({"set": "train.init_vocab=merge"}, "train.init_vocab"),
]


@pytest.mark.parametrize("case, message", BAD, ids=[
    "missing", "truncated", "text file", "random pt", "model override", "tokenizer override", "other tokenizer",
    "empty corpus", "empty mixed corpus", "streaming mix", "adapted to an empty corpus", "unknown vocabulary"])
def test_bad_finetuning_input_is_one_line_and_writes_nothing(corpus, source, new_data, tmp_path, case, message):
    bad_sources(source, tmp_path)
    fill = {"root": str(tmp_path), "new": str(new_data["train"])}
    run_dir = tmp_path / "ft"
    args = cli_train_args(corpus, run_dir, **{"train.max_steps": 2})
    args += ["--init-from", case.get("init", str(source["run"])).format(**fill),
             "--train", case.get("train", "{new}").format(**fill), "--dev", str(new_data["dev"])]
    args += ["--set", case["set"].format(**fill)] if "set" in case else []
    args += ["--mix", case["mix"].format(**fill)] if "mix" in case else []
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message.format(**fill) in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not run_dir.exists()


def test_resuming_with_another_source_is_refused_and_changes_nothing(corpus, source, new_data, tmp_path):
    run_dir = tmp_path / "ft"
    args = cli_train_args(corpus, run_dir, **{"train.max_steps": 2, "train.eval_every": 2})
    args += ["--train", str(new_data["train"]), "--dev", str(new_data["dev"])]
    runner = CliRunner()
    assert runner.invoke(main, [*args, "--init-from", str(source["run"])]).exit_code == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    result = runner.invoke(main, [*args, "--init-from", str(source["export"]), "--resume"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"train.init_from={str(source['export'])!r} differs from the run's saved value" in result.output
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    again = runner.invoke(main, [*args, "--init-from", str(source["run"])])  # a new run there: refused as ever
    assert again.exit_code == 2 and "already holds a run" in again.output
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before

