"""Calibrated confidence: the probability that a translation is acceptable, from its own figures.

A translation's features (``CHOSEN`` of ``FEATURES``: its mean log-probability per target piece) go
through a logistic regression (Platt scaling) fitted on the dev set,
where "acceptable" means a sentence-level chrF against the reference of at least ``THRESHOLD``. The
fitted ``Calibrator`` is a handful of numbers, kept in the checkpoint (``calibrator``) and the export
(config.json); a checkpoint without one decodes with no confidence. Fitted at the end of training
(``train.calibrate``) or afterwards by ``translate calibrate`` (``fit_on_dev`` and ``store``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import EXPORT_FILES, load_checkpoint, resolve, save_checkpoint, write_atomically
from .errors import CheckpointError, DataError
from .search import length_penalty

THRESHOLD = 50.0  # sentence chrF (0-100) from which a translation counts as acceptable
BINS = 10  # equal-width bins of the expected calibration error
# what a calibrator may read of a translation: mean log-probability per target piece, and the log of its
# pieces over its source's (EOS included in both)
FEATURES = ("logprob", "length_ratio")
# what it reads by default: the length ratio added nothing on the bundled test (Brier 0.165 against 0.164 for
# the log-probability alone) and hurt on the Bible verses (ECE 0.246 against 0.226); bench/confidence.py
CHOSEN = ("logprob",)
L2 = 1e-3  # ridge on the weights of the standardised features: finite weights when the dev set is separable
MIN_SENTENCES = 20  # fewer dev pairs than this cannot fit a calibrator worth its name


def features(logprob: float, tgt_pieces: int, src_pieces: int) -> list[float]:
    """A translation's ``FEATURES``: ``logprob`` is its summed log-probability over ``tgt_pieces``
    pieces (EOS included); ``src_pieces`` counts its source's pieces (without EOS)."""
    per_piece = logprob / max(1, tgt_pieces) if math.isfinite(logprob) else -100.0
    return [max(per_piece, -100.0), math.log(max(1, tgt_pieces) / (src_pieces + 1))]


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, steps: int = 100) -> tuple[np.ndarray, float]:
    """Weights and bias of a logistic regression of ``y`` (n,) in {0, 1} on ``x`` (n, k), by Newton's
    method on the mean log-loss plus ``l2``/2 |w|^2 (the bias is not penalised)."""
    n, k = x.shape
    design = np.hstack([x, np.ones((n, 1))])  # (n, k + 1)
    theta = np.zeros(k + 1)
    ridge = np.diag([l2] * k + [0.0])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-design @ theta))  # (n,)
        grad = design.T @ (p - y) / n + ridge @ theta
        hess = (design * (p * (1 - p))[:, None]).T @ design / n + ridge + 1e-9 * np.eye(k + 1)
        delta = np.linalg.solve(hess, grad)
        theta -= delta
        if np.abs(delta).max() < 1e-10:
            break
    return theta[:k], float(theta[k])


