"""Casual input restored to the form the model was trained on, before it is tokenized.

Tatoeba's sources start with a capital and end with ``. ! ?`` (Spanish questions also open with
``¿``), so a model trained on them has never seen "hola" or "dónde está tom": it answers "." and
mangles names it knows only capitalised. Text that looks typed casually is given back its case
and its final mark, the way truecasers and punctuation restorers prepare ASR output for
translation (Lita et al., 2003, truecasing; Peitz et al., 2011, punctuation before MT):

- case, only when the text has no capital letter at all: each sentence's first letter, and every
  word that the tokenizer's vocabulary knows only capitalised (a whole-word piece "▁Tom" and no
  "▁tom": names, places, TV), taken from the tokenizer itself, so that every checkpoint and
  exported model has it;
- the final mark, only when the text ends in a letter or a digit: ``?`` (and an opening ``¿``)
  for a sentence that opens with an interrogative (qué, cómo, dónde, cuándo, cuánto, quién, cuál,
  with their accents, alone or after a preposition: "por qué", "de dónde"), ``?`` or ``!`` to
  close a ``¿`` or ``¡`` left open, else ``.``.

Text with a capital and a final mark passes through unchanged, and restoring twice is restoring
once. Older printed Spanish (before the RAE's norms of 1952: ``fué``, ``dió``, and ``á``, ``é``,
``ó`` written as words; pronouns joined on to a finite verb, ``díjole``) gets the modern spelling the
training data has (``modernise``).
"""

from __future__ import annotations

import re
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .tokenizer import WORD_START, Tokenizer

_WORD = re.compile(r"\w+")
_OPENING = "¿¡\"«“(—-"  # marks that may open a sentence
# a sentence's end: . ! ? and any closing quotes, then a space or an opening mark (not "1.5")
_SENTENCE_END = re.compile(r"[.!?]+[\"»”’)]*(?=[\s" + _OPENING + r"])\s*")
# a sentence's first letter: at the text's start or after an end, past any opening marks
_SENTENCE_START = re.compile(r"(?:^|" + _SENTENCE_END.pattern + r")[\s" + _OPENING + r"]*(\w)")
_INTERROGATIVE = re.compile(
    r"(?:(?:a|de|con|para|por|en|desde|hasta|sobre|hacia|y)\s+)?"
    r"(?:qué|cómo|dónde|adónde|cuándo|cuánt[oa]s?|quién(?:es)?|cuál(?:es)?)(?!\w)", re.IGNORECASE)
# first words of yes/no questions: those that open a question in 80% or more of the training sources
# that start with them, 50 times or more ("quieres", 332 times: 99.7%; "has", 344: 82%)
_QUESTION_OPENER = re.compile(r"(?:quieres|querés|crees|sabes|podrías|conoces|acaso|alguna|has)(?!\w)",
                              re.IGNORECASE)

_RECASING: weakref.WeakKeyDictionary[Tokenizer, dict[str, str]] = weakref.WeakKeyDictionary()


def recasing(tokenizer: Tokenizer) -> dict[str, str]:
    """Lower-case word -> the cased form the source vocabulary knows it by, for each word that is a
    whole piece only capitalised ("tom" -> "Tom", "tv" -> "TV"; words of two letters or more, so
    that the conjunctions "u", "y" stay as they are). The likeliest piece wins a tie of casings."""
    if tokenizer not in _RECASING:
        sp = tokenizer.src
        scored = [(sp.get_score(i), sp.id_to_piece(i)) for i in range(sp.get_piece_size())]
        whole = {piece[1:] for _, piece in scored if piece.startswith(WORD_START)}
        table: dict[str, str] = {}
        for _, piece in sorted(scored):  # least likely first, so that the likeliest is written last
            word = piece[1:]
            if piece.startswith(WORD_START) and len(word) > 1 and word.isalpha() and word != word.lower() \
                    and word.lower() not in whole:
                table[word.lower()] = word
        _RECASING[tokenizer] = table
    return _RECASING[tokenizer]


# one-syllable words that lost their written accent in 1952 (and the accented "á é ó ú" of older print,
# words of their own): their modern spelling
OLD_ACCENTS = {"á": "a", "é": "e", "ó": "o", "ú": "u", "fué": "fue", "fuí": "fui", "dió": "dio", "vió": "vio",
               "pié": "pie", "dí": "di", "ví": "vi", "ní": "ni", "dá": "da", "vá": "va"}
