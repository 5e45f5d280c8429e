"""Sentence splitting: the hard cases, and that no text is ever lost or moved."""

import random

import pytest

from translate.config import BUNDLED_DATA
from translate.corpus import read_parallel
from translate.segment import PHRASE_MIN_WORDS, PHRASE_WORDS, SPLITS, Segments, mend, segment

CASES = [
    # abbreviations before names, and ones that may end a sentence
    ("El Sr. García llegó. La Sra. López no.", ["El Sr. García llegó.", "La Sra. López no."]),
    ("La Dra. Ruiz y Ud. hablaron.", ["La Dra. Ruiz y Ud. hablaron."]),
    ("Vivo en EE. UU. desde 2010. Me gusta.", ["Vivo en EE. UU. desde 2010.", "Me gusta."]),
    ("Compré pan, leche, etc. y me fui.", ["Compré pan, leche, etc. y me fui."]),
    ("Compré pan, etc. Luego volví.", ["Compré pan, etc.", "Luego volví."]),
    ("Frutas, p. ej. manzanas. Y peras.", ["Frutas, p. ej. manzanas.", "Y peras."]),
    ("Ver pág. 5 del libro.", ["Ver pág. 5 del libro."]),
    ("Roma, año 300 a. C. Fue grande.", ["Roma, año 300 a. C. Fue grande."]),
    ("J. K. Rowling escribió libros. Ella es famosa.", ["J. K. Rowling escribió libros.", "Ella es famosa."]),
    ("Llegó a las 5 p.m. el lunes. Se fue.", ["Llegó a las 5 p.m. el lunes.", "Se fue."]),
    # numbers, addresses
    ("Cuesta 1.5 euros, o 1,000 pesos. Son las 3:15.", ["Cuesta 1.5 euros, o 1,000 pesos.", "Son las 3:15."]),
    ("Visita www.ejemplo.com. Gracias.", ["Visita www.ejemplo.com.", "Gracias."]),
    ("Escribe a ana@correo.es o a http://x.org/a.b?c=1 ya.", ["Escribe a ana@correo.es o a http://x.org/a.b?c=1 ya."]),
    # ellipses
    ("Bueno... no sé. Esperé… Nadie vino.", ["Bueno... no sé.", "Esperé…", "Nadie vino."]),
    # quoted speech
    ("Él dijo: «Hola. ¿Cómo estás?» y se fue. Yo no.", ["Él dijo: «Hola. ¿Cómo estás?» y se fue.", "Yo no."]),
    ("«¿Vienes?», preguntó. ¡Claro!", ["«¿Vienes?», preguntó.", "¡Claro!"]),
    ('Dijo "Ven. Ya." Luego fue.', ['Dijo "Ven. Ya."', "Luego fue."]),
    ("«Ven aquí.» Luego se fue.", ["«Ven aquí.»", "Luego se fue."]),
    ("(Ver abajo. Es largo.) Sigue.", ["(Ver abajo. Es largo.)", "Sigue."]),
    ('Un " suelto. Otra frase.', ['Un " suelto.', "Otra frase."]),  # a quote that never closes counts none
    # ¿ ¡ open a sentence; casual typing
    ("¡Hola! ¿Qué tal? Bien.", ["¡Hola!", "¿Qué tal?", "Bien."]),
    ("hola. como estas? bien gracias", ["hola.", "como estas?", "bien gracias"]),
    ("Tom, ¿qué te pasa?Tu cara.", ["Tom, ¿qué te pasa?Tu cara."]),  # no space, no split
    # spacing kept
    ("  Hola.   Adiós.  ", ["Hola.", "Adiós."]),
    ("Hola.\tAdiós.", ["Hola.", "Adiós."]),
    ("Una sola frase", ["Una sola frase"]),
]


@pytest.mark.parametrize("line, pieces", CASES)
def test_hard_cases(line, pieces):
    parts = segment(line)
    assert parts.pieces == pieces
    assert parts.join() == line


def test_clauses_split_at_semicolons_and_colons_too():
    line = "Dijo: ven; y vino. A las 3:15 llegó."
    assert segment(line, "clauses").pieces == ["Dijo:", "ven;", "y vino.", "A las 3:15 llegó."]
    assert segment(line, "sentences").pieces == ["Dijo: ven; y vino.", "A las 3:15 llegó."]


GENESIS = ("Y la tierra estaba desordenada y vacía, y las tinieblas estaban sobre la faz del abismo, "
           "y el Espíritu de Dios se movía sobre la faz de las aguas.")


