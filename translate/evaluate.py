"""Corpus scores with sacrebleu on detokenized text: BLEU (13a), chrF and TER, with signatures.

Validation during training (``evaluate``) and ``translate eval`` both translate with
``Translator.translate`` and score with ``score``, so their numbers agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER

from .config import BUNDLED_DATA, Config
from .corpus import Parallel, data_source, read_parallel
from .errors import DataError
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
             options: DecodeOptions | None = None,
             on_progress: Callable[[int], None] | None = None) -> tuple[dict[str, float | str], list[str]]:
    """Translates ``sources`` (with the translator's options unless given) and scores the best
    translations against ``references``; returns the scores and those translations."""
    hypotheses = [nbest[0].text for nbest in translator.translate(sources, options, on_progress=on_progress)]
    return score(hypotheses, references), hypotheses


def test_set(config: Config, spec: str | None = None) -> Parallel:
    """The test pairs of a model: ``spec`` when given, else its config's ``data.test`` where that
    still exists (a model trained elsewhere may name a file this machine lacks), else the bundled
    test split."""
    data = config.data
    given = spec is not None
    if spec is None:
        spec = data.test
        try:
            data_source(spec, data.src_lang, data.tgt_lang)  # a file or files here, or a hub name
        except DataError:  # a file on the machine that trained it
            spec = str(BUNDLED_DATA / "test.tsv")
    try:
        return read_parallel(spec, data.src_lang, data.tgt_lang, "test")
    except DataError:
        if given or not Path(spec).resolve().is_relative_to(BUNDLED_DATA.resolve()):
            raise
        # the bundled split's columns are spa and eng: not a model of other language codes' (nor its install path)
        raise DataError(f"no test set in {data.src_lang}/{data.tgt_lang} for this model: the bundled split is "
                        f"spa/eng; give one with --test FILE (or --src/--ref)") from None
