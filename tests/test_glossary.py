"""Glossaries: reading and matching them (glossary.py) and constrained beam search
(search.constrained_beam_search), checked against plain references written here."""

import pytest
import torch

from translate.errors import UserError
from translate.glossary import MAX_ENTRIES, MAX_TERM, check_glossary, matches, read_glossary
from translate.search import (
    Progress,
    bank_order,
    beam_search,
    constrained_beam_search,
    missing_constraints,
)
from translate.tokenizer import EOS, SPECIAL

from .conftest import SENTENCES, encode
from .test_search import a_shortlist, looping

# per sentence of SENTENCES: target ids each output must hold
CONSTRAINTS = [[[SPECIAL + 7, SPECIAL + 8]], [[SPECIAL + 20]],
               [[SPECIAL + 5], [SPECIAL + 30, SPECIAL + 31, SPECIAL + 2]], [], [[SPECIAL + 11, SPECIAL + 12]]]


def test_read_glossary_and_its_one_line_errors(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("hoja de cálculo\tspreadsheet\n\ngato\t cat  \n", encoding="utf-8")
    assert read_glossary(good) == (("hoja de cálculo", "spreadsheet"), ("gato", "cat"))
    for text, message in (("gato cat\n", "line 1: write SOURCE<TAB>TARGET"), ("a\tb\tc\n", "one tab"),
                          ("gato\t\n", "empty target term"), ("\tcat\n", "empty source term"),
                          ("gato\t" + "x" * (MAX_TERM + 1) + "\n", f"at most {MAX_TERM}"),
                          ("a\tb\n" * (MAX_ENTRIES + 1), f"more than {MAX_ENTRIES} entries")):
        bad = tmp_path / "bad.tsv"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(UserError, match=message) as caught:
            read_glossary(bad)
        assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="pair of texts"):
        check_glossary([["gato"]])
    assert check_glossary({"gato": "cat"}) == (("gato", "cat"),)


def test_matches_whole_words_case_insensitive_longest_first():
    glossary = (("hoja", "leaf"), ("hoja de cálculo", "spreadsheet"), ("gato", "cat"), ("sol", "sun"))
    assert matches(glossary, "La Hoja de cálculo del GATO.") == [("hoja de cálculo", "spreadsheet"), ("gato", "cat")]
    assert matches(glossary, "Los gatos y el solar.") == []  # not inside a word
    assert matches(glossary, "Una hoja, el sol.") == [("hoja", "leaf"), ("sol", "sun")]


def holds(tokens, ids) -> bool:
    """Plain check: ``ids`` appear together, in order, in ``tokens``."""
    return any(tokens[i: i + len(ids)] == ids for i in range(len(tokens) - len(ids) + 1))


def test_progress_and_missing_against_plain_checks():
    cons = [[1, 2, 3], [4]]
    p = Progress(0, -1, 0)
    for token, count in ((1, 1), (2, 2), (5, 0), (1, 1), (2, 2), (3, 3), (4, 4)):
        p = p.after(token, cons)
        assert p.count(cons) == count
    assert p.met == 3 and p.wanted(cons) == []
    assert missing_constraints([9, 1, 2, 3], cons) == [1] and missing_constraints([1, 2, 4, 3], cons) == [0]


def test_bank_order_takes_the_banks_in_turn():
    scores, counts = [-1.0, -2.0, -3.0, -0.5, -4.0], [0, 2, 2, 0, 1]
    assert bank_order(scores, counts) == [1, 4, 3, 2, 0]  # rank 0 of banks 2, 1, 0, then rank 1 of banks 2, 0


@pytest.mark.parametrize("shortlist", [False, True])
def test_every_constraint_appears_and_batch_equals_one_by_one(search_model, tokenizer, shortlist):
    model = search_model
    vocab = a_shortlist(model, 40) if shortlist else None
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    together = constrained_beam_search(model, memory, state, 4, limits, CONSTRAINTS, n_best=2, vocab=vocab,
                                       no_repeat_ngram=2)
    for sentence, cons, hyps in zip(SENTENCES, CONSTRAINTS, together):
        assert hyps and all(holds(hyps[0].tokens, c) for c in cons)
        one, first, limit = encode(model, tokenizer, [sentence])
        alone = constrained_beam_search(model, one, first, 4, limit, [cons], n_best=2, vocab=vocab,
                                        no_repeat_ngram=2)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=1e-4)


def test_without_constraints_it_is_beam_search(search_model, tokenizer):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    plain = beam_search(search_model, memory, state, 3, limits, 1.5, 2, no_repeat_ngram=3)
    same = constrained_beam_search(search_model, memory, state, 3, limits, [[] for _ in SENTENCES], 1.5, 2,
                                   no_repeat_ngram=3)
    assert [[(h.tokens, h.score) for h in hyps] for hyps in plain] == [[(h.tokens, h.score) for h in hyps]
                                                                      for hyps in same]


def test_a_single_piece_is_forced_on_a_model_that_never_chose_it(search_model, tokenizer):
    model = looping(search_model)  # two tokens far likelier than any other
    memory, state, limits = encode(model, tokenizer, SENTENCES)
    rare = SPECIAL + 40
    free = beam_search(model, memory, state, 3, limits)
    assert not any(rare in hyps[0].tokens for hyps in free)
    forced = constrained_beam_search(model, memory, state, 3, limits, [[[rare]]] * len(SENTENCES),
                                     no_repeat_ngram=2)
    for hyps in forced:
        assert rare in hyps[0].tokens and EOS not in hyps[0].tokens


def test_a_term_that_cannot_fit_is_reported(search_model, tokenizer):
    memory, state, _ = encode(search_model, tokenizer, SENTENCES[:2])
    limits = torch.tensor([3, 3])  # two pieces and EOS
    cons = [[[SPECIAL + 7, SPECIAL + 8, SPECIAL + 9]], [[SPECIAL + 7]]]
    found = constrained_beam_search(search_model, memory, state, 3, limits, cons)
    assert found[0] and missing_constraints(found[0][0].tokens, cons[0]) == [0]  # the fallback, reported
    assert missing_constraints(found[1][0].tokens, cons[1]) == []
