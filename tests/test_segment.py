"""Sentence splitting: the hard cases, and that no text is ever lost or moved."""

import random

import pytest

from translate.config import BUNDLED_DATA
from translate.corpus import read_parallel
from translate.segment import SPLITS, Segments, segment

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


def test_none_keeps_the_line_whole_and_blank_lines_have_no_pieces():
    assert segment(" Hola. Adiós. ", "none") == Segments([" Hola. Adiós. "], ["", ""])
    for split in SPLITS:
        assert segment("", split) == Segments([], [""]) and segment("  \t", split) == Segments([], ["  \t"])
    with pytest.raises(ValueError, match="split must be one of sentences, clauses, none"):
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


def test_pieces_and_gaps_give_every_line_back_exactly():
    bible = BUNDLED_DATA.parents[2] / "shared" / "data" / "bible-es-en.dev.es"
    lines = _lines() + (bible.read_text(encoding="utf-8").splitlines() if bible.exists() else [])
    for split in SPLITS:
        for line in lines:
            parts = segment(line, split)
            assert parts.join() == line, (split, line)
            assert len(parts.gaps) == len(parts.pieces) + 1
            assert all(p.strip() == p and p for p in parts.pieces) or split == "none"
            assert all(not g.strip() for g in parts.gaps)