# older words for which the training data has another ("but")
OLD_WORDS = {"empero": "pero"}
# "mas" (but) opening a clause, before a word that "más" (more) does not precede there
OLD_OPENERS = {"mas": "pero"}
_OPENER = re.compile(r"(?:^|(?<=[,;:.!?¿¡(\"«]))(\s*)(" + "|".join(OLD_OPENERS) + r")(?=\s+(?:"
                     r"no|ni|el|la|los|las|lo|le|les|se|me|te|nos|os|"
                     r"yo|tú|él|ella|ellos|ellas|nosotros|vosotros|si|cuando|ahora|también|aun|aún|como|mis?|tus?|sus?|"
                     r"nuestr[oa]s?|vuestr[oa]s?|aquel|aquell[oa]s?|est[aeo]s?|es[aeo]s?|(?-i:[A-ZÁÉÍÓÚÑ])\w*)(?!\w))",
                     re.IGNORECASE)
# object pronouns a verb may carry; two of them only in the order Spanish has ("se lo", "me la")
_CLITICS = ("me", "te", "se", "nos", "os", "le", "les", "lo", "los", "la", "las")
_FIRST_CLITICS, _SECOND_CLITICS = ("me", "te", "se", "nos", "os"), ("le", "les", "lo", "los", "la", "las")
_PLAIN = str.maketrans("áéíóú", "aeiou")


class Modernising(NamedTuple):
    """What ``modernise`` changes for one source vocabulary: ``words``, the ``OLD_ACCENTS`` and
    ``OLD_WORDS`` it needs (the old word is no whole piece of it and the modern one is), ``openers``,
    the same of ``OLD_OPENERS``, and ``verbs``, its whole words that a finite past or first-person
    verb with a pronoun joined on may stand on ("dijo", "levantó", "dijeron", "ruego")."""

    words: dict[str, str]
    verbs: frozenset[str]
    openers: dict[str, str]


_MODERN: weakref.WeakKeyDictionary[Tokenizer, Modernising] = weakref.WeakKeyDictionary()


