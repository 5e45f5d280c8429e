"""Glossaries: source term -> target term pairs whose target terms must appear in a translation.

A glossary is read from a TSV file (one ``SOURCE<TAB>TARGET`` a line) or taken from a request (a
list of pairs, or an object). For each sentence, the entries whose source term occurs in it
(case-insensitive, whole words; a longer term wins over one inside it) become constraints of the
search (``search.constrained_beam_search``): the target term's pieces must appear in the output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UserError

MAX_TERM = 200  # characters of a term
MAX_ENTRIES = 1000  # entries of a glossary

Glossary = tuple[tuple[str, str], ...]


class GlossaryError(UserError):
    """A glossary cannot be used; the message says where and why."""


def check_glossary(entries: Any, where: str = "glossary") -> Glossary:
    """``entries`` (pairs, or a mapping of source term to target term) as a ``Glossary``, or a
    GlossaryError naming ``where`` and what is wrong."""
    if isinstance(entries, dict):
        entries = list(entries.items())
    if not isinstance(entries, (list, tuple)):
        raise GlossaryError(f"{where} must be a list of [source, target] pairs or an object, not {entries!r:.60}")
    if len(entries) > MAX_ENTRIES:
        raise GlossaryError(f"{where} has {len(entries)} entries; at most {MAX_ENTRIES} are allowed")
    out = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not all(isinstance(t, str) for t in entry):
            raise GlossaryError(f"{where} entry {number} must be a [source, target] pair of texts, not {entry!r:.60}")
        source, target = (" ".join(term.split()) for term in entry)
        for side, term in (("source", source), ("target", target)):
            if not term:
                raise GlossaryError(f"{where} entry {number} has an empty {side} term")
            if len(term) > MAX_TERM:
                raise GlossaryError(f"{where} entry {number} has a {side} term of {len(term)} characters; "
                                    f"at most {MAX_TERM} are allowed")
        out.append((source, target))
    return tuple(out)


def read_glossary(path: str | Path) -> Glossary:
    """A TSV file's glossary, ``SOURCE<TAB>TARGET`` a line (blank lines skipped), or a
    GlossaryError that names the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GlossaryError(f"cannot read the glossary {path}: {exc}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise GlossaryError(f"{path} line {number}: write SOURCE<TAB>TARGET (one tab), not {line!r:.60}")
        pairs.append(parts)
        if len(pairs) > MAX_ENTRIES:
            raise GlossaryError(f"{path} has more than {MAX_ENTRIES} entries")
    return check_glossary(pairs, f"{path}:")


def matches(glossary: Iterable[tuple[str, str]], text: str) -> list[tuple[str, str]]:
    """The entries whose source term occurs in ``text`` as whole words, case-insensitive, in the
    order they occur; where terms overlap the longer wins, and a target term is asked for once."""
    taken: list[tuple[int, int]] = []
    found = []
    for source, target in sorted(glossary, key=lambda e: -len(e[0])):
        for hit in re.finditer(rf"(?<!\w){re.escape(source)}(?!\w)", text, re.IGNORECASE):
            if not any(hit.start() < end and start < hit.end() for start, end in taken):
                taken.append(hit.span())
                found.append((hit.start(), source, target))
                break
    seen: set[str] = set()
    return [(s, t) for _, s, t in sorted(found) if not (t in seen or seen.add(t))]
