"""Casual input restored before decoding: hand-written cases, edited text left alone, restoring
twice is restoring once, the bundled test's casual copy restored to the test, the recasing table
against a plain reading of the vocabulary, and the translator's option."""

from __future__ import annotations

import re

import pytest

from translate.casual import (
    KEPT_MARGIN,
    OLD_ACCENTS,
    OLD_WORDS,
    Modernising,
    accented_pieces,
    kept_capitals,
    modernise,
    modernising,
    reaccent,
    reaccenting,
    recasing,
    restore,
)
from translate.config import BUNDLED_DATA
from translate.corpus import read_parallel
from translate.errors import ConfigError
from translate.tokenizer import Tokenizer
from translate.translator import DecodeOptions, Translator

from .conftest import SENTENCES, make_pairs

TABLE = {"tom": "Tom", "mary": "Mary", "boston": "Boston", "tv": "TV"}

CASES = [
    ("hola", "Hola."),
    ("buenos días", "Buenos días."),
    ("sé breve", "Sé breve."),
    ("gracias", "Gracias."),
    ("hola, ¿cómo estás", "Hola, ¿cómo estás?"),
    ("dónde está tom", "¿Dónde está Tom?"),
    ("por qué no vino mary", "¿Por qué no vino Mary?"),
    ("de dónde eres", "¿De dónde eres?"),
    ("quieres ver la tv", "¿Quieres ver la TV?"),
    ("¡qué sorpresa", "¡Qué sorpresa!"),
    ("tom vive en boston", "Tom vive en Boston."),
    ("compré 1.5 litros", "Compré 1.5 litros."),
    ("hola. cómo estás", "Hola. ¿Cómo estás?"),
    ('"hola." "adiós"', '"Hola." "Adiós"'),  # ends in a quote: no mark added
    ("tom tiene 42", "Tom tiene 42."),
    ("que tengas un buen día", "Que tengas un buen día."),  # "que" without its accent is no question
    ("Hola", "Hola."),  # a capital typed, the final mark not
    ("hola, tom ", "Hola, Tom. "),  # trailing space kept
]

EDITED = ["Hola.", "¿Dónde está Tom?", "Tom dijo: «hola».", "Compré 1.5 litros.", "Tom vive en boston.",
          "Hola, ¿cómo estás?", "¡Qué sorpresa!", "Un, dos, tres,", "", "   ", "Hola…", "Hola :)"]


@pytest.mark.parametrize(("typed", "restored"), CASES)
def test_casual_text_gets_its_case_and_final_mark(typed, restored):
    assert restore(typed, TABLE) == restored


@pytest.mark.parametrize("text", EDITED)
def test_text_with_a_capital_and_a_final_mark_passes_unchanged(text):
    assert restore(text, TABLE) == text


@pytest.mark.parametrize("text", [typed for typed, _ in CASES] + EDITED + ["42", "¿", "¡ hola", "x. y"])
def test_restoring_twice_is_restoring_once(text):
    once = restore(text, TABLE)
    assert restore(once, TABLE) == once


def casual(line: str) -> str:
    """As people type it: lower case, no opening ¿ ¡, no closing . ! ? (bench/common.py's casual)."""
    return re.sub(r"[\s.!?]+$", "", re.sub(r"^[\s¿¡]+", "", line.lower()))


def test_the_bundled_tests_casual_copy_restores_to_the_test_up_to_what_it_cannot_know():
    """Up to the marks it cannot know (! for ., a question without a question word) and the case
    of words the sources write both ways (Nueva Zelanda, la nueva casa); with a table of the
    words the sources capitalise and never write in lower case (what a vocabulary gives)."""
    sources = read_parallel(str(BUNDLED_DATA / "test.tsv"), "spa", "eng", "test").src
    words = [(i, w) for s in sources for i, w in enumerate(re.findall(r"\w+", s))]
    lower = {w for _, w in words if w == w.lower()}
    table = {w.lower(): w for i, w in words if i > 0 and w != w.lower() and w.isalpha() and w.lower() not in lower}
    both = {w for _, w in words if w != w.lower() and w.lower() in lower}

    def known(text):  # the words written both ways in lower case, but where a sentence starts
        def case(m):
            before = text[: m.start()].rstrip(" ¿¡\"«“(—-")
            initial = not before or before[-1] in ".!?»\"”)"
            return m.group().lower() if m.group() in both and not initial else m.group()
        return re.sub(r"\w+", case, text)

    exact, asked = 0, []
    for source in sources:
        restored = restore(casual(source), table)
        expected = known(source)
        assert re.sub(r"^[¿¡]|[.!?]+$", "", known(restored)) == re.sub(r"^[¿¡]|[.!?]+$", "", expected), source
        if restored.endswith("?"):  # of them, a few exclamations (qué ...) and statements (has ...)
            asked.append(bool(re.search(r"\?[.!?]*$", source)))
        if source.startswith("¿") and source.endswith("?") and restored.endswith("?"):
            assert known(restored) == expected, source  # a question it knows: ¿ and ? both restored
        exact += known(restored) == expected
        assert restore(restored, table) == restored
    assert exact > 0.85 * len(sources)
    assert sum(asked) > 0.95 * len(asked) and len(asked) > 0.5 * sum(s.endswith("?") for s in sources)


