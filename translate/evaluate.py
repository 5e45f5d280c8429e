"""Corpus scores with sacrebleu on detokenized text: BLEU (13a), chrF and TER, with signatures.

Validation during training and ``translate eval`` both call ``evaluate``, so their numbers agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF, TER

from .search import translate_lines
from .tokenizer import Tokenizer


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


def evaluate(model, tokenizer: Tokenizer, sources: Sequence[str], references: Sequence[str], beam: int = 5,
             batch_tokens: int = 6000, max_len_ratio: float = 2.0, alpha: float = 1.0, amp: bool = True,
             inter_threads: int = 0) -> tuple[dict[str, float | str], list[str]]:
    """Translates ``sources`` and scores them against ``references``; returns scores and outputs."""
    translations = translate_lines(model, tokenizer, sources, beam=beam, batch_tokens=batch_tokens,
                                   max_len_ratio=max_len_ratio, alpha=alpha, amp=amp, inter_threads=inter_threads)
    hypotheses = [t[0].text for t in translations]
    return score(hypotheses, references), hypotheses