@pytest.mark.parametrize("line, pieces", [
    (GENESIS, ["Y la tierra estaba desordenada y vacía,", "y las tinieblas estaban sobre la faz del abismo,",
               "y el Espíritu de Dios se movía sobre la faz de las aguas."]),
    ("Compré pan, leche y huevos, y luego me fui a casa.", ["Compré pan, leche y huevos, y luego me fui a casa."]),
    # no piece under four words: not after "Sí," and not before "no."
    (f"Sí, {GENESIS[2:-1].replace(',', '')}, no.", [f"Sí, {GENESIS[2:-1].replace(',', '')}, no."]),
    # lists of numbers and quoted speech are not cut
    (f"Contó los días 1, 2, 3, 4, 5, 6 y 7 del mes en que {GENESIS[2:-1].replace(',', '')}.",
     [f"Contó los días 1, 2, 3, 4, 5, 6 y 7 del mes en que {GENESIS[2:-1].replace(',', '')}."]),
    (f"Dijo «{GENESIS[:-1]}» y se fue.", [f"Dijo «{GENESIS[:-1]}» y se fue."]),
    # a clause of no more than PHRASE_WORDS words is not cut
    ("Compré pan, leche, huevos y fruta, y después de comer con mis amigos en la plaza, volví a casa muy tarde.",
     ["Compré pan, leche, huevos y fruta, y después de comer con mis amigos en la plaza, volví a casa muy tarde."]),
    # clauses first, then the commas of each long clause
    (f"Dijo Dios: {GENESIS}", ["Dijo Dios:", "Y la tierra estaba desordenada y vacía,",
                               "y las tinieblas estaban sobre la faz del abismo,",
                               "y el Espíritu de Dios se movía sobre la faz de las aguas."]),
])
def test_phrases_cut_long_clauses_after_commas(line, pieces):
    assert segment(line, "phrases").pieces == pieces
    clauses = pieces[:1]  # the cuts after commas undone
    for piece in pieces[1:]:
        if clauses[-1].endswith(","):
            clauses[-1] += " " + piece
        else:
            clauses.append(piece)
    assert segment(line, "clauses").pieces == clauses


def test_phrases_are_clauses_cut_at_commas_into_pieces_of_four_words_or_more():
    for line in _lines() + _bible():
        clauses, phrases = segment(line, "clauses"), segment(line, "phrases")
        at = 0
        for clause, gap in zip(clauses.pieces, clauses.gaps[1:]):
            run, words = "", len(clause.split())
            while run != clause:
                piece = phrases.pieces[at]
                run += piece
                assert clause.startswith(run), (line, clause, piece)
                if run != clause:  # a cut inside the clause: after a comma, in a long clause
                    assert piece.endswith(",") and words > PHRASE_WORDS, (line, piece)
                    assert len(piece.split()) >= PHRASE_MIN_WORDS, (line, piece)
                    run += phrases.gaps[at + 1]
                else:
                    assert phrases.gaps[at + 1] == gap
                at += 1
        assert at == len(phrases.pieces)


@pytest.mark.parametrize("sources, texts, mended", [
    (["Y dijo,", "y fue la luz."], ["And he said.", "And there was light."], ["And he said,", "and there was light."]),
    (["Y dijo,", "y fue la luz."], ["And he said!", "There was light."], ["And he said!", "there was light."]),
    # a name the vocabulary keeps, one carried from the source, an acronym: kept
    (["Dijo,", "y yo fui."], ["He said.", "I went."], ["He said,", "I went."]),
    (["Dijo,", "y Henoch fue."], ["He said.", "Henoch went."], ["He said,", "Henoch went."]),
    (["Dijo,", "y fue a EE. UU."], ["He said.", "USA he went."], ["He said,", "USA he went."]),
    # a source piece that starts in capitals, and pieces not cut at a comma: as they are
    (["Dijo,", "Dios fue."], ["He said.", "God went."], ["He said,", "God went."]),
    (["Dijo:", "ven."], ["He said:", "Come."], ["He said:", "Come."]),
    (["Hola.", "Adiós."], ["Hello.", "Goodbye."], ["Hello.", "Goodbye."]),
])
def test_mend_joins_pieces_cut_at_a_comma_as_one_sentence(sources, texts, mended):
    assert mend(sources, texts, frozenset({"I"})) == mended


def test_none_keeps_the_line_whole_and_blank_lines_have_no_pieces():
    assert segment(" Hola. Adiós. ", "none") == Segments([" Hola. Adiós. "], ["", ""])
    for split in SPLITS:
        assert segment("", split) == Segments([], [""]) and segment("  \t", split) == Segments([], ["  \t"])
    with pytest.raises(ValueError, match="split must be one of sentences, clauses, phrases, none"):
        segment("Hola.", "words")


def test_join_puts_other_pieces_in_the_line_s_spacing():
    parts = segment(" Hola.  Adiós.\t")
    assert parts.gaps == [" ", "  ", "\t"] and parts.join(["A", "B"]) == " A  B\t"


def _lines() -> list[str]:
    """The bundled test's sources, the same glued two and three at a time with odd spacing, and
    random strings of the characters that matter here."""
    test = read_parallel(str(BUNDLED_DATA / "test.tsv"), "spa", "eng", "test").src
    rng = random.Random(7)
    glued = [rng.choice([" ", "  ", "\t", "", " \u00a0"]).join(rng.sample(test, rng.randint(2, 3)))
             for _ in range(500)]
    alphabet = "aA. !?¿¡…;:«»\"“”()'1,5@/-\t Sr"
    noise = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    return test + glued + noise


def _bible() -> list[str]:
    bible = BUNDLED_DATA.parents[2] / "shared" / "data" / "bible-es-en.dev.es"
    return bible.read_text(encoding="utf-8").splitlines() if bible.exists() else []


def test_pieces_and_gaps_give_every_line_back_exactly():
    lines = _lines() + _bible()
    for split in SPLITS:
        for line in lines:
            parts = segment(line, split)
            assert parts.join() == line, (split, line)
            assert len(parts.gaps) == len(parts.pieces) + 1
            assert all(p.strip() == p and p for p in parts.pieces) or split == "none"
            assert all(not g.strip() for g in parts.gaps)
