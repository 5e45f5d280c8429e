"""Names decoded as stand-ins: which words are names the vocabulary lacks, against a plain reading
of each sentence, their merge with the unknown words, and the translator carrying them."""

from __future__ import annotations

import re

import pytest

from translate.config import BUNDLED_DATA
from translate.corpus import read_parallel
from translate.names import rare_names, stand_in_words
from translate.tokenizer import Tokenizer
from translate.translator import DecodeOptions, Translator


@pytest.fixture(scope="module")
def sources():
    return read_parallel(str(BUNDLED_DATA / "test.tsv"), "spa", "eng", "test").src


def reference_names(line, pieces):
    """Plainly: a word with a capital first and a small letter after it, not first in its
    sentence (after . ! ? ; : or an opening mark), that is no whole piece of the vocabulary."""
    names = []
    for match in re.finditer(r"\w+", line):
        word, before = match.group(), line[: match.start()].rstrip()
        opens = not before or before[-1] in ".!?;:¿¡«\"“(—-"
        if word.isalpha() and word[0].isupper() and not word.isupper() and not opens and "\u2581" + word not in pieces:
            names.append(word)
    return names


def test_rare_names_are_the_capitalised_words_where_no_sentence_starts_that_no_piece_holds(sources):
    tokenizer = Tokenizer.train(sources, [], vocab_size=800)  # holds "▁Tom", "▁Mary", not "▁Raquel"
    sp = tokenizer.src
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert {"\u2581Tom", "\u2581Mary"} <= pieces
    found = 0
    for line in sources[:600] + ["Tom vio a Raquel. Raquel no vio a Tom.", "Vino con Raquel; Raquel, no."]:
        names = rare_names(tokenizer, line)
        assert [text for _, _, text in names] == reference_names(line, pieces), line
        proto = sp.encode(line, return_type="proto").pieces
        for first, last, text in names:
            assert "".join(p.surface for p in proto[first: last + 1]).strip() == text
        found += len(names)
    assert found > 10 and rare_names(tokenizer, "Tom vio a Raquel. Raquel no vio a Tom.")[0][2] == "Raquel"


def test_stand_in_words_are_the_unknown_words_and_the_names_outside_them_in_order(tokenizer):
    line = "El gato de Ωmega y Raquel ve a Ωx."
    unknown = tokenizer.src_unknown(line)
    words = stand_in_words(tokenizer, line)
    assert set(unknown) <= set(words) and words == sorted(words)
    assert [text for _, _, text in words] == ["Ωmega", "Raquel", "Ωx"]  # Ωmega once, though a name too
    assert all(a[1] < b[0] for a, b in zip(words, words[1:]))  # no two overlap


def test_the_translator_carries_a_rare_name_into_the_translation(tiny_model, tokenizer):
    line = "El gato de Raquel come pan."
    assert rare_names(tokenizer, line) and not tokenizer.src_unknown(line)
    translator = Translator(tiny_model, tokenizer, DecodeOptions(beam=2, inter_threads=1))
    assert "Raquel" in translator.translate([line])[0][0].text
    off = translator.translate([line], DecodeOptions(beam=2, inter_threads=1, copy_unknown=False))[0][0].text
    assert "Raquel" not in off


def test_a_model_that_learned_its_names_decodes_them_itself(tiny_model, tokenizer):
    """Without name stand-ins (a fine-tuned model's vocabulary was fitted on other data than its
    names came from) the line is decoded as written; unknown words still get their stand-ins."""
    line = "El gato de Raquel come pan."
    translator = Translator(tiny_model, tokenizer, DecodeOptions(beam=2, inter_threads=1))
    translator.stand_in_names = False
    off = translator.translate([line], DecodeOptions(beam=2, inter_threads=1, copy_unknown=False))[0][0].text
    assert translator.translate([line])[0][0].text == off
    assert translator.source_pieces(line) == tokenizer.src_pieces(line)
    unknown = "El gato de Ωmega come pan."
    assert "Ωmega" in translator.translate([unknown])[0][0].text