@dataclass(frozen=True)
class Calibrator:
    """Platt scaling over standardised features: p = sigmoid(w . (f - mean) / scale + bias)."""

    features: tuple[str, ...]  # which of ``FEATURES`` it reads, in order
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float = THRESHOLD  # the sentence chrF it was fitted to predict
    sentences: int = 0  # dev pairs it was fitted on
    dev_ece: float = 0.0  # its expected calibration error on those pairs (in-sample)

    def probability(self, values: Sequence[float]) -> float:
        """The probability of acceptable for one translation's ``features`` (all of ``FEATURES``)."""
        chosen = [values[FEATURES.index(name)] for name in self.features]
        z = self.bias + sum(w * (v - m) / s for w, v, m, s in zip(self.weights, chosen, self.mean, self.scale))
        return 1.0 / (1.0 + math.exp(-min(max(z, -50.0), 50.0)))

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint (``torch.load(weights_only=True)``) or config.json."""
        return {**asdict(self), "features": list(self.features), "mean": list(self.mean),
                "scale": list(self.scale), "weights": list(self.weights)}

    @classmethod
    def from_state(cls, state: Any, where: str) -> Calibrator:
        """A calibrator from ``state``, or a CheckpointError that names ``where`` when it is damaged."""
        try:
            names = tuple(state["features"])
            numbers = [tuple(float(v) for v in state[key]) for key in ("mean", "scale", "weights")]
            calibrator = cls(names, *numbers, bias=float(state["bias"]), threshold=float(state["threshold"]),
                             sentences=int(state.get("sentences", 0)), dev_ece=float(state.get("dev_ece", 0.0)))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: its calibrator is damaged; fit it again with "
                                  f"`translate calibrate`") from None
        if (not names or any(name not in FEATURES for name in names) or any(len(v) != len(names) for v in numbers)
                or any(s <= 0 for s in calibrator.scale)
                or not all(map(math.isfinite, [*numbers[0], *numbers[1], *numbers[2], calibrator.bias]))):
            raise CheckpointError(f"{where}: its calibrator is damaged; fit it again with `translate calibrate`")
        return calibrator

    @classmethod
    def of_payload(cls, payload: dict[str, Any], where: str) -> Calibrator | None:
        """The calibrator a checkpoint's (or export's) payload carries; None when it has none."""
        state = payload.get("calibrator")
        return None if state is None else cls.from_state(state, where)


def fit(values: Sequence[Sequence[float]], acceptable: Sequence[bool],
        names: Sequence[str] = CHOSEN, threshold: float = THRESHOLD) -> Calibrator:
    """A ``Calibrator`` of the features ``names`` fitted to ``acceptable``; ``values``: each
    translation's ``FEATURES``."""
    if len(values) < MIN_SENTENCES:
        raise DataError(f"{len(values)} dev pairs are too few to calibrate on; give at least {MIN_SENTENCES}")
    columns = [FEATURES.index(name) for name in names]
    x = np.asarray(values, dtype=np.float64)[:, columns]  # (n, k)
    y = np.asarray(acceptable, dtype=np.float64)  # (n,)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-6] = 1.0
    weights, bias = fit_logistic((x - mean) / scale, y)
    calibrator = Calibrator(tuple(names), tuple(mean.tolist()), tuple(scale.tolist()), tuple(weights.tolist()),
                            bias, threshold, len(y))
    probabilities = [calibrator.probability(v) for v in values]
    return Calibrator(**{**asdict(calibrator), "dev_ece": round(expected_calibration_error(probabilities, y), 4)})


def expected_calibration_error(probabilities: Sequence[float], outcomes: Sequence[float], bins: int = BINS) -> float:
    """ECE: over ``bins`` equal-width bins of probability, the gap between mean probability and the
    share of outcomes that came true, weighted by the bin's share of the predictions."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    if p.size == 0:
        return 0.0
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() / p.size * abs(p[inside].mean() - y[inside].mean())
    return float(total)


def sentence_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """Each hypothesis' chrF (sacrebleu's defaults, as ``evaluate.score``) against its reference."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    return [metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]


def translation_logprob(score: float, pieces: int, beam: int, alpha: float, sample: bool) -> float:
    """The summed log-probability behind a translation's ``score``: beam search divides it by the
    length penalty of its ``pieces`` (EOS included); greedy search and sampling do not."""
    if beam == 1 or sample:
        return score
    return score * length_penalty(pieces, alpha)


def translation_features(translation, src_pieces: int, options) -> list[float]:
    """The ``FEATURES`` of one translation (a ``Translation``) decoded with ``options`` from a
    source of ``src_pieces`` pieces."""
    pieces = len(translation.tokens) + 1
    logprob = translation_logprob(translation.score, pieces, options.beam, options.alpha, options.sample)
    return features(logprob, pieces, src_pieces)


def attach(translator, lines: Sequence[str], nbests, options) -> None:
    """Sets ``confidence`` on every translation of ``nbests`` (the n-best lists of ``lines``) by
    ``translator.calibrator``; leaves it None without one."""
    calibrator = translator.calibrator
    if calibrator is None:
        return
    sources = translator.tokenizer.encode_src(list(lines))
    for ids, nbest in zip(sources, nbests):
        for t in nbest:
            t.confidence = calibrator.probability(translation_features(t, len(ids), options))


