"""Glossaries: reading and matching them (glossary.py) and constrained beam search
(search.constrained_beam_search), checked against plain references written here."""

from dataclasses import replace

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


@pytest.mark.parametrize("shortlist, precision", [(0, "fp32"), (6, "int8")])
def test_translator_places_glossary_terms(search_model, tokenizer, shortlist, precision, caplog):
    from translate.translator import DecodeOptions, Translator

    from .test_shortlist import lexicon_for

    glossary = (("gato", "elephant"), ("perro", "sunny day"), ("libro", "cat"))
    options = DecodeOptions(shortlist=shortlist, inter_threads=1, glossary=glossary, n_best=2)
    decoder = Translator(search_model, tokenizer, options, precision=precision,
                         lexicon=lexicon_for(tokenizer) if shortlist else None)
    out = decoder.translate(SENTENCES)
    for line, nbest in zip(SENTENCES, out):
        for _, target in matches(glossary, line):
            ids = tokenizer.encode_tgt([target])[0]
            assert holds(nbest[0].tokens, ids) and not nbest[0].missed
    plain = Translator(search_model, tokenizer, replace(options, glossary=()), precision=precision,
                       lexicon=lexicon_for(tokenizer) if shortlist else None)
    for line, nbest, free in zip(SENTENCES, out, plain.translate(SENTENCES)):  # no term: as without a glossary
        if not matches(glossary, line):
            assert [t.text for t in nbest] == [t.text for t in free]



def test_a_term_the_search_could_not_place_is_reported(search_model, tokenizer, caplog, monkeypatch):
    import translate.translator as translator

    def unconstrained(model, memory, state, beam, limits, constraints, *args):  # a search that fails every term
        return beam_search(model, memory, state, beam, limits)

    monkeypatch.setattr(translator, "constrained_beam_search", unconstrained)
    options = translator.DecodeOptions(shortlist=0, inter_threads=1, glossary=(("gato", "elephant zebra"),))
    out = translator.Translator(search_model, tokenizer, options).translate(["El gato come pan. Y.", "Y."])
    assert out[0][0].missed == ("elephant zebra",) and out[1][0].missed == ()
    assert "could not place 'elephant zebra' in the translation of 'El gato come pan. Y.'" in caplog.text


def test_a_glossary_is_checked_as_an_option():
    from translate.translator import DecodeOptions

    assert DecodeOptions(glossary=[["gato", "cat"]]).glossary == (("gato", "cat"),)
    for bad, message in (([["", "cat"]], "empty source term"), ([["gato"]], "pair of texts"),
                         ({"gato": "c" * (MAX_TERM + 1)}, "at most"), ([["a", "b"]] * (MAX_ENTRIES + 1), "entries")):
        with pytest.raises(UserError, match=message):
            DecodeOptions(glossary=bad)
    with pytest.raises(UserError, match="sampling"):
        DecodeOptions(glossary=[["gato", "cat"]], sample=True)


def test_a_term_ends_a_word(search_model, tokenizer):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    vocab_size = search_model.decoder.output.bias.numel()
    joins = (torch.arange(vocab_size) % 2 == 0) & (torch.arange(vocab_size) >= SPECIAL)  # half the pieces continue
    cons = [[[SPECIAL + 7]], [[SPECIAL + 9, SPECIAL + 3]], [[SPECIAL + 5]], [[SPECIAL + 11]], [[SPECIAL + 13]]]
    for hyps, (c,) in zip(constrained_beam_search(search_model, memory, state, 3, limits, cons, joins=joins), cons):
        tokens = hyps[0].tokens + [EOS]
        end = next(i for i in range(len(tokens)) if tokens[i: i + len(c)] == c) + len(c)
        assert not joins[tokens[end]]  # what follows the term does not continue its word


