"""Names decoded as stand-ins: which words are names the vocabulary lacks, against a plain reading
of each sentence, their merge with the unknown words, and the translator carrying them."""

from __future__ import annotations

import re

import pytest
import torch

from translate.config import BUNDLED_DATA
from translate.corpus import read_parallel
from translate.names import TargetLetters, rare_names, rare_numbers, stand_in_words
from translate.tokenizer import Tokenizer
from translate.translator import NUMBER_STAND_INS, STAND_INS, DecodeOptions, Translator, stand_ins


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


@pytest.fixture(scope="module")
def number_tokenizer():
    """A vocabulary that holds the number 20 whole and spells others in digits."""
    from .conftest import make_pairs

    pairs = make_pairs(600, seed=1)
    said = [("El gato tiene {} años.", "The cat is {} years old."), ("Compré {} panes.", "I bought {} loaves."),
            ("Son {} días.", "It is {} days.")]
    sources = [s for s, _ in pairs] + [s.format(n) for n in ("30", "20", "40") for s, _ in said] * 40
    targets = [t for _, t in pairs] + [t.format(n) for n in ("30", "20", "40") for _, t in said] * 40
    sources.append("Nací en 1987, a las 10:30 del día 4-5; 3,75 o 1.5 al 555-1234 de 2019/6.")
    targets.append("I was born in 1987, at 10:30 on day 4-5; 3,75 or 1.5 at 555-1234 of 2019/6.")
    return Tokenizer.train(sources, targets, vocab_size=100)


def reference_numbers(line, holds):
    """Plainly: runs of digits joined by single . , : / - marks, that touch no letter, digit, mark of
    those or ordinal sign on either side, and that the vocabulary does not hold whole."""
    found, i = [], 0
    while i < len(line):
        if line[i].isdigit() and (i == 0 or not (line[i - 1].isalnum() or line[i - 1] in ".,:/-_")):
            j = i
            while j < len(line) and (line[j].isdigit() or (line[j] in ".,:/-" and j + 1 < len(line)
                                                           and line[j + 1].isdigit() and line[j - 1].isdigit())):
                j += 1
            if not (j < len(line) and (line[j].isalpha() or line[j] in "_ºª°")) and not holds(line[i:j]):
                found.append(line[i:j])
            i = j
        else:
            i += 1
    return found


def test_rare_numbers_are_those_the_vocabulary_spells_in_digits(number_tokenizer):
    tokenizer = number_tokenizer
    assert tokenizer.src_holds_word("20") and tokenizer.tgt_holds_word("20") and not tokenizer.src_holds_word("2019")
    lines = ["Nací en 1987, a las 10:30; costó 3,75 € o 1.5 millones: llama al 555-1234.",
             "Tiene 20 años desde 2019; el A4 y el mp3 no son cifras.",
             "Del 1/2/2024 al 3.000.000, el 16º y 12. 13, 14.", "¿Cuántos? 4-5 o -8 o 2019-"]
    for line in lines:
        numbers = rare_numbers(tokenizer, line)
        assert [text for _, _, text in numbers] == reference_numbers(line, tokenizer.src_holds_word), line
        proto = tokenizer.src.encode(line, return_type="proto").pieces
        for first, last, text in numbers:
            assert "".join(p.surface for p in proto[first: last + 1]).strip() == text
    assert [t for _, _, t in rare_numbers(tokenizer, lines[0])] == ["1987", "10:30", "3,75", "1.5", "555-1234"]
    assert [t for _, _, t in stand_in_words(tokenizer, lines[1], numbers=False)] == []
    assert [t for _, _, t in stand_in_words(tokenizer, lines[1])] == ["2019"]


def test_a_number_goes_through_as_a_number_the_line_lacks_and_comes_back_as_written(number_tokenizer, tokenizer):
    pool = [n for n in NUMBER_STAND_INS if number_tokenizer.src_holds_word(n) and number_tokenizer.tgt_holds_word(n)]
    assert pool[0] == "20"
    decoded, words = stand_ins(number_tokenizer, "El gato tiene 2019 años, 1.5 panes y 2019 días.")
    assert decoded.startswith("El gato tiene 20 años, ") and decoded.endswith(" panes y 20 días.")
    assert [(w.text, w.name) for w in words][::2] == [("2019", "20"), ("2019", "20")]  # the same number, the same
    assert words[1].name != "20"
    decoded, words = stand_ins(number_tokenizer, "El gato tiene 20 años y 2019 días.")  # not the line's own 20
    assert words[0].text == "2019" and words[0].name != "20" and decoded.count("20") == 1
    # a vocabulary that holds no number whole: a number goes through as a name
    decoded, words = stand_ins(tokenizer, "El gato de 2019 come pan.")
    assert all(w.name in STAND_INS for w in words if w.name) and "2019" not in decoded


def test_the_translator_carries_a_number_it_would_spell_in_digits(number_tokenizer):
    from translate.config import load_config
    from translate.model import build_model

    torch.manual_seed(0)
    config = load_config(overrides={"model.embed_dim": 16, "model.hidden_dim": 32, "model.dropout": 0.0,
                                    "model.init_uniform": 0})
    model = build_model(config.model, number_tokenizer.src_vocab_size, number_tokenizer.tgt_vocab_size).eval()
    translator = Translator(model, number_tokenizer, DecodeOptions(beam=2, inter_threads=1, shortlist=0))
    numbers = ["2019", "3,75", "555-1234"]
    lines = [f"El gato tiene {n} años." for n in numbers]
    for number, out in zip(numbers, translator.translate(lines)):
        assert re.search(rf"(?<![\d.,:-]){re.escape(number)}(?!\d)", out[0].text), out[0].text
        assert not re.search(r"\b20\b", out[0].text)  # no stand-in left in it
    off = translator.translate(lines, DecodeOptions(beam=2, inter_threads=1, shortlist=0, copy_numbers=False))
    assert not any(number in out[0].text for number, out in zip(numbers, off))