def dev_features(translator, sources: Sequence[str], references: Sequence[str],
                 options=None) -> tuple[list[list[float]], list[float], list[str]]:
    """Decodes ``sources`` as ``translator`` decodes (``options``, else its own): each best
    translation's ``FEATURES``, its sentence chrF against the reference, and its text."""
    options = options or translator.options
    nbests = translator.translate(list(sources), options)
    encoded = translator.tokenizer.encode_src(list(sources))
    values = [translation_features(nbest[0], len(ids), options) for ids, nbest in zip(encoded, nbests)]
    texts = [nbest[0].text for nbest in nbests]
    return values, sentence_chrf(texts, references), texts


def fit_on_dev(translator, sources: Sequence[str], references: Sequence[str], threshold: float = THRESHOLD,
               names: Sequence[str] = CHOSEN) -> Calibrator:
    """A calibrator for ``translator`` as it decodes, fitted on the dev pairs given."""
    if not 0 < threshold < 100:
        raise DataError(f"the chrF threshold must be between 0 and 100, not {threshold:g}")
    values, chrf, _ = dev_features(translator, sources, references)
    return fit(values, [c >= threshold for c in chrf], names, threshold)


def store(checkpoint: str | Path, calibrator: Calibrator, output: str | Path | None = None) -> Path:
    """Writes ``calibrator`` into ``checkpoint`` (a .pt file, or an exported folder's config.json),
    or into a copy at ``output``; atomically, so that the file is whole before and after. Returns
    the path written."""
    source = resolve(checkpoint)
    if source.is_dir():  # an export: its config.json, rewritten in place (a copy of a folder is the user's to make)
        if output is not None:
            raise DataError("--output is for a .pt checkpoint; copy the exported folder and calibrate the copy")
        meta_path = source / EXPORT_FILES[1]
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["calibrator"] = calibrator.state()
        data = (json.dumps(meta, indent=1) + "\n").encode("utf-8")
        write_atomically(meta_path, lambda sink: sink.write(data), "exported model file",
                         "copy the exported folder somewhere writable and calibrate the copy",
                         mode=meta_path.stat().st_mode & 0o777)
        return meta_path
    payload = load_checkpoint(source)
    payload["calibrator"] = calibrator.state()
    payload.pop("format", None)
    payload.pop("version", None)
    target = Path(output) if output is not None else source
    save_checkpoint(target, payload)
    return target


def calibration_figures(nbests, references: Sequence[str], threshold: float) -> dict[str, float]:
    """How well the best translations' confidence (``nbests``: n-best lists with one) is
    calibrated against ``references``: their mean confidence, the share of them acceptable
    (sentence chrF at least ``threshold``) and the expected calibration error (``BINS`` bins)."""
    hypotheses = [nbest[0].text for nbest in nbests]
    probabilities = [nbest[0].confidence for nbest in nbests]
    acceptable = [c >= threshold for c in sentence_chrf(hypotheses, references)]
    return {"confidence": round(float(np.mean(probabilities)), 4) if probabilities else 0.0,
            "acceptable": round(float(np.mean(acceptable)), 4) if acceptable else 0.0,
            "ece": round(expected_calibration_error(probabilities, acceptable), 4), "threshold": threshold}


def check_min_confidence(value: float | None, calibrator: Calibrator | None, where: str) -> None:
    """A ``--min-confidence``: from 0 to 1, and only for a checkpoint with a calibrator."""
    if value is None:
        return
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise DataError(f"--min-confidence must be a number from 0 to 1, not {value!r}")
    if calibrator is None:
        raise DataError(f"--min-confidence needs a calibrated checkpoint, and {where} has no confidence "
                        f"calibrator; fit one with `translate calibrate {where}`")


def dev_pairs(config, spec: str | None = None):
    """The pairs to calibrate a model on: ``spec`` when given, else its ``data.dev`` where this
    machine has it, else the bundled dev split (for a model in its languages, spa/eng)."""
    from .config import BUNDLED_DATA
    from .corpus import read_parallel

    data = config.data
    if spec is not None:
        return read_parallel(spec, data.src_lang, data.tgt_lang, "dev")
    try:
        return read_parallel(data.dev, data.src_lang, data.tgt_lang, "dev")
    except DataError:
        try:
            return read_parallel(str(BUNDLED_DATA / "dev.tsv"), data.src_lang, data.tgt_lang, "dev")
        except DataError:
            raise DataError(f"no dev set in {data.src_lang}/{data.tgt_lang} for this model here (its data.dev is "
                            f"{data.dev}); give one with --dev FILE") from None
