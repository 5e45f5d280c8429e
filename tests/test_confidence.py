"""The calibrated confidence (translate/confidence.py): the fit against a plain reference, its
calibration on data of known probabilities, its round trip through checkpoint and export, and the
command line end to end on a tiny run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from translate.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint
from translate.cli import main
from translate.confidence import (
    FEATURES,
    Calibrator,
    expected_calibration_error,
    features,
    fit,
    fit_logistic,
    translation_logprob,
)
from translate.errors import CheckpointError, DataError
from translate.search import length_penalty
from translate.translator import DecodeOptions, Translator

from .conftest import cli_train_args


def logistic_by_gradient_descent(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 20000, lr: float = 0.5):
    """The reference: plain gradient descent on the same objective, one step at a time."""
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        w -= lr * (x.T @ (p - y) / len(y) + l2 * w)
        b -= lr * float((p - y).mean())
    return w, b


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, their true probability of acceptable (a logistic curve), and outcomes drawn from it."""
    rng = np.random.default_rng(seed)
    logprob = rng.uniform(-3, 0, n)
    ratio = rng.normal(0, 0.3, n)
    truth = 1 / (1 + np.exp(-(2.5 * logprob + 3.0)))
    return np.stack([logprob, ratio], 1), truth, (rng.random(n) < truth).astype(float)


def test_newton_fit_reaches_the_gradient_descent_reference():
    values, _, outcomes = synthetic(400)
    x = (values - values.mean(0)) / values.std(0)
    weights, bias = fit_logistic(x, outcomes, l2=1e-2)
    ref_w, ref_b = logistic_by_gradient_descent(x, outcomes, l2=1e-2)
    assert np.allclose(weights, ref_w, atol=1e-4) and abs(bias - ref_b) < 1e-4


def test_calibrator_on_known_probabilities_is_calibrated_and_monotone():
    values, truth, outcomes = synthetic(4000)
    calibrator = fit(values.tolist(), outcomes.astype(bool).tolist(), names=("logprob",))
    fresh, fresh_truth, fresh_outcomes = synthetic(4000, seed=1)
    predicted = np.array([calibrator.probability(v) for v in fresh.tolist()])
    assert np.abs(predicted - fresh_truth).max() < 0.05  # close to the true curve
    assert expected_calibration_error(predicted, fresh_outcomes) < 0.03
    # a constant prediction at the base rate is calibrated overall but not per bin: ECE tells them apart
    skewed = np.clip(fresh_truth + 0.3, 0, 1)
    assert expected_calibration_error(skewed, fresh_outcomes) > 0.2
    grid = [calibrator.probability([lp, 0.0]) for lp in np.linspace(-6, 0, 50)]
    assert all(0 <= p <= 1 for p in grid) and all(a <= b for a, b in zip(grid, grid[1:]))
    assert calibrator.weights[0] > 0 and calibrator.dev_ece < 0.05


def test_ece_against_a_loop():
    rng = np.random.default_rng(3)
    p, y = rng.random(300), (rng.random(300) < 0.5).astype(float)
    total = 0.0
    for b in range(10):
        inside = [i for i in range(300) if min(int(p[i] * 10), 9) == b]
        if inside:
            total += len(inside) / 300 * abs(np.mean(p[inside]) - np.mean(y[inside]))
    assert expected_calibration_error(p, y) == pytest.approx(total)


def test_extreme_inputs_stay_finite_and_bounded():
    values = [[-1.0, 0.0]] * 30 + [[-0.5, 0.0]] * 30
    separable = fit(values, [False] * 30 + [True] * 30)  # perfectly separable: the ridge keeps it finite
    assert all(math.isfinite(w) for w in separable.weights)
    one_class = fit(values, [False] * 60)
    for calibrator in (separable, one_class):
        for v in ([-1e9, 0.0], [0.0, 0.0], [1e9, 5.0], features(float("-inf"), 3, 2)):
            assert 0.0 <= calibrator.probability(v) <= 1.0
    with pytest.raises(DataError, match="too few"):
        fit(values[:5], [True] * 5)


def test_logprob_undoes_the_length_penalty():
    assert translation_logprob(-2.0, 7, beam=5, alpha=1.5, sample=False) == pytest.approx(-2.0 * length_penalty(7, 1.5))
    assert translation_logprob(-2.0, 7, beam=1, alpha=1.5, sample=False) == -2.0
    assert translation_logprob(-2.0, 7, beam=5, alpha=1.5, sample=True) == -2.0
    assert features(-6.0, 3, 5) == pytest.approx([-2.0, math.log(3 / 6)])