def test_the_recasing_table_is_the_vocabularys_capital_only_whole_words():
    pairs = make_pairs(600, seed=1)
    named = [f"{s[:-1]} con Tom en Boston ante la TV u otro." for s, _ in pairs[:300]] + [s for s, _ in pairs[300:]]
    tokenizer = Tokenizer.train(named, [t for _, t in pairs], vocab_size=110)
    sp = tokenizer.src
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    whole = {p[1:] for p in pieces if p.startswith("\u2581")}
    expected = {w.lower(): w for w in whole if len(w) > 1 and w.isalpha() and w != w.lower() and w.lower() not in whole}
    assert recasing(tokenizer) == expected and expected  # this vocabulary has a few ("▁Bo", "▁Wat")
    assert recasing(tokenizer) is recasing(tokenizer)  # read once per tokenizer


def test_the_translator_restores_casual_lines_unless_told_not_to(tiny_model, tokenizer):
    translator = Translator(tiny_model, tokenizer, DecodeOptions(beam=2, inter_threads=1))
    typed = [casual(s) for s in SENTENCES]
    restored = [restore(line, recasing(tokenizer)) for line in typed]
    assert restored != typed
    off = DecodeOptions(beam=2, inter_threads=1, restore_casual=False)
    assert [n[0].tokens for n in translator.translate(typed)] == \
        [n[0].tokens for n in translator.translate(restored, off)]
    assert [n[0].tokens for n in translator.translate(SENTENCES)] == \
        [n[0].tokens for n in translator.translate(SENTENCES, off)]
    with pytest.raises(ConfigError, match="restore_casual must be True or False, not 1"):
        DecodeOptions(restore_casual=1)


def test_kept_capitals_are_the_target_words_whose_lower_case_is_missing_or_far_less_likely():
    pairs = make_pairs(600, seed=1)
    named = [f"{t[:-1]} with Tom in Boston, I said." for _, t in pairs[:300]] + [t for _, t in pairs[300:]]
    tokenizer = Tokenizer.train([s for s, _ in pairs], named, vocab_size=110)
    sp = tokenizer.tgt
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    expected = set()
    for piece, score in scores.items():
        if piece.startswith("\u2581") and piece[1:2].isupper():
            lower = "\u2581" + piece[1:].lower()
            if lower not in scores or score - scores[lower] >= KEPT_MARGIN:
                expected.add(piece[1:])
    assert kept_capitals(tokenizer) == expected and expected
    assert kept_capitals(tokenizer) is kept_capitals(tokenizer)


def test_older_spanish_spelling_gets_the_modern_one_with_its_case():
    modern = Modernising(dict(OLD_ACCENTS), frozenset(), {})
    assert modernise("Y fué á Abel é Isaac; Dió pan ó vino. Á él, FUÉ.", modern) == \
        "Y fue a Abel e Isaac; Dio pan o vino. A él, FUE."
    assert modernise("Él sé que tú más, qué dé mí.", modern) == "Él sé que tú más, qué dé mí."  # today's accents
    assert modernise("Fué á casa.", Modernising({}, frozenset(), {})) == "Fué á casa."