def modernising(tokenizer: Tokenizer) -> Modernising:
    """The ``Modernising`` of this source vocabulary (a vocabulary that holds "é" as a word, as a
    Portuguese one does, keeps it)."""
    if tokenizer not in _MODERN:
        sp = tokenizer.src
        whole = (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
        verbs = frozenset(piece[1:] for piece in whole if piece.startswith(WORD_START) and len(piece) > 3
                          and piece.endswith(("o", "ó", "ron")) and not piece.endswith(("ndo", "ado", "ido")))
        def needed(table: dict[str, str]) -> dict[str, str]:
            return {old: new for old, new in table.items()
                    if not tokenizer.src_holds_word(old) and tokenizer.src_holds_word(new)}
        _MODERN[tokenizer] = Modernising(needed(OLD_ACCENTS | OLD_WORDS), verbs, needed(OLD_OPENERS))
    return _MODERN[tokenizer]


def _unjoined(word: str, modern: Modernising) -> str | None:
    """A verb written with its pronouns joined on, as older print did with finite verbs ("díjole",
    "levantóse", "dijéronle"), the modern way round ("le dijo"); None for any other word. Only a
    written accent marks the old form, and only a verb the vocabulary holds whole counts, so an
    imperative ("contrólate", "tómalo"), a gerund or a noun ("fenómenos", "ídolo") stays."""
    low = word.lower()
    if low == low.translate(_PLAIN):  # no written accent: a modern word
        return None
    splits = []
    for last in _CLITICS:
        if low.endswith(last):
            rest = low[:-len(last)]
            splits.append((rest, [last]))
            if last in _SECOND_CLITICS:
                splits.extend((rest[:-len(first)], [first, last]) for first in _FIRST_CLITICS if rest.endswith(first))
    for stem, pronouns in splits:
        if len(stem) < 3:
            continue
        verb = modern.words.get(stem) or (stem if stem.endswith("ó") else stem.translate(_PLAIN))
        if verb in modern.verbs or stem in modern.words:
            return _cased(" ".join(pronouns + [verb]), word)
    return None


def _cased(new: str, word: str) -> str:
    if word.isupper() and len(word) > 1:
        return new.upper()
    return new[0].upper() + new[1:] if word[0].isupper() else new


def modernise(text: str, modern: Modernising) -> str:
    """``text`` in today's words, their case kept: the old accents and words of ``modern.words``, a
    clause's opening "mas" (``modern.openers``), and pronouns joined on to a finite verb moved before
    it (``_unjoined``)."""
    def swap(match: re.Match) -> str:
        word = match.group()
        new = modern.words.get(word.lower())
        return _unjoined(word, modern) or word if new is None else _cased(new, word)
    if modern.openers:
        text = _OPENER.sub(lambda m: m.group(1) + _cased(modern.openers[m.group(2).lower()], m.group(2)), text)
    return _WORD.sub(swap, text) if modern.words or modern.verbs else text


# what typing without accents drops: the written accents, the tilde of ñ and the diaeresis of ü
_ACCENTED = "áéíóúüñÁÉÍÓÚÜÑ"
_UNACCENTED = str.maketrans(_ACCENTED, "aeiouunAEIOUUN")
_WRITTEN_ACCENTS = "áéíóúüÁÉÍÓÚÜ"
_REACCENTING: weakref.WeakKeyDictionary[Tokenizer, dict[frozenset[int] | None, dict[str, str]]] = \
    weakref.WeakKeyDictionary()


def _accented_words(tokenizer: Tokenizer) -> list[tuple[float, int, str]]:
    """(score, id, word in lower case) of each whole-word source piece with a written accent, ñ or ü."""
    sp = tokenizer.src
    found = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        word = piece[1:].lower()
        if piece.startswith(WORD_START) and word.isalpha() and word.translate(_UNACCENTED) != word:
            found.append((sp.get_score(i), i, word))
    return found


def accented_pieces(tokenizer: Tokenizer, sources: Sequence[np.ndarray], batch: int = 10_000,
                    most: int = 400_000) -> torch.Tensor:
    """(n,) int32 the ids of ``_accented_words`` that the training ``sources`` (each sentence's
    source ids: an ``encoded.EncodedCorpus``) write more often, as words in any case, than their
    plain spelling: "días" over "dias", not "hacía" (87 times in the bundled training sources) over
    "hacia" (208), nor "uñas" over "unas". Counted on ``most`` sentences at the most, evenly spread
    (a corpus of millions need not all be read back as text before training starts)."""
    chosen = np.linspace(0, len(sources) - 1, most).astype(np.int64) if len(sources) > most else range(len(sources))
    counts: Counter[str] = Counter()
    for start in range(0, len(chosen), batch):
        texts = tokenizer.src.decode([np.asarray(sources[int(i)]).tolist() for i in chosen[start: start + batch]])
        counts.update(word.lower() for text in texts for word in _WORD.findall(text))
    ids = [i for _, i, word in _accented_words(tokenizer) if counts[word] > counts[word.translate(_UNACCENTED)]]
    return torch.tensor(ids, dtype=torch.int32)


def reaccenting(tokenizer: Tokenizer, accented: torch.Tensor | None = None) -> dict[str, str]:
    """Lower-case word typed without accents -> the accented word the source vocabulary knows it by,
    for each whole-word piece with an accent, ñ or ü whose plain spelling is no whole piece ("dias"
    -> "días", "manana" -> "mañana", "cancion" -> "canción"); a word whose plain spelling is a word
    too ("esta" and "está", "que" and "qué") is left as typed. With ``accented``
    (``Lexicon.accented``), only the pieces that the training sources write more often than their
    plain spelling (a plain word the vocabulary happens to split, "hacia", stays); without it (a
    checkpoint from before it was counted), every such piece. The likeliest piece wins a tie."""
    key = None if accented is None else frozenset(accented.tolist())
    cached = _REACCENTING.setdefault(tokenizer, {})
    if key not in cached:
        whole = {word[1:].lower() for word in (tokenizer.src.id_to_piece(i) for i in range(tokenizer.src_vocab_size))
                 if word.startswith(WORD_START)}
        table: dict[str, str] = {}
        for _, i, word in sorted(_accented_words(tokenizer)):  # least likely first: the likeliest is written last
            plain = word.translate(_UNACCENTED)
            if plain not in whole and (key is None or i in key):
                table[plain] = word
        cached[key] = table
    return cached[key]


# a sentence's first word typed without its accent, where the training sources that open with it have the accent
# in 85% of them or more: "qué" 2,194 against "que" 78, "cómo" 711 / 104, "dónde" 685 / 10, "cuánto" 345 / 50,
# "quién" 702 / 16, "cuál" 492 / 1, "estás" 521 / 93 ("cuando" 314 / 439 and "él" 4,754 / "el" 4,137 are not)
OPENING_ACCENTS = {"que": "qué", "como": "cómo", "donde": "dónde", "adonde": "adónde", "cual": "cuál",
                   "cuales": "cuáles", "cuanto": "cuánto", "cuanta": "cuánta", "cuantos": "cuántos",
                   "cuantas": "cuántas", "quien": "quién", "quienes": "quiénes", "estas": "estás"}
_OPENING_WORD = re.compile(r"^([\s" + _OPENING + r"]*(?:(?:a|de|con|para|por|en|desde|hasta|hacia|sobre)\s+)?)("
                           + "|".join(OPENING_ACCENTS) + r")(?!\w)", re.IGNORECASE)


def reaccent(text: str, table: dict[str, str]) -> str:
    """``text`` with its accents, where it has no written accent or ü at all (ñ has a key of its
    own) and looks typed: no capital letter, or no final mark, or a ``?`` without its ``¿`` (a
    Bible verse or an edited sentence that happens to need no accent stays as it is). Each word of
    ``table`` (``reaccenting``) but a capitalised one inside the text (a name: "Demas"), and, unless
    it ends as a statement, the first word (after a preposition, if one opens it) from
    ``OPENING_ACCENTS``, so that a question reads as one ("que hora es" -> "qué hora es", which
    ``restore`` closes as a question)."""
    body = text.rstrip()
    typed = not any(c.isupper() for c in body) or body[-1:].isalnum() or (body.endswith("?") and "¿" not in body)
    if not body or not typed or any(c in _WRITTEN_ACCENTS for c in body):
        return text
    if body[-1].isalnum() or body.endswith("?"):  # no statement: "que te mejores." stays
        text = _OPENING_WORD.sub(lambda m: m.group(1) + _cased(OPENING_ACCENTS[m.group(2).lower()], m.group(2)),
                                 text)

    def word(match: re.Match) -> str:
        found = match.group()
        new = table.get(found.lower())
        name = found[0].isupper() and text[: match.start()].strip(" " + _OPENING)
        return found if new is None or name else _cased(new, found)
    return _WORD.sub(word, text)


_KEPT: weakref.WeakKeyDictionary[Tokenizer, frozenset[str]] = weakref.WeakKeyDictionary()
# nats: "I" is far likelier than "i" in an English vocabulary, a sentence's first word ("He") only a little
KEPT_MARGIN = 3.0


def kept_capitals(tokenizer: Tokenizer) -> frozenset[str]:
    """Words the target vocabulary holds whole and capitalised, whose lower-case form it lacks or
    finds ``KEPT_MARGIN`` nats less likely: names and "I", which stay capitalised inside a
    sentence (where a sentence's first word, "He", "The", would not)."""
    if tokenizer not in _KEPT:
        sp = tokenizer.tgt
        scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
        kept = set()
        for piece, score in scores.items():
            word = piece[1:]
            if piece.startswith(WORD_START) and word[:1].isupper():
                lower = scores.get(WORD_START + word.lower())
                if lower is None or score - lower >= KEPT_MARGIN:
                    kept.add(word)
        _KEPT[tokenizer] = frozenset(kept)
    return _KEPT[tokenizer]


def _recase(text: str, table: dict[str, str]) -> str:
    text = _WORD.sub(lambda m: table.get(m.group(), m.group()), text)
    return _SENTENCE_START.sub(lambda m: m.group()[:-1] + m.group(1).upper(), text)


def _close(text: str) -> str:
    """``text`` (ending in a letter or digit) with its final mark, and ``¿`` before a question."""
    last = max((m.end() for m in _SENTENCE_END.finditer(text)), default=0)  # where the last sentence starts
    opened = text[last:]
    if "¿" in opened:
        return text + "?"
    if "¡" in opened:
        return text + "!"
    lead = len(opened) - len(opened.lstrip(" " + _OPENING))
    if _INTERROGATIVE.match(opened, lead) or _QUESTION_OPENER.match(opened, lead):
        return f"{text[:last + lead]}¿{text[last + lead:]}?"
    return text + "."


def restore(text: str, table: dict[str, str]) -> str:
    """``text`` with the case (when it has no capital letter) and the final mark (when it ends in a
    letter or a digit) that edited text would have; ``table`` is ``recasing(tokenizer)``."""
    body = text.rstrip()
    if not body:
        return text
    if not any(c.isupper() for c in body):
        body = _recase(body, table)
    if body[-1].isalnum():
        body = _close(body)
    return body + text[len(text.rstrip()):]
