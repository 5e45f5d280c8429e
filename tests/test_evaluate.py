import pytest
import sacrebleu

from translate.evaluate import evaluate, score
from translate.translator import DecodeOptions, Translator

from .conftest import SENTENCES


def test_score_is_sacrebleus_corpus_scores():
    hyps = ["the cat eats bread .", "a dog", "the sun is big"]
    refs = ["The cat eats bread.", "The dog.", "The sun is big."]
    result = score(hyps, refs)
    assert result["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    assert result["chrf"] == round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
    assert result["ter"] == round(sacrebleu.corpus_ter(hyps, [refs]).score, 2)
    assert "BLEU: nrefs:1" in result["signature"] and "TER:" in result["signature"]
    assert score(refs, refs)["bleu"] == 100.0
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        score(hyps[:2], refs)


def test_evaluate_scores_the_translators_best_output(search_model, tokenizer):
    translator = Translator(search_model, tokenizer, DecodeOptions(beam=3))
    references = ["The cat eats bread.", "And.", "The big child reads the red book.", "Dog.", "The dog drinks."]
    scores, hyps = evaluate(translator, SENTENCES, references)
    assert hyps == [nbest[0].text for nbest in translator.translate(SENTENCES)]
    assert scores == score(hyps, references)
    greedy = evaluate(translator, SENTENCES, references, DecodeOptions(beam=1))[1]
    assert greedy == [nbest[0].text for nbest in translator.translate(SENTENCES, DecodeOptions(beam=1))]
