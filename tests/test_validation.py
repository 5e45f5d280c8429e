"""The dev figures of a run are what `translate eval` says of the dev set, and the teacher-forced
loss of its pairs, each computed here plainly."""

import math

import pytest
import torch

from translate.data import TrainingData, collate
from translate.encoded import Encoded
from translate.evaluate import score
from translate.translator import DecodeOptions, Translator
from translate.validation import DevSet, Validator, metric_score

from .conftest import make_pairs


def dev_set(tokenizer, sources, references):
    ids = Encoded(tokenizer.encode_src(sources)), Encoded(tokenizer.encode_tgt(references))
    return DevSet(TrainingData(*ids, batch_tokens=60, seed=0), sources, references)


def test_the_dev_scores_are_evals_scores_of_the_translators_output(tiny_model, tokenizer):
    pairs = make_pairs(12, seed=5)
    sources = [src for src, _ in pairs]
    # half the references are the model's own greedy output, so that BLEU is far from 0
    greedy = [nbest[0].text for nbest in Translator(tiny_model, tokenizer, DecodeOptions(beam=1)).translate(sources)]
    references = greedy[:6] + [tgt for _, tgt in pairs[6:]]
    validator = Validator(tiny_model, tokenizer, dev_set(tokenizer, sources, references), beam=3, amp=False,
                          device=torch.device("cpu"), amp_dtype=None)
    scores = validator.validate()

    translator = Translator(tiny_model, tokenizer, DecodeOptions(beam=3), precision="auto", amp=False)
    hypotheses = [nbest[0].text for nbest in translator.translate(sources)]
    expected = score(hypotheses, references)
    assert expected["bleu"] > 10
    assert (scores["dev_bleu"], scores["dev_chrf"]) == (expected["bleu"], expected["chrf"])
    assert scores["example"] == hypotheses[0]


def test_the_dev_loss_is_the_mean_cross_entropy_per_target_token(tiny_model, tokenizer):
    pairs = make_pairs(12, seed=6)
    sources, references = [src for src, _ in pairs], [tgt for _, tgt in pairs]
    validator = Validator(tiny_model, tokenizer, dev_set(tokenizer, sources, references), beam=1, amp=False,
                          device=torch.device("cpu"), amp_dtype=None)
    scores = validator.validate()

    total, tokens = 0.0, 0
    with torch.no_grad():
        for src, tgt in zip(tokenizer.encode_src(sources), tokenizer.encode_tgt(references)):  # one pair at a time
            batch = collate(Encoded([src]), Encoded([tgt]), [0])
            log_probs = tiny_model(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in)[0].log_softmax(-1)
            for position, gold in enumerate(batch.tgt_out[0].tolist()):  # every target piece, then EOS
                total -= float(log_probs[position, gold])
                tokens += 1
    assert scores["dev_loss"] == pytest.approx(total / tokens, abs=1e-4)
    assert scores["dev_ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-3)


def test_the_eval_metric_is_higher_when_better():
    scores = {"dev_loss": 2.5, "dev_ppl": 12.2, "dev_bleu": 4.5, "dev_chrf": 31.0, "example": ""}
    assert [metric_score(scores, m) for m in ("bleu", "chrf", "loss")] == [4.5, 31.0, -2.5]