def test_state_round_trip_and_damaged_states():
    values, _, outcomes = synthetic(200)
    calibrator = fit(values.tolist(), outcomes.astype(bool).tolist(), names=FEATURES)
    again = Calibrator.from_state(calibrator.state(), "x")
    assert again == calibrator
    for damage in ({"weights": [1.0]}, {"scale": [0.0, 1.0]}, {"features": ["nope"]}, {"bias": "x"},
                   {"bias": float("nan")}):
        with pytest.raises(CheckpointError, match="x: its calibrator is damaged"):
            Calibrator.from_state({**calibrator.state(), **damage}, "x")
    assert Calibrator.of_payload({}, "x") is None


@pytest.fixture(scope="module")
def calibrated_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("conf") / "run"
    result = CliRunner().invoke(main, cli_train_args(corpus, run_dir, **{"train.max_steps": 60,
                                                                          "train.eval_every": 30}))
    assert result.exit_code == 0, result.output
    return run_dir, result


def test_training_fits_a_calibrator_into_best_pt_and_decoding_reports_it(calibrated_run, tmp_path):
    run_dir, result = calibrated_run
    state = load_checkpoint(run_dir / "best.pt")["calibrator"]
    assert state["sentences"] == 40 and state["features"] == ["logprob"]
    translator = Translator.load(run_dir, DecodeOptions(beam=3, n_best=2))
    nbests = translator.translate(["El gato come pan.", "", "El perro bebe agua."])
    assert all(t.confidence is not None and 0 <= t.confidence <= 1 for nbest in nbests for t in nbest)
    calibrator = translator.calibrator
    for nbest in nbests:  # as the calibrator maps the translation's own figures
        t = nbest[0]
        logprob = translation_logprob(t.score, len(t.tokens) + 1, 3, DecodeOptions().alpha, False)
        assert t.confidence == pytest.approx(calibrator.probability([logprob / (len(t.tokens) + 1), 0.0]))
    # --scores: the confidence in a last column
    runner = CliRunner()
    out = runner.invoke(main, ["decode", str(run_dir), "--scores"], input="El gato come pan.\nEl perro.\n")
    rows = [line.split("\t") for line in out.stdout.strip().split("\n")]
    assert out.exit_code == 0 and all(len(r) == 3 and 0 <= float(r[2]) <= 1 for r in rows)
    assert [r[2] for r in rows] == [f"{n[0].confidence:.4f}" for n in Translator.load(run_dir).translate(
        ["El gato come pan.", "El perro."])]
    flagged = runner.invoke(main, ["decode", str(run_dir), "--min-confidence", "1"], input="El gato.\nEl perro.\n")
    assert flagged.exit_code == 0 and "line 1: confidence" in flagged.stderr and "line 2: confidence" in flagged.stderr
    quiet = runner.invoke(main, ["decode", str(run_dir), "--min-confidence", "0"], input="El gato.\n")
    assert "confidence" not in quiet.stderr
    evaluated = runner.invoke(main, ["eval", str(run_dir), "--json"])
    figures = json.loads(evaluated.stdout)
    assert 0 <= figures["confidence"] <= 1 and 0 <= figures["ece"] <= 1 and figures["threshold"] == 50


def test_calibrate_command_writes_a_copy_or_in_place_and_export_keeps_it(calibrated_run, corpus, tmp_path):
    run_dir, _ = calibrated_run
    payload = load_checkpoint(run_dir / "last.pt")
    payload.pop("calibrator", None)
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, {k: v for k, v in payload.items() if k not in ("format", "version")})
    runner = CliRunner()
    assert Translator.load(bare).translate(["El gato."])[0][0].confidence is None
    no_column = runner.invoke(main, ["decode", str(bare), "--scores"], input="El gato.\n")
    assert len(no_column.stdout.strip().split("\t")) == 2
    refused = runner.invoke(main, ["decode", str(bare), "--min-confidence", "0.5"], input="El gato.\n")
    assert refused.exit_code == 2 and "no confidence calibrator" in refused.output and "Traceback" not in refused.output
    copy = tmp_path / "copy.pt"
    result = runner.invoke(main, ["calibrate", str(bare), "--dev", str(corpus["dev"]), "-o", str(copy)])
    assert result.exit_code == 0, result.output
    assert "calibrator" not in load_checkpoint(bare) and "calibrator" in load_checkpoint(copy)
    assert checkpoint_info(copy)["confidence_calibrator"] and not checkpoint_info(bare)["confidence_calibrator"]
    assert runner.invoke(main, ["calibrate", str(bare)]).exit_code == 0  # in place, on the model's data.dev
    in_place = load_checkpoint(bare)
    assert in_place["calibrator"] == load_checkpoint(copy)["calibrator"]
    assert all(torch.equal(in_place["model"][k], payload["model"][k]) for k in payload["model"])
    folder = tmp_path / "export"
    exported = runner.invoke(main, ["export", str(bare), "-o", str(folder), "--no-scores"])
    assert exported.exit_code == 0, exported.output
    exported, original = Translator.load(folder), Translator.load(bare)
    assert exported.calibrator == original.calibrator
    assert exported.translate(["El gato."])[0][0].confidence == original.translate(["El gato."])[0][0].confidence
    meta = json.loads((folder / "config.json").read_text())
    meta["calibrator"]["weights"] = ["x"]
    (folder / "config.json").write_text(json.dumps(meta))
    (folder / "config.json").chmod(0o640)
    damaged = runner.invoke(main, ["decode", str(folder)], input="El gato.\n")
    assert damaged.exit_code == 2 and "calibrator is damaged" in damaged.output
    assert runner.invoke(main, ["calibrate", str(folder), "--dev", str(corpus["dev"])]).exit_code == 0
    assert Translator.load(folder).calibrator is not None  # an export calibrated again, in place
    assert (folder / "config.json").stat().st_mode & 0o777 == 0o640  # its file's mode kept
    assert not list(folder.glob(".*.tmp"))  # and no temporary file left


