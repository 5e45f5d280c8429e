"""Names decoded as stand-ins: which words are names the vocabulary lacks, against a plain reading
of each sentence, their merge with the unknown words, and the translator carrying them."""

from __future__ import annotations

import re

import pytest

from translate.config import BUNDLED_DATA
from translate.corpus import read_parallel
from translate.names import TargetLetters, rare_names, stand_in_words
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


def reference_letters(texts, share):
    """Plainly: the letters, case folded, that make up at least ``share`` of the texts' letters."""
    counts = {}
    for char in "".join(texts):
        if char.isalpha():
            counts[char.lower()] = counts.get(char.lower(), 0) + 1
    return {c for c, n in counts.items() if n >= share * sum(counts.values())}


def test_the_target_letters_from_the_lexicons_piece_counts_are_those_of_the_target_texts(monkeypatch):
    from translate import names
    from translate.encoded import Encoded
    from translate.shortlist import build_lexicon

    sources = ["Él comió pan.", "Ésta es mía.", "Raúl lee un libro."] * 40 + ["Un café."]
    targets = ["He ate bread.", "This one is mine.", "Raul reads a book."] * 40 + ["A café."]
    tokenizer = Tokenizer.train(sources, targets, vocab_size=60)
    lexicon = build_lexicon(Encoded(tokenizer.encode_src(sources)), Encoded(tokenizer.encode_tgt(targets)),
                            tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    for share in (1e-5, 0.002, 0.02):  # the one é is in or out
        monkeypatch.setattr(names, "LETTER_SHARE", share)
        letters = TargetLetters.of_counts(tokenizer, lexicon.target_counts).letters
        assert letters == reference_letters(targets, share)
    assert "é" not in letters and "í" not in letters and "a" in letters
    assert TargetLetters.of_counts(tokenizer, None) is None  # a checkpoint without counts: not known


def test_a_carried_word_is_spelled_in_the_target_letters_where_dropping_accents_does_it():
    english = TargetLetters("abcdefghijklmnopqrstuvwxyz")
    source = "Raúl y Jehová vieron a Ἰησοῦς en Zürich; el café."
    assert english.spell("Raúl and Jehová saw Ἰησοῦς in Zürich; the café.", source, keep=["café"]) == \
        "Raul and Jehova saw Ἰησοῦς in Zurich; the café."
    assert english.spell("The café of Raúl.", "El bar de Raul.") == "The café of Raúl."  # not carried: as it is
    spanish = TargetLetters("abcdefghijklmnopqrstuvwxyzáéíóúñü")
    assert spanish.spell("Raúl und Zoë", "Raúl und Zoë") == "Raúl und Zoe"


def test_the_translator_spells_a_carried_name_in_the_letters_of_its_training_targets(tiny_model, tokenizer):
    from translate.encoded import Encoded
    from translate.shortlist import build_lexicon

    from .conftest import make_pairs

    pairs = make_pairs(600, seed=1)  # the tokenizer's own: English without accents
    lexicon = build_lexicon(Encoded(tokenizer.encode_src([s for s, _ in pairs])),
                            Encoded(tokenizer.encode_tgt([t for _, t in pairs])),
                            tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    line = "El gato de Raúl come pan."
    options = DecodeOptions(beam=2, inter_threads=1, shortlist=0)
    translator = Translator(tiny_model, tokenizer, options, lexicon=lexicon)
    folded = translator.translate([line])[0][0].text
    kept = translator.translate([line], DecodeOptions(beam=2, inter_threads=1, shortlist=0,
                                                      fold_accents=False))[0][0].text
    assert "Raúl" in kept and folded == kept.replace("Raúl", "Raul")
    assert "Raúl" in Translator(tiny_model, tokenizer, options).translate([line])[0][0].text  # no counts
    glossary = DecodeOptions(beam=2, inter_threads=1, shortlist=0, glossary=(("Raúl", "Raúl"),))
    assert "Raúl" in translator.translate([line], glossary)[0][0].text  # a glossary's term as it is