def test_pronouns_joined_on_to_a_finite_verb_go_before_it():
    modern = Modernising({"fué": "fue", "dió": "dio"}, frozenset({"dijo", "levantó", "dijeron", "ruego", "puso"}), {})
    assert modernise("Y díjole: Levantóse Abraham, y dijéronle que sí; fuése.", modern) == \
        "Y le dijo: Se levantó Abraham, y le dijeron que sí; se fue."
    assert modernise("Díjoselo, ruégote, dióles pan y púsolas allí.", modern) == \
        "Se lo dijo, te ruego, les dio pan y las puso allí."
    # today's words: an imperative, a gerund, nouns, a pronoun on an unknown verb, no written accent
    today = "Contrólate, tómalo, diciéndole que los fenómenos e ídolos ensañóse; dijole."
    assert modernise(today, modern) == today
    assert modernise("DÍJOLE", modern) == "LE DIJO"


def test_an_older_but_gets_todays_and_more_stays_more():
    modern = Modernising({"empero": "pero"}, frozenset(), {"mas": "pero"})
    assert modernise("Mas no miró á Caín; mas Jehová dijo: Empero, ¡MAS EL rey!", modern) == \
        "Pero no miró á Caín; pero Jehová dijo: Pero, ¡PERO EL rey!"
    for more in ("Mas tarde te llamo.", "quiero mas agua", "Mas de cien personas.", "Te veré mas tarde. Mas es mejor."):
        assert modernise(more, modern) == more  # "más" typed without its accent
    assert modernise("mas no puedo", modern) == "pero no puedo"


def test_modernising_takes_only_old_spellings_the_vocabulary_lacks_and_modern_ones_it_has():
    pairs = make_pairs(600, seed=1)
    spanish = [f"{s[:-1]} y fue a casa, pero no." for s, _ in pairs[:300]] + [s for s, _ in pairs[300:]]
    tokenizer = Tokenizer.train(spanish, [t for _, t in pairs], vocab_size=150, model_type="bpe")  # "pero" whole
    whole = {p[1:] for p in (tokenizer.src.id_to_piece(i) for i in range(tokenizer.src.get_piece_size()))
             if p.startswith("\u2581")}
    expected = {old: new for old, new in (OLD_ACCENTS | OLD_WORDS).items() if new in whole and old not in whole}
    assert modernising(tokenizer).words == expected and "á" in expected and "empero" in expected
    assert modernising(tokenizer).openers == {"mas": "pero"}
    verbs = {w for w in whole if len(w) >= 3 and w.endswith(("o", "ó", "ron"))}
    verbs -= {w for w in verbs if w.endswith(("ndo", "ado", "ido"))}  # gerunds and participles
    assert modernising(tokenizer).verbs == verbs and verbs
    portuguese = [f"{s[:-1]} é a casa." for s, _ in pairs]  # "é" a word of its own
    kept = Tokenizer.train(portuguese, [t for _, t in pairs], vocab_size=150)
    assert "é" not in modernising(kept).words and "á" in modernising(kept).words


ACCENTS = {"dias": "días", "manana": "mañana", "tambien": "también", "cancion": "canción"}

REACCENTED = [
    ("buenos dias", "buenos días"),
    ("manana tambien.", "mañana también."),
    ("MANANA", "MAÑANA"),
    ("que hora es", "qué hora es"),
    ("de donde eres?", "de dónde eres?"),
    ("¿como estas", "¿cómo estas"),
    ("que tengas un buen dia.", "que tengas un buen dia."),  # a statement: its "que" stays ("dia" is no entry)
    ("Que habita en la cancion, mas no canta.", "Que habita en la cancion, mas no canta."),  # edited: left alone
    ("Manana Tambien vino con Dias", "Mañana Tambien vino con Dias"),  # capitalised inside: names
    ("Donde esta la cancion?", "Dónde esta la canción?"),  # a "?" without its "¿": typed
    ("cuando vienes", "cuando vienes"),  # "cuando" opens statements as often as questions
    ("la cancion que canta", "la canción que canta"),  # "que" inside a sentence stays
    ("buenos días, que tal", "buenos días, que tal"),  # an accent typed: the text is left as it is
    ("el niño canta la cancion", "el niño canta la canción"),  # ñ has a key of its own: still restored
]


@pytest.mark.parametrize(("typed", "restored"), REACCENTED)
def test_text_typed_without_accents_gets_them_back(typed, restored):
    assert reaccent(typed, ACCENTS) == restored
    assert reaccent(restored, ACCENTS) == restored  # reaccenting twice is reaccenting once


def test_a_question_typed_without_accents_is_restored_as_one():
    assert restore(reaccent("que hora es", ACCENTS), TABLE) == "¿Qué hora es?"
    assert restore(reaccent("donde esta tom", ACCENTS), TABLE) == "¿Dónde esta Tom?"
    assert restore(reaccent("buenos dias", ACCENTS), TABLE) == "Buenos días."