@pytest.mark.parametrize("args, message", [
    (["--dev", "missing.tsv"], "missing.tsv"),
    (["--threshold", "120"], "threshold must be between 0 and 100"),
])
def test_calibrate_bad_inputs_are_one_line_errors(calibrated_run, args, message):
    run_dir, _ = calibrated_run
    result = CliRunner().invoke(main, ["calibrate", str(run_dir / "best.pt"), "-o", "/tmp/never-written.pt", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_min_confidence_out_of_range(calibrated_run):
    run_dir, _ = calibrated_run
    result = CliRunner().invoke(main, ["decode", str(run_dir), "--min-confidence", "1.5"], input="El gato.\n")
    assert result.exit_code == 2 and "from 0 to 1" in result.output


def test_an_ensemble_has_no_confidence(calibrated_run):
    run_dir, _ = calibrated_run
    translator = Translator.load(run_dir / "best.pt", ensemble=[run_dir / "last.pt"])
    assert translator.calibrator is None and translator.translate(["El gato."])[0][0].confidence is None


def test_both_apis_carry_the_confidence_and_flag_low_ones(calibrated_run):
    from translate.serve import RequestBatcher, TranslationService

    run_dir, _ = calibrated_run
    translator = Translator.load(run_dir, DecodeOptions(beam=2))
    expected = [n[0].confidence for n in translator.translate(["El gato.", "El perro bebe agua."])]
    batcher = RequestBatcher(translator, max_wait_ms=1)
    try:
        threshold = 0.5
        service = TranslationService(batcher, min_confidence=threshold)
        sentences = ["El gato.", "El perro bebe agua."]
        own = json.loads(service.translate(json.dumps({"sentences": sentences}).encode()).body)
        assert own["confidence"] == [round(p, 4) for p in expected]
        assert own["low_confidence"] == [p < threshold for p in expected]
        nbest = json.loads(service.translate(json.dumps({"sentences": ["El gato."], "n_best": 2}).encode()).body)
        assert all(0 <= t["confidence"] <= 1 for t in nbest["translations"][0])
        libre = json.loads(service.translate(json.dumps({"q": sentences[0], "source": "es",
                                                         "target": "en"}).encode()).body)
        assert libre["confidence"] == round(expected[0], 4) and libre["low_confidence"] == (expected[0] < threshold)
        plain = json.loads(TranslationService(batcher).translate(json.dumps({"q": ["El gato."], "source": "es",
                                                                             "target": "en"}).encode()).body)
        assert plain["confidence"] == [round(expected[0], 4)] and "low_confidence" not in plain
    finally:
        batcher.close()


def test_the_page_shows_the_confidence():
    from importlib.resources import files

    page = files("translate").joinpath("page.html").read_text(encoding="utf-8")
    assert 'id="confidence"' in page and "answer.confidence" in page and "answer.low_confidence" in page


def test_the_repl_shows_the_confidence_until_turned_off(calibrated_run):
    from types import SimpleNamespace

    from translate.repl import Repl

    run_dir, _ = calibrated_run
    expected = Translator.load(run_dir).translate(["El gato."])[0][0]
    session = "El gato.\n:confidence maybe\n:confidence off\nEl gato.\n:confidence on\nEl gato.\n"
    result = CliRunner().invoke(main, ["repl", str(run_dir)], input=session)
    assert result.exit_code == 0, result.output
    shown = f"{expected.text}  (confidence {expected.confidence:.2f})"
    assert result.output.splitlines() == [shown, "usage: :confidence on|off", "confidence off", expected.text,
                                          "confidence on", shown]
    bare = Repl(SimpleNamespace(tokenizer=None, options=DecodeOptions(), calibrator=None))
    assert bare.command(":confidence on")[0] == "this model has no confidence calibrator (translate calibrate fits one)"


def test_train_calibrate_false_leaves_the_checkpoint_without_one(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, cli_train_args(corpus, run_dir, **{"train.calibrate": "false"}))
    assert result.exit_code == 0, result.output
    assert "calibrator" not in load_checkpoint(run_dir / "best.pt")
    assert Translator.load(run_dir).translate(["El gato."])[0][0].confidence is None
