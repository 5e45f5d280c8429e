"""Names a model has not learned to copy, found so that they can go through it as stand-ins.

A model trained on Tatoeba copies the few names it saw often (Tom, Mary, Boston: whole pieces of
its vocabulary) and mangles the rest, which it reads as pieces of other words ("Abel", "Siddim":
0.3% of the names of the Bible dev verses that their references keep came through). A name that
the vocabulary does not hold whole is decoded as one of the names the model copies and put back
afterwards (the translator's stand-ins, as for unknown words; placeholders as in Luong et al.,
2015, and Crego et al., 2016).

Numbers go the same way. A number the vocabulary does not hold whole is read digit by digit, and
an RNN model does not copy a string of digits: "2019" came out as "201999", "3,75" as "3,7555",
"555-1234" as "5553134". It is decoded as a number the model copies (``NUMBER_STAND_INS`` in the
translator) and put back as written.

A name carried from the source keeps its spelling, in letters the target language may not use
(Saúl, Jehová, in English text). ``TargetLetters`` knows the letters of the model's training
targets, from the lexicon's counts, and spells a carried word in them where dropping its accents
does (Saul): as the training targets spell what they borrow.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection

import torch

from .tokenizer import SPECIAL, Tokenizer

_WORD = re.compile(r"\w+")
_OPENS = re.compile(r"[.!?;:¿¡«\"“(—-]\s*$")  # what may come before a sentence's (capitalised) first word


def rare_names(tokenizer: Tokenizer, line: str) -> list[tuple[int, int, str]]:
    """The names in ``line`` that the source vocabulary does not hold as a whole piece: words that
    start with a capital (and are not all capitals) where no sentence starts, as ``(first piece,
    last piece, text)``, in order, once each place they occur."""
    found = []
    for match in _WORD.finditer(line):
        word = match.group()
        before = line[: match.start()]
        if not (word[:1].isupper() and not word.isupper() and word.isalpha()) or not before.strip() \
                or _OPENS.search(before) or tokenizer.src_holds_word(word):
            continue
        first, last = tokenizer.src_pieces_within(line, match.start(), match.end())
        found.append((first, last, word))
    return found


# a number as written: digits, with . , : / - between groups of them ("1.5", "3,75", "10:30", "555-1234"), not
# part of a word ("A4", "mp3") nor an ordinal ("16º")
NUMBER = re.compile(r"(?<![\w.,:/-])\d+(?:[.,:/-]\d+)*(?![\wºª°]|[.,:/-]\d)")


def rare_numbers(tokenizer: Tokenizer, line: str) -> list[tuple[int, int, str]]:
    """The numbers in ``line`` that the source vocabulary does not hold as a whole piece, as
    ``(first piece, last piece, text)``, in order."""
    return [(*tokenizer.src_pieces_within(line, match.start(), match.end()), match.group())
            for match in NUMBER.finditer(line) if not tokenizer.src_holds_word(match.group())]


def stand_in_words(tokenizer: Tokenizer, line: str, names: bool = True,
                   numbers: bool = True) -> list[tuple[int, int, str]]:
    """The words of ``line`` to decode as stand-ins: those the vocabulary cannot cover
    (``Tokenizer.src_unknown``) and, outside them, the names (with ``names``) and the numbers
    (with ``numbers``) it does not hold whole, in order."""
    unknown = tokenizer.src_unknown(line)
    found = (rare_names(tokenizer, line) if names else []) + (rare_numbers(tokenizer, line) if numbers else [])
    return sorted(unknown + [n for n in found if not any(n[0] <= u[1] and u[0] <= n[1] for u in unknown)])


# a letter is the target language's when it makes up at least this share of the letters of the training targets
# (case folded): the English of the bundled data has é in 11 of 3.3 million letters, Spanish has ü in 35 a million
LETTER_SHARE = 1e-5


class TargetLetters:
    """The letters of a model's training targets (lower case), from the target pieces' counts."""

    def __init__(self, letters: Collection[str]):
        self.letters = frozenset(letters)

    @classmethod
    def of_counts(cls, tokenizer: Tokenizer, counts: torch.Tensor | None) -> TargetLetters | None:
        """From ``Lexicon.target_counts`` ((tgt_vocab,) occurrences of each target piece); None
        without counts (a checkpoint written before they were kept)."""
        if counts is None:
            return None
        tally: dict[str, int] = {}
        for piece, count in enumerate(counts.tolist()):
            if count and piece >= SPECIAL and not tokenizer.tgt.is_byte(piece):
                for char in tokenizer.tgt.id_to_piece(piece):
                    if char.isalpha():
                        tally[char.lower()] = tally.get(char.lower(), 0) + count
        total = sum(tally.values())
        return cls(c for c, n in tally.items() if n >= LETTER_SHARE * total)

    def spell(self, text: str, source: str, keep: Collection[str] = ()) -> str:
        """``text`` with each word carried from ``source`` (a word of both) that holds letters
        outside the target's written without their accents where that leaves only the target's
        letters (Saúl -> Saul; a Greek name stays as it is); the words in ``keep`` (a glossary's
        terms, a prefix) as they are."""
        carried = set(_WORD.findall(source)) - set(keep)

        def letter(char: str) -> str:
            if not char.isalpha() or char.lower() in self.letters:
                return char
            bare = "".join(c for c in unicodedata.normalize("NFD", char) if not unicodedata.combining(c))
            return bare if bare and all(c.lower() in self.letters for c in bare) else char

        def word(match: re.Match) -> str:
            found = match.group()
            return "".join(map(letter, found)) if found in carried else found

        return _WORD.sub(word, text)