def test_the_reaccenting_table_is_the_vocabularys_accented_words_whose_plain_spelling_it_lacks():
    pairs = make_pairs(600, seed=1)
    words = ["días", "también", "mañana", "está", "esta", "canción", "pingüino"]
    sources = [f"{s[:-1]} {w} {w}." for (s, _), w in zip(pairs, words * 100)]
    tokenizer = Tokenizer.train(sources, [t for _, t in pairs], vocab_size=130)
    sp = tokenizer.src
    whole = {p[1:].lower() for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size())) if p.startswith("\u2581")}

    def plain(word):  # spelled without its accents, tilde and diaeresis
        return "".join({"á": "a", "é": "e", "í": "i", "ó": "o", "ú": "u", "ñ": "n", "ü": "u"}.get(c, c) for c in word)

    expected = {plain(w): w for w in whole if w.isalpha() and plain(w) != w and plain(w) not in whole}
    assert reaccenting(tokenizer) == expected
    assert "está" in whole and "esta" in whole and "esta" not in expected  # both words: left as typed
    assert {"dias", "tambien", "manana"} <= set(expected)
    assert reaccenting(tokenizer) is reaccenting(tokenizer)  # read once per tokenizer


def test_the_counted_table_keeps_the_accented_words_the_sources_write_more_than_their_plain_spelling():
    from translate.encoded import Encoded

    pairs = make_pairs(600, seed=1)
    # "días" more often than "dias"; "hacía" less often than "hacia" (both whole pieces: "hacia" is split)
    said = ["días"] * 8 + ["hacía"] * 3 + ["hacia"] * 5
    sources = [f"{s[:-1]} {w} {w}." for (s, _), w in zip(pairs, said * 40)] + ["Son dias."] * 3
    tokenizer = Tokenizer.train(sources, [t for _, t in pairs], vocab_size=130)
    sp = tokenizer.src
    ids = accented_pieces(tokenizer, Encoded(tokenizer.encode_src(sources)), batch=7)
    counts = {}
    for source in sources:  # plainly: every word, in lower case
        for word in re.findall(r"\w+", source.lower()):
            counts[word] = counts.get(word, 0) + 1
    expected = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        word = piece[1:].lower()
        plain = word.translate(str.maketrans("áéíóúüñ", "aeiouun"))
        more = counts.get(word, 0) > counts.get(plain, 0)
        if piece.startswith("\u2581") and word.isalpha() and plain != word and more:
            expected.append(i)
    assert ids.tolist() == expected and sp.piece_to_id("\u2581días") in expected
    assert sp.piece_to_id("\u2581hacía") not in expected and not tokenizer.src_holds_word("dias")
    counted, every = reaccenting(tokenizer, ids), reaccenting(tokenizer)
    assert counted == {k: v for k, v in every.items() if sp.piece_to_id("\u2581" + v) in expected}
    assert reaccent("buenos dias", counted) == "buenos días"


def test_the_translator_gives_a_line_typed_without_accents_its_accents_before_cutting_it():
    import torch

    from translate.config import load_config
    from translate.model import build_model

    pairs = make_pairs(600, seed=1)
    words = ["días", "también", "mañana", "está", "esta", "canción", "pingüino"]
    sources = [f"{s[:-1]} {w} {w}." for (s, _), w in zip(pairs, words * 100)]
    tokenizer = Tokenizer.train(sources, [t for _, t in pairs], vocab_size=130)
    assert tokenizer.src_holds_word("días") and not tokenizer.src_holds_word("dias")
    torch.manual_seed(0)
    config = load_config(overrides={"model.embed_dim": 16, "model.hidden_dim": 32, "model.init_uniform": 0})
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    translator = Translator(model, tokenizer, DecodeOptions(beam=1, inter_threads=1, shortlist=0))
    off = DecodeOptions(beam=1, inter_threads=1, shortlist=0, restore_casual=False)
    typed, edited = "son dias. el gato come dias", "Son días. El gato come días."
    assert translator.source_pieces(typed) == translator.source_pieces(edited, off)
    assert [t.tokens for t in translator.translate([typed])[0]] == \
        [t.tokens for t in translator.translate([edited], off)[0]]
    # a line with an accent anywhere is not typed without them: its other sentence stays as written
    assert translator.source_pieces("son dias. el gato come días") != translator.source_pieces(edited, off)
