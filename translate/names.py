"""Names a model has not learned to copy, found so that they can go through it as stand-ins.

A model trained on Tatoeba copies the few names it saw often (Tom, Mary, Boston: whole pieces of
its vocabulary) and mangles the rest, which it reads as pieces of other words ("Abel", "Siddim":
0.3% of the names of the Bible dev verses that their references keep came through). A name that
the vocabulary does not hold whole is decoded as one of the names the model copies and put back
afterwards (the translator's stand-ins, as for unknown words; placeholders as in Luong et al.,
2015, and Crego et al., 2016).
"""

from __future__ import annotations

import re

from .tokenizer import Tokenizer

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


def stand_in_words(tokenizer: Tokenizer, line: str, names: bool = True) -> list[tuple[int, int, str]]:
    """The words of ``line`` to decode as stand-ins: those the vocabulary cannot cover
    (``Tokenizer.src_unknown``) and (with ``names``) the names it does not hold whole that lie
    outside them, in order."""
    unknown = tokenizer.src_unknown(line)
    if not names:
        return unknown
    found = [n for n in rare_names(tokenizer, line) if not any(n[0] <= u[1] and u[0] <= n[1] for u in unknown)]
    return sorted(unknown + found)
