"""Corpus scores with sacrebleu on detokenized text: BLEU (13a), chrF and TER, with signatures.

Validation during training and ``translate eval`` both call ``evaluate``, so their numbers agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF, TER

from .translator import DecodeOptions, Translator


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    metrics = {"bleu": BLEU(), "chrf": CHRF(), "ter": TER()}
    result: dict[str, float | str] = {}
    signatures = []
    for name, metric in metrics.items():
        result[name] = round(metric.corpus_score(list(hypotheses), [list(references)]).score, 2)
        signatures.append(f"{name.upper()}: {metric.get_signature()}")
    result["signature"] = " / ".join(signatures)
    return result


def evaluate(translator: Translator, sources: Sequence[str], references: Sequence[str],
             options: DecodeOptions | None = None) -> tuple[dict[str, float | str], list[str]]:
    """Translates ``sources`` (with the translator's options unless given) and scores the best
    translations against ``references``; returns the scores and those translations."""
    hypotheses = [nbest[0].text for nbest in translator.translate(sources, options)]
    return score(hypotheses, references), hypotheses