def test_serve_takes_a_glossary_in_both_apis(tiny_service, tokenizer):
    import json
    import urllib.parse

    from translate.errors import RequestError
    from translate.serve import parse_request

    _, call = tiny_service
    ids = tokenizer.encode_tgt(["perro"])[0]
    status, own = call(json.dumps({"sentences": ["El gato come pan.", "Y."], "glossary": [["gato", "perro"]],
                                   "scores": True}).encode())
    assert status == 200 and own["missed_terms"] == [[], []]
    assert holds(tokenizer.encode_tgt([own["translations"][0]])[0], ids)
    status, libre = call(json.dumps({"q": "El gato come pan.", "target": "en",
                                     "glossary": {"gato": "perro"}}).encode())
    assert status == 200 and libre == {"translatedText": own["translations"][0], "missed_terms": []}
    form = urllib.parse.urlencode({"q": "El gato come pan.", "target": "en", "glossary": '[["gato", "perro"]]'})
    assert call(form.encode(), "application/x-www-form-urlencoded")[1] == libre
    status, plain = call(json.dumps({"sentences": ["El gato come pan."]}).encode())
    assert "missed_terms" not in plain
    for glossary, message in (([["gato", ""]], "empty target term"), ([["gato"]], "pair of texts"),
                              ("not json", "must be JSON"), ([["a", "b"]] * 1001, "at most 1000")):
        status, error = call(json.dumps({"sentences": ["Hola."], "glossary": glossary}).encode())
        assert status == 400 and message in error["error"] and "\n" not in error["error"]
    with pytest.raises(RequestError, match="sampling"):
        parse_request(json.dumps({"sentences": ["Hola."], "glossary": [["a", "b"]], "sample": True}).encode(),
                      8, 100)


def test_repl_sets_a_glossary(tmp_path):
    from types import SimpleNamespace

    from translate.repl import Repl
    from translate.translator import DecodeOptions

    good, bad = tmp_path / "good.tsv", tmp_path / "bad.tsv"
    good.write_text("gato\tcat\nperro\tdog\n", encoding="utf-8")
    bad.write_text("gato cat\n", encoding="utf-8")
    repl = Repl(SimpleNamespace(tokenizer=None, options=DecodeOptions()))
    assert repl.command(f":glossary {good}")[0] == f"glossary of 2 entries from {good}"
    assert repl.options.glossary == (("gato", "cat"), ("perro", "dog"))
    answer = repl.command(f":glossary {bad}")[0]
    assert answer.startswith("usage: :glossary FILE;") and "line 1" in answer and "\n" not in answer
    assert repl.options.glossary == (("gato", "cat"), ("perro", "dog"))  # a bad file leaves it as it was
    assert repl.command(":glossary")[0] == "no glossary" and repl.options.glossary == ()


def test_decode_and_eval_take_a_glossary_file(run_with_steps, tmp_path):
    from click.testing import CliRunner

    from translate.cli import main

    runner = CliRunner()
    glossary = tmp_path / "terms.tsv"
    glossary.write_text("gato\tdog\n", encoding="utf-8")
    lines = "El gato come pan.\nEl perro bebe agua.\n"
    base = ["decode", str(run_with_steps), "--shortlist", "0", "--beam", "3"]
    plain = runner.invoke(main, base, input=lines)
    forced = runner.invoke(main, [*base, "--glossary", str(glossary)], input=lines)
    assert plain.exit_code == 0 and forced.exit_code == 0, forced.output
    first, second = forced.stdout.splitlines()
    assert "dog" in first.split() and "dog" not in plain.stdout.splitlines()[0].split()
    assert second == plain.stdout.splitlines()[1]  # no term in it: as without a glossary
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text(lines, encoding="utf-8")
    ref.write_text("The dog eats bread.\nThe dog drinks water.\n", encoding="utf-8")
    scored = runner.invoke(main, ["eval", str(run_with_steps), "--src", str(src), "--ref", str(ref), "--json",
                                  "--glossary", str(glossary)])
    assert scored.exit_code == 0, scored.output
    for text, message in (("gato dog\n", "line 1: write SOURCE<TAB>TARGET"), ("gato\t\n", "empty target term"),
                          ("gato\t" + "x" * 201 + "\n", "at most 200")):
        glossary.write_text(text, encoding="utf-8")
        bad = runner.invoke(main, [*base, "--glossary", str(glossary)], input=lines)
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output
        assert len([line for line in bad.output.splitlines() if line.startswith("Error")]) == 1


def test_constraints_with_a_prefix_and_attention(search_model, tokenizer):
    memory, state, limits = encode(search_model, tokenizer, SENTENCES)
    start = [SPECIAL + 3, SPECIAL + 4]
    prefix = torch.tensor([start] * len(SENTENCES))
    found = constrained_beam_search(search_model, memory, state, 3, limits + 2, CONSTRAINTS, prefix=prefix,
                                    return_attention=True)
    real = memory.mask.sum(1).tolist()
    for hyps, cons, src_len in zip(found, CONSTRAINTS, real):
        best = hyps[0]
        assert best.tokens[:2] == start and all(holds(best.tokens, c) for c in cons)
        assert best.attention.shape == (len(best.tokens) + 1, src_len)
        torch.testing.assert_close(best.attention.sum(1), torch.ones(len(best.tokens) + 1))
