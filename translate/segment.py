"""Sentence (and clause) splitting of one input line, so that a model trained on single sentences
is asked for single sentences; ``Translator.translate`` translates the pieces and joins them.

The rule is written here rather than taken from a library: a line ends a sentence after a run of
``. ! ? …`` (clauses: also ``;`` or ``:``; phrases: also a comma inside a clause of more than
``PHRASE_WORDS`` words), closing quotes or brackets, and a space, where the next
word may start a sentence, outside quotes and brackets, and not after an abbreviation that goes
before a name (``Sr.``, ``Dra.``, an initial) or before a lowercase word after one that may end a
sentence (``etc.``, ``EE. UU.``, ``p.m.``, a web address). Numbers (``1.5``, ``3:15``), addresses
and marks without a space after them never split. Text is never lost or moved: the pieces and the
spacing between them (``Segments.gaps``) give the line back exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal, NamedTuple

SPLITS = ("sentences", "clauses", "phrases", "none")
Split = Literal["sentences", "clauses", "phrases", "none"]
# phrases: a clause of more words (by default; a translator's: its training sources' length, if longer) is cut
# after commas into pieces of at least PHRASE_MIN_WORDS words
PHRASE_WORDS, PHRASE_MIN_WORDS = 24, 4

# abbreviations that go before a name or a word of their own: never the end of a sentence
TITLES = frozenset("""sr sra srta sres srs dr dra dres ud uds vd vds dña dª prof profa lic ing arq gral excmo
excma ilmo ilma sto sta mons mr mrs ms st""".split())
# abbreviations that may end a sentence: a split only before a capital, ¿ ¡ or a quote
ENDINGS = frozenset("""etc ej pág págs pag pags núm num tel aprox máx mín vol cap art av avda dcha izq cía
hnos admón dpto depto cf vs fig ed ee uu cit op approx no""".split())

_OPENERS, _CLOSERS = "«“([{", "»”)]}"
_SENTENCE = r"[.!?…]+"
_CLAUSE = r"[.!?…]+|[;:]"
# a run of marks, then closing quotes or brackets, then the spacing before the next piece
_BOUNDARY = {
    "sentences": re.compile(rf"(?:{_SENTENCE})[»”\"’')\]}}]*(\s+)(?=\S)"),
    "clauses": re.compile(rf"(?:{_CLAUSE})[»”\"’')\]}}]*(\s+)(?=\S)"),
}
_BOUNDARY["phrases"] = _BOUNDARY["clauses"]
_COMMA = re.compile(r"(?<!\d),(\s+)(?=[^\s\d])")  # not in a list of numbers ("1, 2 y 3")
_STARTS = "¿¡«“\"'(—–-[" # what a sentence may open with, besides a letter or a digit
_ACRONYM = re.compile(r"[A-ZÁÉÍÓÚÑ]{1,3}\.")  # the next part of an abbreviation like EE. UU. or S. A.


class Segments(NamedTuple):
    """A line as pieces and the spacing around them: ``gaps[0] + pieces[0] + gaps[1] + ... +
    pieces[-1] + gaps[-1]`` is the line (``join``); no pieces for a blank line."""

    pieces: list[str]
    gaps: list[str]  # one more than the pieces

    def join(self, pieces: list[str] | None = None) -> str:
        """The line back (or ``pieces`` in the place of the line's own, with its spacing)."""
        pieces = self.pieces if pieces is None else pieces
        return self.gaps[0] + "".join(p + g for p, g in zip(pieces, self.gaps[1:]))


def _depths(line: str) -> list[int]:
    """How many quotes or brackets are open after each character (a straight ``"`` opens after a
    space or the start of the line, else closes); never below 0. A line whose quotes do not close
    counts none, so that one stray mark does not stop every split after it."""
    depth, depths, straight = 0, [], False
    for i, char in enumerate(line):
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth = max(0, depth - 1)
        elif char == '"':
            opening = not straight and (i == 0 or line[i - 1].isspace() or line[i - 1] in _OPENERS + "¿¡")
            straight = opening
            depth = depth + 1 if opening else max(0, depth - 1)
        depths.append(depth)
    if depth:
        return [0] * len(line)
    return depths


def _word_before(line: str, end: int) -> str:
    """The word that ends at ``end`` (the first mark), without opening quotes, ¿ or ¡."""
    start = end
    while start > 0 and not line[start - 1].isspace():
        start -= 1
    return line[start:end].lstrip(_OPENERS + "¿¡\"'")


def _splits_at(line: str, mark_start: int, marks: str, next_at: int) -> bool:
    """Whether the run of ``marks`` at ``mark_start`` ends a piece, the next starting at ``next_at``."""
    following = line[next_at]
    if not (following.isalnum() or following in _STARTS):
        return False
    if marks[0] in ";:":
        return True
    lower = following.islower()
    if "?" in marks or "!" in marks:
        return True
    if marks != ".":  # an ellipsis goes on in lowercase
        return not lower
    word = _word_before(line, mark_start)
    key = word.lower()
    if not word or (len(word) == 1 and word.isalpha()) or key in TITLES:  # an initial or a title
        return False
    if _ACRONYM.match(line, next_at) and word.isupper():  # EE. UU., S. A.
        return False
    may_end = key in ENDINGS or "." in word or "@" in word or (word.isupper() and word.isalpha())
    if may_end:
        return not lower and not following.isdigit()
    return True


def _boundaries(line: str, split: Split, depths: list[int]) -> Iterator[tuple[int, int]]:
    """(end of a piece, start of the next) for every split of ``line`` (``depths``: ``_depths(line)``)."""
    for match in _BOUNDARY[split].finditer(line):
        gap_start, next_at = match.span(1)
        if depths[gap_start - 1]:
            continue
        marks = re.match(r"[.!?…;:]+", line[match.start():]).group()
        quoted = match.start() + len(marks) < gap_start  # «...?» y se fue: the quote goes on
        if _splits_at(line, match.start(), marks, next_at) and not (quoted and line[next_at].islower()):
            yield gap_start, next_at


def _comma_cuts(line: str, start: int, end: int, depths: list[int], longest: int) -> Iterator[tuple[int, int]]:
    """(end of a piece, start of the next) after the commas of the clause ``line[start:end]`` when it
    has more than ``longest`` words: each piece and what is left at least ``PHRASE_MIN_WORDS``."""
    if len(line[start:end].split()) <= longest:
        return
    piece_start = start
    for match in _COMMA.finditer(line, start, end):
        gap_start, next_at = match.span(1)
        if depths[gap_start - 1]:
            continue
        if min(len(line[piece_start:gap_start].split()), len(line[next_at:end].split())) >= PHRASE_MIN_WORDS:
            yield gap_start, next_at
            piece_start = next_at


def segment(line: str, split: Split = "sentences", longest: int = PHRASE_WORDS) -> Segments:
    """``line`` cut into sentences (``clauses``: also at ``;`` and ``:``; ``phrases``: also at the
    commas of a clause of more than ``longest`` words), or whole (``none``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    body = line.strip()
    if not body:
        return Segments([], [line])
    if split == "none":
        return Segments([line], ["", ""])
    lead = len(line) - len(line.lstrip())
    depths = _depths(line)
    cuts = list(_boundaries(line, split, depths))
    if split == "phrases":
        starts = [lead] + [next_at for _, next_at in cuts]  # the clauses
        ends = [end for end, _ in cuts] + [lead + len(body)]
        cuts = sorted(cuts + [cut for start, end in zip(starts, ends)
                              for cut in _comma_cuts(line, start, end, depths, longest)])
    pieces, gaps, start = [], [line[:lead]], lead
    for end, next_at in cuts:
        pieces.append(line[start:end])
        gaps.append(line[end:next_at])
        start = next_at
    end = lead + len(body)
    pieces.append(line[start:end])
    gaps.append(line[end:])
    return Segments(pieces, gaps)


def mend(sources: list[str], texts: list[str], kept: frozenset[str] = frozenset()) -> list[str]:
    """A line's translated pieces (``texts``, of the pieces ``sources``) made to read as one
    sentence where a comma cut them (``phrases``): a piece whose source ends with a comma ends
    with one (not ``.``), and the next starts in lower case unless its source does or its first
    word is a name: in ``kept`` (``casual.kept_capitals``: names and "I"), in the source (a name
    carried over) or an acronym."""
    out = list(texts)
    source_words = set(re.findall(r"\w+", " ".join(sources)))
    for i, source in enumerate(sources[:-1]):
        if not source.endswith(","):
            continue
        if out[i].endswith("."):
            out[i] = out[i][:-1] + ","
        following = out[i + 1]
        first = re.match(r"\w*", following).group()
        name = first in kept or first in source_words or first[1:2].isupper()
        if following[:1].isupper() and sources[i + 1][:1].islower() and not name:
            out[i + 1] = following[0].lower() + following[1:]
    return out
