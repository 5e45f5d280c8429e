"""The one place that decodes text: ``DecodeOptions`` says how, ``Translator`` does it.

A ``Translator`` holds what every caller (``translate eval`` / ``decode`` / ``repl`` /
``serve`` / ``attend``, validation during training, the benchmarks) would otherwise set up
again: the model copy for a precision, the tokenizer, the device and its autocast type, default
options, and the threads or processes that decode batches side by side. Sockeye's
``Translator`` has the same job; the searches themselves stay plain functions in ``search.py``.
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import multiprocessing
import numbers
import pickle
import re
import signal
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from . import runtime
from .casual import kept_capitals, modernise, modernising, reaccent, reaccenting, recasing, restore
from .checkpoint import load_model
from .confidence import Calibrator, attach
from .config import Config
from .data import collate, token_batches
from .decoder import OutputVocab
from .encoded import Encoded
from .ensemble import Ensemble, join_models
from .errors import ConfigError, UserError
from .glossary import Glossary, check_glossary, matches
from .names import NUMBER, TargetLetters, stand_in_words
from .quantize import int8_available, quantized_copy
from .runtime import autocast_for, cpu_has_bf16, select_device
from .search import (
    Hypothesis,
    Sampler,
    beam_search,
    constrained_beam_search,
    greedy,
    length_penalty,
    max_lengths,
    missing_constraints,
)
from .segment import PHRASE_WORDS, SPLITS, mend, segment
from .shortlist import TOP, Lexicon, Shortlist, union
from .tokenizer import PAD, SPECIAL, UNK, WORD_START, Tokenizer

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
# what ``auto`` decodes with on a CPU: the fastest precision whose BLEU stays within 0.1 of fp32
# on the bundled test and the Bible verses, on the mean over the default configuration's seeds
# (bench/decode_precision.py; docs/benchmarks.md, "Decoding precision")
CPU_PRECISION = "int8"


class Bound(NamedTuple):
    """The values one ``DecodeOptions`` field takes, which every caller (the CLI's flags, the
    server's requests, the repl's commands) reads from ``DecodeOptions.BOUNDS``: a ``kind`` from
    ``low`` (excluded when ``low_open``) to ``high`` (None: no upper limit)."""

    kind: type  # int or float
    low: float
    high: float | None = None
    low_open: bool = False
    note: str = ""  # what ``low`` means, when it means something of its own

    def describe(self) -> str:
        """The valid values, as the error messages say them: "an integer from 1 to 64"."""
        low, high = f"{self.low:g}", None if self.high is None else f"{self.high:g}"
        if high is None:
            return f"above {low}" if self.low_open else f"{low} or more"
        if self.low_open:
            return f"{'positive' if self.low == 0 else f'above {low}'} and at most {high}"
        if self.note:
            return f"from {low} ({self.note}) to {high}"
        return f"{'an integer' if self.kind is int else 'a number'} from {low} to {high}"

    def check(self, label: str, value: Any) -> int | float:
        """``value`` as the field's type, or a ConfigError that names ``label`` and the valid values."""
        if self.kind is int:
            valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        else:
            valid = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        valid = valid and (value > self.low if self.low_open else value >= self.low)
        if not valid or (self.high is not None and value > self.high):
            raise ConfigError(f"{label} must be {self.describe()}, not {value!r}")
        return self.kind(value)


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. Frozen and hashable, so that the server can group requests by it. The one
    owner of each option's bounds (``BOUNDS``): every field is checked here, and the CLI, the
    server and the repl take their limits and error messages from here."""

    beam: int = 5  # 1 is greedy
    n_best: int = 1  # hypotheses returned per sentence, best first
    # length penalty exponent (Wu et al., 2016); 1.5: Bible dev +0.3 BLEU / +0.8 chrF, bundled test unchanged
    # (docs/decoding.md, "Length penalty and coverage")
    alpha: float = 1.5
    max_len_ratio: float = 2.0  # longest output: ratio x source length + 10 pieces
    max_src_len: int = 400  # source pieces read (counting EOS); the rest is cut
    batch_tokens: int = 6000  # source tokens per hypothesis in a batch...
    batch_sentences: int = 0  # ...or, when above 0, this many sentences a batch
    # batches decoded at once; 0: on a Linux CPU one per torch thread, each in a process of its own;
    # two on other CPUs; one on GPU (decode_workers)
    inter_threads: int = 0
    # a batch scores only the ``shortlist`` likeliest translations of each of its source pieces and
    # the ``shortlist_frequent`` most frequent target pieces (the checkpoint's lexicon, shortlist.py);
    # 0: the whole vocabulary, as with a checkpoint that has no lexicon
    shortlist: int = 50
    shortlist_frequent: int = 300
    # no hypothesis repeats an n-gram of this many target pieces (search.repeat_bans; 3: loops on the Bible
    # verses stop, BLEU on the bundled test unchanged, docs/decoding.md, "Repetition"); 0: off
    no_repeat_ngram: int = 3
    # beam search: the weight (beta) of the coverage penalty in a finished hypothesis' score
    # (search.coverage_penalty, Wu et al., 2016); 0: off
    coverage: float = 0.0
    return_attention: bool = False
    # each line cut into phrases (at . ! ? ; and :, and a clause of over 24 words at its commas; "clauses": not at
    # commas; "sentences": at . ! ? only), decoded as one batch and joined by a space; "none": each line whole
    # (segment.py; docs/decoding.md, "Long lines", for why phrases)
    split: str = "phrases"
    # words the tokenizer cannot cover (UNK pieces) are carried into the output, decoded as a stand-in name
    # that comes back as the word, else put where attention says (stand_ins; docs/decoding.md, "Unknown words");
    # so are the names the vocabulary does not hold whole (names.py)
    copy_unknown: bool = True
    # (with copy_unknown) so are the numbers the vocabulary does not hold whole ("2019", "1.5", "555-1234"), which
    # the model would spell digit by digit and get wrong: decoded as a number it copies, then put back as written
    copy_numbers: bool = True
    # text typed casually (no capital letter, no final mark) is given them before decoding, and older Spanish
    # spelling ("fué", "á") the modern one (casual.py)
    restore_casual: bool = True
    # a word carried from the source is spelled in the letters of the training targets where dropping its
    # accents does it (Saúl -> Saul in English; names.TargetLetters): Bible dev +0.2 BLEU, docs/decoding.md,
    # "Unknown words"
    fold_accents: bool = True
    # draw each token from the model's distribution instead of searching (search.Sampler; docs/decoding.md,
    # "Sampling"): beam is then unused, and the n-best are n_best draws (not deduplicated), likeliest first
    sample: bool = False
    temperature: float = 1.0  # sampling: the logits divided by it; 0: the likeliest token (as greedy)
    top_k: int = 0  # sampling: only the k likeliest tokens; 0: all
    top_p: float = 1.0  # sampling: only the nucleus of this much probability (Holtzman et al., 2020); 1: all
    seed: int = 0  # sampling: with the source's pieces, seeds each sentence's draws (the same whatever its batch)
    # the start of every translation (target text, forced; its log-probability is in the score); a line with
    # a prefix is decoded whole (not split); "": none
    prefix: str = ""
    # source term -> target term pairs: a sentence holding a source term (whole words, any case) gets its target
    # term in the output (search.constrained_beam_search; glossary.py; docs/decoding.md, "Glossaries"); (): none
    glossary: Glossary = ()

    MAX_BEAM: ClassVar[int] = 64  # the widest beam, and so the most n-best, a decode may ask for
    ALPHA_RANGE: ClassVar[tuple[float, float]] = (0.0, 100.0)  # the length penalty exponent
    MAX_LEN_RATIO: ClassVar[float] = 100.0  # longest output per source piece (above 0)
    MAX_INTER_THREADS: ClassVar[int] = 64
    MAX_PREFIX: ClassVar[int] = 1000  # characters of a prefix
    BOUNDS: ClassVar[dict[str, Bound]] = {
        "beam": Bound(int, 1, MAX_BEAM),
        "n_best": Bound(int, 1, MAX_BEAM),
        "alpha": Bound(float, *ALPHA_RANGE),
        "max_len_ratio": Bound(float, 0, MAX_LEN_RATIO, low_open=True),
        "max_src_len": Bound(int, 1),
        "batch_tokens": Bound(int, 1),
        "batch_sentences": Bound(int, 0),
        "inter_threads": Bound(int, 0, MAX_INTER_THREADS),
        "shortlist": Bound(int, 0, TOP, note="the whole vocabulary"),  # TOP: what the lexicon keeps
        "shortlist_frequent": Bound(int, 0),
        "no_repeat_ngram": Bound(int, 0, 64, note="off"),
        "coverage": Bound(float, 0, 100, note="off"),
        "temperature": Bound(float, 0, 100, note="the likeliest token"),
        "top_k": Bound(int, 0),  # 0: off
        "top_p": Bound(float, 0, 1, low_open=True),
        "seed": Bound(int, 0),
    }

    def __post_init__(self):
        for name, bound in self.BOUNDS.items():
            object.__setattr__(self, name, bound.check(name, getattr(self, name)))  # 3 -> 3.0 for a float
        if self.n_best > self.beam and self.sample is False:  # sampling draws n_best, whatever the beam
            raise ConfigError(f"n_best ({self.n_best}) cannot exceed the beam size ({self.beam})")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if not isinstance(self.prefix, str) or len(self.prefix) > self.MAX_PREFIX:
            raise ConfigError(f"prefix must be text of at most {self.MAX_PREFIX} characters, not {self.prefix!r:.60}")
        object.__setattr__(self, "glossary", check_glossary(self.glossary))
        if self.glossary and self.sample:
            raise ConfigError("a glossary constrains the search; it cannot be used with sampling")
        for name in ("return_attention", "restore_casual", "copy_unknown", "copy_numbers", "fold_accents", "sample"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, not {getattr(self, name)!r}")

    @classmethod
    def check(cls, name: str, value: Any, label: str | None = None) -> int | float:
        """One field's ``value``, checked as ``__post_init__`` checks it, in its type; the error
        calls it ``label`` (a request's "beam", say) and gives the valid values."""
        return cls.BOUNDS[name].check(label or name, value)


@dataclass
class Translation:
    """One of a sentence's n-best translations."""

    text: str
    score: float
    tokens: list[int]
    attention: torch.Tensor | None = None  # (target pieces + EOS, source pieces + EOS)
    # the probability that it is acceptable (confidence.py), by the checkpoint's calibrator; None without one
    confidence: float | None = None
    missed: tuple[str, ...] = ()  # the glossary's target terms that the search could not place in it


@dataclass
class PairScore:
    """How likely the model finds a given translation: forced decoding of the target."""

    logprob: float  # summed log-probability of the target's pieces and EOS
    pieces: int  # target pieces, EOS included

    @property
    def per_piece(self) -> float:
        return self.logprob / max(1, self.pieces)


def restored(tokenizer: Tokenizer, pieces: list[str], options: DecodeOptions) -> list[str]:
    """The pieces as the model was trained on them (``casual.py``), unless ``options.restore_casual`` is off."""
    if not options.restore_casual:
        return pieces
    table, modern = recasing(tokenizer), modernising(tokenizer)
    return [restore(modernise(piece, modern), table) for piece in pieces]


def accented(tokenizer: Tokenizer, lines: Sequence[str], options: DecodeOptions,
             lexicon: Lexicon | None = None) -> list[str]:
    """Each line typed without accents with its accents (``casual.reaccent``; the whole line decides,
    before it is cut into sentences), unless ``options.restore_casual`` is off; ``lexicon``: the
    model's, whose ``accented`` words were counted on its training sources."""
    if not options.restore_casual:
        return list(lines)
    table = reaccenting(tokenizer, getattr(lexicon, "accented", None))
    return [reaccent(line, table) for line in lines]


def mended(pieces: list[str], parts: list[list[Translation]], kept: frozenset[str]) -> list[list[Translation]]:
    """A line's pieces' n-bests with the texts of each rank mended where a comma cut the line
    (``segment.mend``; only ``phrases`` cuts there, so other lines come back as they are)."""
    if not any(piece.endswith(",") for piece in pieces[:-1]):
        return parts
    out = [list(nbest) for nbest in parts]
    for rank in range(min(len(nbest) for nbest in parts)):
        texts = mend(pieces, [nbest[rank].text for nbest in parts], kept)
        for nbest, text in zip(out, texts):
            nbest[rank] = replace(nbest[rank], text=text)
    return out


def join(parts: list[list[Translation]], options: DecodeOptions) -> list[Translation]:
    """One line's n-best from its sentences' n-bests: the k-th joins the sentences' k-th texts with
    a space (and their pieces); its score is their summed log-probability, length-normalised over
    all their pieces as beam search normalises one; its attention is block-diagonal, one block a
    sentence (the sentences' EOS columns in the line's one EOS column)."""
    if len(parts) == 1:
        return parts[0]
    joined = []
    for rank in range(min(len(nbest) for nbest in parts)):
        chosen = [nbest[rank] for nbest in parts]
        lengths = [len(t.tokens) + 1 for t in chosen]  # with EOS
        if options.beam == 1 or options.sample:
            score = sum(t.score for t in chosen)
        else:
            logprob = sum(t.score * length_penalty(n, options.alpha) for t, n in zip(chosen, lengths))
            score = logprob / length_penalty(sum(lengths), options.alpha)
        attention = None
        if all(t.attention is not None for t in chosen):
            attention = _block_diagonal([t.attention for t in chosen])
        joined.append(Translation(" ".join(t.text for t in chosen if t.text), score,
                                  [i for t in chosen for i in t.tokens], attention,
                                  missed=tuple(term for t in chosen for term in t.missed)))
    return joined


def _block_diagonal(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Sentences' attention (target pieces + EOS, source pieces + EOS) as one line's: each
    sentence's pieces in a block of their own, every EOS column in the last, the last EOS row last."""
    rows = sum(b.size(0) - 1 for b in blocks) + 1
    cols = sum(b.size(1) - 1 for b in blocks) + 1
    out = blocks[0].new_zeros(rows, cols)
    row = col = 0
    for number, block in enumerate(blocks):
        take = block.size(0) - (number < len(blocks) - 1)  # the last keeps its EOS row
        out[row: row + take, col: col + block.size(1) - 1] = block[:take, :-1]
        out[row: row + take, -1] = block[:take, -1]
        row, col = row + take, col + block.size(1) - 1
    return out


# names that the bundled data's models carry into their translations as they are: an unknown word
# goes through the model as one of them (one that its sentence lacks) and comes back in its place
STAND_INS = ("Tom", "Mary", "John", "Alice")
# numbers that they copy as they are (in any sentence, as digits; "15" and "50" are sometimes written as words):
# a number they would spell digit by digit goes through as one of them
NUMBER_STAND_INS = ("30", "20", "40", "200")


class StandIn(NamedTuple):
    """An unknown word of a source line and what it is decoded as."""

    text: str  # the word as written
    name: str | None  # the stand-in name in its place; None: a symbol, left out, or a word kept as written
    first: int  # the source pieces of the line as decoded that stand for it (a symbol: the piece
    last: int  # before it, whose translation it follows; -1 where it opened the line)


def stand_ins(tokenizer: Tokenizer, line: str, names: bool = True,
              found: list[tuple[int, int, str]] | None = None) -> tuple[str, list[StandIn]]:
    """``line`` as decoded, and where each of its unknown words (``Tokenizer.src_unknown``) went: a
    word with letters or digits is replaced by a name from ``STAND_INS`` that the line lacks and
    the vocabulary has (while there are such), a copy mechanism for a model that has none, like
    Luong et al.'s (2015) unknown-word placeholders, with names the model already copies; a number
    (``names.NUMBER``) by one of ``NUMBER_STAND_INS`` that the line lacks and both vocabularies
    hold whole, else as a word; a symbol (an emoji, say) is left out, so that it does not take the
    place of a word in the translation. ``found``: the line's ``stand_in_words``, when the caller
    has them already."""
    free = iter([name for name in STAND_INS if not re.search(rf"\b{name}\b", line, re.IGNORECASE)
                 and UNK not in tokenizer.encode_src([name])[0]])
    free_numbers = iter([number for number in NUMBER_STAND_INS if not re.search(rf"\b{number}\b", line)
                         and tokenizer.src_holds_word(number) and tokenizer.tgt_holds_word(number)])
    named: dict[str, str | None] = {}  # a word met again keeps its name: the model may write it twice
    parts: list[str] = []
    places = []  # (text, name, where it went in the line as decoded: start, end; a symbol: after)
    at = 0
    for _, _, text in stand_in_words(tokenizer, line, names) if found is None else found:
        start = line.find(text, at)
        if any(c.isalnum() for c in text):
            parts.append(line[at:start])
            pool = free_numbers if NUMBER.fullmatch(text) else free
            name = named[text] if text in named else named.setdefault(text, next(pool, None) or next(free, None))
            begin = sum(map(len, parts))
            parts.append(name or text)
            places.append((text, name, begin, begin + len(name or text)))
        else:
            parts.append(line[at:start].rstrip())
            places.append((text, None, sum(map(len, parts)), None))
        at = start + len(text)
    decoded = "".join(parts) + line[at:]
    words = []
    for text, name, begin, end in places:
        if end is None:  # a symbol: after the piece before it
            before = len(decoded[:begin].rstrip()) - 1
            first = tokenizer.src_pieces_within(decoded, before, before + 1)[0] if before >= 0 else -1
            words.append(StandIn(text, None, first, first))
        else:
            words.append(StandIn(text, name, *tokenizer.src_pieces_within(decoded, begin, end)))
    return decoded, words


def carry_unknown(tokenizer: Tokenizer, hyp: Hypothesis, words: list[StandIn], src_len: int) -> str:
    """The text of ``hyp`` with the unknown source ``words`` in it: each in the place of its
    stand-in name; where the name did not come through, or there was none, where attention puts
    it (``with_unknown``); a symbol after the translation of what went before it."""
    text = tokenizer.decode_tgt([hyp.tokens])[0]
    through = [w for w in words if w.name and re.search(rf"\b{w.name}\b", text)]
    lost = [w for w in words if w not in through]
    if lost:
        symbols = {n for n, w in enumerate(lost) if not any(c.isalnum() for c in w.text)}
        text = with_unknown(tokenizer, hyp, [(w.first, w.last, w.text) for w in lost], src_len, symbols)
    for word in through:  # every time: no stand-in may be left in a translation
        text = re.sub(rf"\b{word.name}\b", lambda _, carried=word.text: carried, text)
    return text


def with_unknown(tokenizer: Tokenizer, hyp: Hypothesis, spans: list[tuple[int, int, str]], src_len: int,
                 insert_only: Collection[int] = ()) -> str:
    """The text of ``hyp`` with each unknown source word (``spans``: first and last source piece,
    text) carried into it through attention, as Luong et al. (2015, "Addressing the rare word
    problem in neural machine translation") copy a rare word to the output word aligned with it:
    the target word that attends most to the span's pieces is replaced by the span's text when it
    is UNK or attends most to the span itself (it is the model's rendering of the unknown word);
    else (and for the spans numbered in ``insert_only``) the text goes in after that word, before
    its punctuation; a span that starts at -1 goes first. hyp.attention: (target pieces + EOS,
    source pieces)."""
    words: list[list[str]] = []  # the target's words, as their pieces
    owner = []  # the word of each target piece
    for piece in tokenizer.tgt_pieces(hyp.tokens):
        if not words or piece.startswith(WORD_START):
            words.append([])
        words[-1].append(piece)
        owner.append(len(words) - 1)
    # each word as what comes before its first letter or digit, from there to its last, and the rest
    heads, cores, tails = [], [], []
    for pieces in words:
        alnum = [i for i, p in enumerate(pieces) if any(c.isalnum() for c in p)] or [len(pieces)]
        heads.append(pieces[: alnum[0]])
        cores.append(pieces[alnum[0]: alnum[-1] + 1])
        tails.append(pieces[alnum[-1] + 1:])
    weights = hyp.attention[: len(hyp.tokens), :src_len].float()  # (target pieces, source pieces)
    inserted: dict[int, list[str]] = {}  # texts to go in after a word's core (-1: before the first word)
    replaced: set[int] = set()
    for number, (first, last, text) in enumerate(spans):
        if last >= src_len - 1:  # cut off with the rest of a long source
            continue
        if not cores or first < 0:
            inserted.setdefault(-1, []).append(text)
            continue
        row = int(weights[:, first: last + 1].sum(1).argmax())
        word = owner[row]
        focused = first <= int(weights[row].argmax()) <= last
        unknown = any(tokenizer.tgt.piece_to_id(p) == UNK for p in words[word])
        if number not in insert_only and word not in replaced and cores[word] and (unknown or focused):
            cores[word] = [(WORD_START if cores[word][0].startswith(WORD_START) else "") + text]
            replaced.add(word)
        else:
            inserted.setdefault(word, []).append(text)
    out = ["".join(WORD_START + t for t in inserted.get(-1, []))]
    for word, (head, core, tail) in enumerate(zip(heads, cores, tails)):
        out.append("".join(head + core) + "".join(WORD_START + t for t in inserted.get(word, [])) + "".join(tail))
    return "".join(out).replace(WORD_START, " ").strip()


def _model_for(model, precision: str) -> tuple[Any, str, str | None]:
    """The model to decode with, by ``precision``, the precision it has, and a note when that is
    not what was asked for:

    - ``fp32``: the model itself.
    - ``bf16``: on a CPU that multiplies bf16 natively, a bf16 copy: its matrix products run on
      the bf16 units at half the memory traffic, and the rounding hardly moves BLEU. Casting once
      beats CPU autocast, which casts every weight again at every search step. oneDNN keeps
      compiled kernels per tensor shape, so memory grows with the variety of sentence lengths (up
      to ONEDNN_PRIMITIVE_CACHE_CAPACITY).
    - ``int8``: a dynamically quantised copy (``quantize.quantized_copy``), where this torch has
      the int8 kernels (torch is retiring ``torch.ops.quantized``); else fp32.
    - ``auto``: ``CPU_PRECISION`` on a CPU, falling back quietly where it is not to be had; the
      model itself elsewhere.

    On CUDA the model is used as it is and decodes under autocast (``amp``), or with ``fp32`` without
    (``cuda_autocast``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if isinstance(model, Ensemble):  # each model by itself: an int8 copy is made of one model
        chosen = [_model_for(member, precision) for member in model.models]
        return Ensemble([member for member, _, _ in chosen]), chosen[0][1], chosen[0][2]
    device = next(model.parameters()).device
    if precision == "auto":
        if device.type != "cpu":
            return model, "fp32", None
        chosen, precision, _ = _model_for(model, CPU_PRECISION)
        return chosen, precision, None  # a fallback from the default is no news to the user
    if precision == "fp32":
        return model, "fp32", None
    if device.type != "cpu":
        return model, "fp32", (f"--{precision} is for CPU decoding; on {device.type} the model decodes under "
                               f"its checkpoint's train.amp (--fp32: in full precision)")
    if precision == "int8":
        if not int8_available():
            return model, "fp32", ("this torch build lacks the int8 kernels (fbgemm, torch.ops.quantized); "
                                   "decoding in fp32")
        return quantized_copy(model), "int8", None
    if not cpu_has_bf16():
        return model, "fp32", "this CPU has no native bf16 arithmetic; decoding in fp32"
    return copy.deepcopy(model).to(torch.bfloat16).eval(), "bf16", None


def _restricted(model, shortlist: Shortlist | None, device: torch.device, dtype: torch.dtype | None
                ) -> tuple[OutputVocab | None, torch.Tensor | None]:
    """A batch's output layer over its sentences' shortlists, and which columns each sentence may
    produce (None where every sentence may produce them all, as one sentence alone may)."""
    if shortlist is None:
        return None, None
    with torch.no_grad(), autocast_for(device, dtype):
        vocab = model.output_vocab(shortlist.ids.to(device))
    return vocab, None if bool(shortlist.allowed.all()) else shortlist.allowed.to(device)


def _columns(vocab: OutputVocab, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` (any shape) as columns of ``vocab``; PAD's column for a token it lacks."""
    column = torch.searchsorted(vocab.ids, tokens).clamp_(max=vocab.ids.numel() - 1)
    return column.masked_fill_(vocab.ids[column] != tokens, PAD)


AUTOCAST_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cuda_autocast(device: torch.device, amp: str | bool, precision: str) -> tuple[torch.dtype | None, str, str | None]:
    """On CUDA: the autocast type to decode under (None: none), the precision that makes, and a
    note when it is not what the checkpoint trained in. ``fp32`` asked for: none. Else the
    checkpoint's ``train.amp`` (``runtime.amp_dtype``), except that a model trained in bf16 decodes
    in fp32 on a GPU without native bf16: fp32 holds every bf16 value, where fp16's range could
    overflow (and autocast to an emulated bf16 is slow)."""
    if precision == "fp32":
        return None, "fp32", None
    mode = {True: "auto", False: "off"}.get(amp, amp)
    if mode == "bf16" and not runtime.cuda_has_bf16(device):
        return None, "fp32", ("this checkpoint trained in bf16 (train.amp=bf16) and this GPU has no native bf16 "
                              "(compute capability below 8.0); decoding in fp32")
    dtype = runtime.amp_dtype(device, mode)
    return dtype, AUTOCAST_NAMES[dtype], None


class Workers(NamedTuple):
    """How ``Translator.translate_ids`` decodes its batches side by side."""

    count: int  # batches decoded at once
    processes: bool  # in forked processes of one thread each, else in threads sharing torch's threads


def can_fork(device: torch.device) -> bool:
    """Whether batches may be decoded in forked processes: on a Linux CPU, from a process that runs
    no other Python thread (a lock that another thread held at the fork would stay held in the
    child, as in a server) and is not a daemon process itself."""
    return (device.type == "cpu" and sys.platform.startswith("linux") and threading.active_count() == 1
            and not multiprocessing.current_process().daemon)


def decode_workers(device: torch.device, inter_threads: int, batches: int, fork: bool | None = None) -> Workers:
    """How many batches to decode at once, and how. ``inter_threads``, or with 0: one per torch
    thread on a CPU where ``can_fork`` (``fork`` overrides it), two on another CPU with at least two
    torch threads, one on CUDA.

    A search step is a chain of small operations, mostly too small to share out over threads, so
    several batches at once keep the cores busier than one batch on all of them (CTranslate2's
    inter_threads). In threads, Python's interpreter lock still runs the steps' Python one at a
    time; forked processes of one thread each do not share it. One thread each, because GNU
    OpenMP, which torch's CPU builds use, hangs in a forked child that starts a parallel region
    of more than one thread."""
    fork = can_fork(device) if fork is None else fork and device.type == "cpu"
    if inter_threads <= 0:
        threads = torch.get_num_threads()
        inter_threads = 1 if device.type != "cpu" else threads if fork else min(2, threads)
    count = max(1, min(inter_threads, batches))
    return Workers(count, fork and count > 1)


def decode_batches(src: Encoded, options: DecodeOptions) -> list[np.ndarray]:
    """The batches ``Translator.translate_ids`` decodes ``src`` in: indices in length order,
    ``options.batch_sentences`` a batch, or up to ``options.batch_tokens`` source tokens per
    hypothesis."""
    rows = options.n_best if options.sample else options.beam  # a sentence's rows in the search
    lengths = np.minimum(src.lengths + 1, options.max_src_len) * rows
    if options.batch_sentences > 0:
        order = np.argsort(lengths, kind="stable")
        step = options.batch_sentences
        return [order[i: i + step] for i in range(0, len(order), step)]
    return token_batches(lengths, options.batch_tokens * rows)


def _in_order(pool: Executor, fn: Callable, items: Sequence, workers: int) -> Iterator:
    """The results of ``pool`` running fn(item) for every item, in order, with one item queued
    beyond the ``workers`` running ones, so that no worker waits."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _in_parallel(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """Yields fn(item) for every item, in order, running ``workers`` at a time on threads that
    share torch's intra-op threads out between them (one worker: in this thread)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    total = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(max(1, total // workers),))
    try:
        yield from _in_order(pool, fn, items, workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(total)  # the workers' setting is also torch's default for new threads


def _own_attention(hyp: Hypothesis) -> Hypothesis:
    """``hyp`` with its attention copied out of the search's tensor for the whole batch, of which
    it is a view: pickled on its way out of a decoding process, a view takes its whole storage
    along (1.6 GB for a batch of 136 Bible verses at beam 5, against 0.6 MB copied), and kept, it
    keeps that storage alive."""
    if hyp.attention is None:
        return hyp
    return replace(hyp, attention=hyp.attention.clone())


_WORK: Callable | None = None  # in a decoding process: what it runs (``_in_processes``)


def _start_process(fn: Callable) -> None:
    global _WORK
    _WORK = fn
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _run_in_process(item) -> bytes:
    """fn(item) in a decoding process, pickled here with the plain pickler: the one that
    ``multiprocessing`` uses, as torch sets it up, would send tensors through shared memory."""
    return pickle.dumps(_WORK(item))


def _in_processes(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """``_in_parallel`` in ``workers`` forked processes of one thread each: they inherit the model
    and ``fn`` as they are (nothing is pickled but the items and the results) and leave when done."""
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_process, initargs=(fn,))
    try:
        for result in _in_order(pool, _run_in_process, items, workers):
            yield pickle.loads(result)
    except BrokenProcessPool:
        raise UserError("a decoding process ended without a result (out of memory?); decode with "
                        "--inter-threads 1, or fewer, shorter lines at a time") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stand_ins_for(config: Config) -> bool:
    """Whether a model trained by ``config`` decodes unseen names as stand-ins: not once it was
    fine-tuned (``train.init_from``) with its source's tokenizer, which was fitted on other data
    than its last (``train.init_vocab=adapt`` fits a new one on it)."""
    return config.train.init_from is None or config.train.init_vocab == "adapt"


class Translator:
    """Translates lines with one model, tokenizer and set of default ``DecodeOptions``.

    ``precision`` picks the model to decode with on CPU (fp32: the model itself, which is put in
    eval mode while decoding and given back as it was; bf16 or int8: a copy); ``self.precision``
    is what it got, and ``note`` says why when that differs. ``amp`` is the checkpoint's
    ``train.amp``: on CUDA it decodes under bf16/fp16 autocast."""

    def __init__(self, model, tokenizer: Tokenizer, options: DecodeOptions = DecodeOptions(),
                 precision: str = "fp32", amp: str | bool = "auto", lexicon: Lexicon | None = None,
                 stand_in_names: bool = True):
        self.model, self.precision, self.note = _model_for(model, precision)
        self.tokenizer, self.options, self.amp = tokenizer, options, amp
        self.lexicon = lexicon  # for shortlists; None: the whole vocabulary is always scored
        self.phrase_words = max(PHRASE_WORDS, lexicon.source_words if lexicon else 0)  # whole clauses (phrases)
        # the letters of the training targets (fold_accents); None: not known, words keep their spelling
        self.letters = TargetLetters.of_counts(tokenizer, lexicon.target_counts) if lexicon else None
        param = next(self.model.parameters())
        self.device = param.device
        # autocast: on CUDA, the checkpoint's AMP unless fp32 is asked for (``cuda_autocast``); on CPU,
        # the type of a copy already cast down (autocast then keeps softmax and the like in fp32), else none
        if self.device.type == "cuda":
            self.dtype, self.precision, note = cuda_autocast(self.device, amp, precision)
            self.note = self.note or note
        else:
            self.dtype = None if param.dtype == torch.float32 else param.dtype
        self.config: Config | None = None  # set by ``load``
        self.progress: dict[str, Any] = {}  # the checkpoint's training progress, set by ``load``
        # names the vocabulary does not hold whole are decoded as stand-ins (names.py): a name
        # the model never learned, where the tokenizer was fitted on the model's own training
        # data; not for a fine-tuned model, which has learned its new data's names
        # (``stand_ins_for``)
        self.stand_in_names = stand_in_names
        self.calibrator: Calibrator | None = None  # the checkpoint's, set by ``load``: each translation's confidence

    @classmethod
    def load(cls, checkpoint: str | Path, options: DecodeOptions = DecodeOptions(), precision: str = "auto",
             device: torch.device | str | None = None, ensemble: Sequence[str | Path] = (),
             calibrated: bool = True) -> Translator:
        """A checkpoint (file, run directory or exported folder) ready to decode on ``device`` (a
        torch device, or auto, cpu or cuda as ``--device`` takes them); keeps its ``config``,
        training ``progress`` and lexicon (checked against the vocabulary before any id of it can
        index the output layer), its confidence calibrator (not with ``calibrated`` False: to fit a new
        one), and lets go of the rest of the payload (a mapped file)."""
        if not isinstance(device, torch.device):
            device = select_device(device or "auto", "--device ")
        model, tokenizer, config, payload = load_model(checkpoint, device)
        progress = payload.get("progress", {})
        lexicon = Lexicon.of_checkpoint(payload, (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size), str(checkpoint))
        # calibrated on this model's own scores: an ensemble's are others, so it decodes with no confidence
        calibrator = None if ensemble or not calibrated else Calibrator.of_payload(payload, str(checkpoint))
        del payload
        configs = [config]
        if ensemble:  # the models of ``ensemble`` decoded with it as one (ensemble.py); ``config`` stays the first's
            model, lexicon, configs = join_models(checkpoint, tokenizer.fingerprint, model, lexicon, config, ensemble,
                                                  device)
        translator = cls(model, tokenizer, options, precision, amp=config.train.amp, lexicon=lexicon,
                         stand_in_names=all(map(stand_ins_for, configs)))
        translator.config, translator.progress, translator.calibrator = config, progress, calibrator
        return translator

    def translate(self, lines: Sequence[str], options: DecodeOptions | None = None,
                  on_truncate: Callable[[int], None] | None = None,
                  on_progress: Callable[[int], None] | None = None,
                  prefixes: Sequence[str] | None = None,
                  glossaries: Sequence[Glossary] | None = None) -> list[list[Translation]]:
        """The n-best translations of ``lines``, in input order; empty lines give empty translations.
        ``prefixes``: the start of each line's translation (``options.prefix`` for every line where
        None); a line with one is decoded whole. ``glossaries``: each line's (``options.glossary``
        for every line where None).
        Each line is cut into sentences (``options.split``, segment.py); the sentences of all the
        lines are decoded as one batch, and a line's translation is theirs joined (``join``).
        ``on_truncate`` hears how many lines were longer than ``max_src_len`` (and cut);
        ``on_progress`` hears of each line done, as batches finish (for a progress bar)."""
        options = options or self.options
        prefixes = [options.prefix] * len(lines) if prefixes is None else list(prefixes)
        for prefix in set(prefixes):
            replace(options, prefix=prefix)  # checked as an option is
        segments = [segment(line, "none" if prefix else options.split, self.phrase_words)
                    for line, prefix in zip(accented(self.tokenizer, lines, options, self.lexicon), prefixes)]
        owner = [index for index, parts in enumerate(segments) for _ in parts.pieces]
        left = [len(parts.pieces) for parts in segments]
        if on_progress is not None and left.count(0):
            on_progress(left.count(0))

        def piece_done(piece: int) -> None:
            left[owner[piece]] -= 1
            if on_progress is not None and not left[owner[piece]]:
                on_progress(1)

        pieces = [piece for parts in segments for piece in parts.pieces]
        starts = [prefixes[line] for line in owner]  # a line with a prefix is one piece
        books = [options.glossary] * len(lines) if glossaries is None else [check_glossary(g) for g in glossaries]
        terms = [matches(books[line], piece) for piece, line in zip(pieces, owner)] if any(books) else None
        translated, cut = self._translate_pieces(pieces, options, piece_done, starts, terms)
        if on_truncate is not None and cut:
            on_truncate(len({owner[piece] for piece in cut}))
        out: list[list[Translation]] = []
        start = 0
        for parts in segments:
            count = len(parts.pieces)
            line = mended(parts.pieces, translated[start: start + count], kept_capitals(self.tokenizer))
            out.append(join(line, options) if count else [Translation("", 0.0, [], None)])
            start += count
        attach(self, lines, out, options)
        _report_missed(lines, out)
        return out

    def source_pieces(self, line: str, options: DecodeOptions | None = None) -> list[str]:
        """The source pieces that ``line`` is decoded as, in order (the columns of its attention):
        its clauses' pieces, restored (``restore_casual``) and with stand-ins for unknown words."""
        options = options or self.options
        line = accented(self.tokenizer, [line], options, self.lexicon)[0]
        parts = restored(self.tokenizer, segment(line, options.split, self.phrase_words).pieces, options)
        if options.copy_unknown:
            parts = [self._stand_ins(part, options.copy_numbers)[0] for part in parts]
        return [piece for part in parts for piece in self.tokenizer.src_pieces(part)]

    def _stand_ins(self, piece: str, numbers: bool = True) -> tuple[str, list[StandIn]]:
        """``piece`` as decoded, with its stand-ins (``stand_ins``); as it is when it needs none."""
        found = stand_in_words(self.tokenizer, piece, self.stand_in_names, numbers)
        return stand_ins(self.tokenizer, piece, found=found) if found else (piece, [])

    def _translate_pieces(self, pieces: list[str], options: DecodeOptions, done: Callable[[int], None],
                          prefixes: list[str] | None = None,
                          terms: list[Glossary] | None = None) -> tuple[list[list[Translation]], list[int]]:
        """The n-best translations of ``pieces`` (sentences, or whole lines), and the pieces cut
        to ``max_src_len``. Pieces with unknown words (``copy_unknown``) are decoded with their
        attention, so that the words can be carried into the output; the others as asked.
        ``terms``: each piece's glossary entries, whose target terms its output must hold."""
        pieces = restored(self.tokenizer, pieces, options)
        encoded = self.tokenizer.encode_src(pieces)
        cut = [i for i, ids in enumerate(encoded) if len(ids) + 1 > options.max_src_len]
        unknown = {}
        if options.copy_unknown:
            decoded = {i: self._stand_ins(piece, options.copy_numbers) for i, piece in enumerate(pieces)}
            unknown = {i: found for i, found in decoded.items() if found[1]}
        for i, (line, _) in unknown.items():
            encoded[i] = self.tokenizer.encode_src([line])[0]
        plain = sorted(set(range(len(pieces))) - set(unknown))
        starts = self.tokenizer.encode_tgt(prefixes) if prefixes and any(prefixes) else None
        wanted = _constraints(self.tokenizer, terms)
        out: list[list[Translation]] = [[] for _ in pieces]
        lost = 0  # pieces without a hypothesis of finite score
        for group, group_options in ((plain, options), (sorted(unknown), replace(options, return_attention=True))):
            if not group:
                continue
            group_starts = None if starts is None else [starts[i] for i in group]
            for index, hyps in self.translate_ids(Encoded([encoded[i] for i in group]), group_options, group_starts,
                                                  None if wanted is None else [wanted[i] for i in group]):
                piece = group[index]
                src_len = min(len(encoded[piece]) + 1, options.max_src_len)
                if not hyps:  # every score non-finite: an empty translation, never an empty n-best
                    lost += 1
                    out[piece] = [Translation("", float("-inf"), [],
                                              torch.zeros(1, src_len) if options.return_attention else None)]
                    done(piece)
                    continue
                if piece in unknown:
                    texts = [carry_unknown(self.tokenizer, h, unknown[piece][1], src_len) for h in hyps]
                else:
                    texts = self.tokenizer.decode_tgt([h.tokens for h in hyps])
                if options.fold_accents and self.letters is not None:
                    texts = [self.letters.spell(text, pieces[piece], _kept(prefixes, terms, piece)) for text in texts]
                out[piece] = [Translation(text, h.score, h.tokens,
                                          h.attention[:, :src_len] if options.return_attention else None,
                                          missed=_missed(h, wanted, terms, piece))
                              for text, h in zip(texts, hyps)]
                done(piece)
        if lost:
            logger.warning(f"{lost} sentence(s) got no translation with a finite score (a numeric overflow, as "
                           f"fp16 can give); left empty")
        return out, cut

    def stream(self, lines: Iterable[str], chunk_lines: int = 2000, options: DecodeOptions | None = None,
               on_truncate: Callable[[int], None] | None = None,
               on_progress: Callable[[int], None] | None = None,
               prefixes: Iterable[str] | None = None) -> Iterator[list[Translation]]:
        """Translates a stream of lines chunk by chunk and yields n-best lists in input order, so
        memory is bounded by the chunk, not the input. ``prefixes``: each line's (``translate``),
        read alongside the lines."""
        chunk: list[str] = []
        starts: list[str] | None = None if prefixes is None else []
        for line, prefix in zip(lines, prefixes) if prefixes is not None else ((line, "") for line in lines):
            chunk.append(line)
            if starts is not None:
                starts.append(prefix)
            if len(chunk) >= chunk_lines:
                yield from self.translate(chunk, options, on_truncate, on_progress, starts)
                chunk, starts = [], None if starts is None else []
        if chunk:
            yield from self.translate(chunk, options, on_truncate, on_progress, starts)

    def translate_ids(self, src: Encoded, options: DecodeOptions | None = None,
                      prefixes: Sequence[Sequence[int]] | None = None,
                      constraints: Sequence[list[list[int]]] | None = None) -> Iterator[tuple[int, list[Hypothesis]]]:
        """Yields (index, n-best) for every encoded source sentence; batches go in length order,
        for speed, ``decode_workers`` of them at once. ``prefixes``: the target ids each sentence's
        output starts with (None: none); ``constraints``: the target-id lists each must hold."""
        options = options or self.options
        batches = decode_batches(src, options)

        def decode(indices) -> list[tuple[int, list[Hypothesis]]]:
            return [(index, [_own_attention(h) for h in hyps])
                    for index, hyps in zip(indices, self._search(src, indices, options, prefixes, constraints))]

        workers = decode_workers(self.device, options.inter_threads, len(batches))
        was_training = self.model.training
        self.model.eval()
        try:
            run = _in_processes if workers.processes else _in_parallel
            # longest first, so that no worker is left with a long batch after the others are done
            for done in run(decode, batches[::-1] if workers.count > 1 else batches, workers.count):
                yield from done
        finally:
            self.model.train(was_training)

    def score_pairs(self, sources: Sequence[str], targets: Sequence[str],
                    options: DecodeOptions | None = None) -> list[PairScore]:
        """The model's log-probability of each target given its source (forced decoding through
        ``decode_step``, so every precision and decoder scores as it decodes), in input order;
        batched by ``options.batch_tokens``, in length order. Used to rank or filter pairs. With a
        shortlist (``options.shortlist`` and a lexicon), over each source's shortlist, as decoding
        scores a hypothesis: a target piece outside it scores -inf, since decoding cannot produce it."""
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        options = options or self.options
        src = Encoded(self.tokenizer.encode_src(sources))
        tgt = Encoded(self.tokenizer.encode_tgt(targets))
        lengths = np.maximum(np.minimum(src.lengths + 1, options.max_src_len), tgt.lengths + 1)
        scores: list[PairScore | None] = [None] * len(sources)
        was_training = self.model.training
        self.model.eval()
        try:
            for indices in token_batches(lengths, options.batch_tokens):
                batch = collate(src, tgt, indices, max_src_len=options.max_src_len)
                shortlist = None
                if self.lexicon is not None and options.shortlist > 0:
                    shortlist = self.lexicon.shortlist(batch.src, options.shortlist, options.shortlist_frequent)
                for index, logprob, pieces in zip(indices, *_forced(self, batch.to(self.device), shortlist)):
                    scores[index] = PairScore(logprob, pieces)
        finally:
            self.model.train(was_training)
        return scores

    def _search(self, src: Encoded, indices, options: DecodeOptions,
                prefixes: Sequence[Sequence[int]] | None = None,
                constraints: Sequence[list[list[int]]] | None = None) -> list[list[Hypothesis]]:
        """One batch of ``src`` decoded (``search_batch``; a method, so that it can be replaced)."""
        return search_batch(self, src, indices, options, prefixes, constraints)


def search_batch(translator: Translator, src: Encoded, indices, options: DecodeOptions,
                 prefixes: Sequence[Sequence[int]] | None = None,
                 constraints: Sequence[list[list[int]]] | None = None) -> list[list[Hypothesis]]:
    """One batch of ``src``: encode, then greedy or beam search, or sampling; each output
    starting with its ``prefixes`` (target ids) and holding its ``constraints`` (constrained
    beam search), whose pieces its shortlist then holds."""
    model = translator.model
    batch = collate(src, None, indices, max_src_len=options.max_src_len)
    prefix = None if prefixes is None else _prefix_tensor([prefixes[i] for i in indices])
    shortlist = None
    if translator.lexicon is not None and options.shortlist > 0:
        shortlist = translator.lexicon.shortlist(batch.src, options.shortlist, options.shortlist_frequent)
        shortlist = _with_pieces(shortlist, prefix)
        if constraints is not None:
            shortlist = _with_pieces(shortlist, _prefix_tensor([[i for c in constraints[j] for i in c]
                                                                for j in indices]))
    batch = batch.to(translator.device)
    vocab, allowed = _restricted(translator.model, shortlist, translator.device, translator.dtype)
    with torch.no_grad(), autocast_for(translator.device, translator.dtype):  # autocast is per thread
        memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
        limits = max_lengths(batch.src_lengths, options.max_len_ratio)
        if prefix is not None:  # the continuation keeps the room it would have without one
            prefix = prefix.to(translator.device)
            limits = limits + (prefix != PAD).sum(1).to(limits.device)
        if constraints is not None and any(constraints[i] for i in indices):
            return _constrained(model, memory, state, limits, options, vocab, allowed, prefix,
                                [constraints[i] for i in indices], word_continuations(translator.tokenizer))
        if options.sample:
            return _sampled(model, memory, state, limits, options, vocab, allowed, prefix,
                            [src[i] for i in indices])
        if options.beam == 1:
            return greedy(model, memory, state, limits, options.return_attention, vocab, options.no_repeat_ngram,
                          allowed=allowed, prefix=prefix)
        return beam_search(model, memory, state, options.beam, limits, options.alpha, options.n_best,
                           options.return_attention, vocab=vocab, no_repeat_ngram=options.no_repeat_ngram,
                           coverage=options.coverage, allowed=allowed, prefix=prefix)


def _forced(translator: Translator, batch, shortlist: Shortlist | None) -> tuple[list[float], list[int]]:
    """Each pair's summed log-probability of its target, forced, and its target pieces."""
    model = translator.model
    vocab, allowed = _restricted(translator.model, shortlist, translator.device, translator.dtype)
    gold_all = batch.tgt_out if vocab is None else _columns(vocab, batch.tgt_out)  # (batch, tgt_len)
    with torch.no_grad(), autocast_for(translator.device, translator.dtype):
        memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
        total = torch.zeros(batch.tgt_in.size(0), device=translator.device)  # (batch,)
        for t in range(batch.tgt_in.size(1)):
            logits, state, _ = model.decode_step(batch.tgt_in[:, t], memory, state, vocab)  # (batch, columns)
            logits = logits.float()
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            logp = logits.log_softmax(-1).gather(1, gold_all[:, t].unsqueeze(1)).squeeze(1)  # (batch,)
            logp = logp.masked_fill(gold_all[:, t] == PAD, float("-inf"))  # outside the shortlist
            total += logp.masked_fill(batch.tgt_out[:, t] == PAD, 0.0)
    return total.tolist(), (batch.tgt_out != PAD).sum(1).tolist()


def _prefix_tensor(prefixes: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """A batch's prefixes as (batch, longest) target ids, PAD past each; None where all are empty."""
    longest = max((len(ids) for ids in prefixes), default=0)
    if longest == 0:
        return None
    out = torch.full((len(prefixes), longest), PAD, dtype=torch.long)
    for row, ids in enumerate(prefixes):
        out[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return out


def _with_pieces(shortlist: Shortlist, prefix: torch.Tensor | None) -> Shortlist:
    """``shortlist`` with each sentence's given pieces (its prefix's, its glossary terms') among the
    columns it may produce: a forced piece is scored against its shortlist's others, as any piece
    it produces. prefix: (batch, p) target ids, PAD past each sentence's."""
    if prefix is None:
        return shortlist
    pieces = prefix[prefix != PAD].unique()  # (m,) sorted
    own = (prefix.unsqueeze(2) == pieces).any(1)  # (batch, m) each sentence's own pieces
    return union([shortlist, Shortlist(pieces, own)])


def _constrained(model, memory, state, limits: torch.Tensor, options: DecodeOptions, vocab: OutputVocab | None,
                 allowed: torch.Tensor | None, prefix: torch.Tensor | None,
                 constraints: list[list[list[int]]], joins: torch.Tensor) -> list[list[Hypothesis]]:
    """Constrained beam search over a batch, each sentence given room for its constraints' pieces
    on top of its length limit, a term kept a word of its own (``joins``: ``word_continuations``);
    a beam of 1 sums log-probabilities, as greedy does."""
    room = torch.tensor([sum(map(len, cons)) for cons in constraints], device=limits.device)
    return constrained_beam_search(model, memory, state, options.beam, limits + room, constraints,
                                   options.alpha if options.beam > 1 else 0.0, options.n_best,
                                   options.return_attention, vocab, options.no_repeat_ngram, allowed, prefix, joins)


_CONTINUATIONS: dict[str, torch.Tensor] = {}  # by the tokenizer's fingerprint


def word_continuations(tokenizer: Tokenizer) -> torch.Tensor:
    """(target vocabulary,) bool: the target pieces that continue the word before them (a letter or
    digit first, no word-start mark), once per tokenizer."""
    key = tokenizer.fingerprint
    if key not in _CONTINUATIONS:
        pieces = [tokenizer.tgt.id_to_piece(i) for i in range(tokenizer.tgt_vocab_size)]
        _CONTINUATIONS[key] = torch.tensor([i >= SPECIAL and p[:1].isalnum() for i, p in enumerate(pieces)])
    return _CONTINUATIONS[key]


def _constraints(tokenizer: Tokenizer, terms: list[Glossary] | None) -> list[list[list[int]]] | None:
    """Each piece's glossary target terms as target ids (None without a glossary)."""
    if terms is None:
        return None
    return [tokenizer.encode_tgt([target for _, target in found]) if found else [] for found in terms]


def _kept(prefixes: list[str] | None, terms: list[Glossary] | None, piece: int) -> list[str]:
    """The words that piece ``piece``'s translation has as it was given: its prefix's and its
    glossary terms' (``fold_accents`` leaves them as they are)."""
    given = [prefixes[piece] if prefixes else ""] + [target for _, target in (terms[piece] if terms else ())]
    return re.findall(r"\w+", " ".join(given))


def _missed(hyp: Hypothesis, wanted: list[list[list[int]]] | None, terms: list[Glossary] | None,
            piece: int) -> tuple[str, ...]:
    """The target terms of piece ``piece``'s glossary entries that ``hyp`` does not hold."""
    if wanted is None or not wanted[piece]:
        return ()
    targets = [target for _, target in terms[piece]]
    return tuple(targets[i] for i in missing_constraints(hyp.tokens, wanted[piece]))


def _report_missed(lines: Sequence[str], out: list[list[Translation]]) -> None:
    """A warning for each line whose best translation lacks some of its glossary's target terms."""
    for line, nbest in zip(lines, out):
        if nbest and nbest[0].missed:
            logger.warning(f"glossary: could not place {', '.join(map(repr, nbest[0].missed))} in the translation "
                           f"of {line!r:.80}")


def _sampled(model, memory, state, limits: torch.Tensor, options: DecodeOptions, vocab: OutputVocab | None,
             allowed: torch.Tensor | None, prefix: torch.Tensor | None, sources: list) -> list[list[Hypothesis]]:
    """``options.n_best`` draws per sentence (greedy with a ``Sampler``), likeliest first, not
    deduplicated. Draw d of a sentence has a random stream of its own, seeded by ``options.seed``,
    d and the sentence's source ids: the same sentence draws the same, whatever its batch or place."""
    n = options.n_best
    batch = memory.mask.size(0)
    rows = torch.arange(batch, device=memory.mask.device).repeat_interleave(n)  # (batch*n,)
    draws = [np.random.default_rng([options.seed, draw, len(ids), *(int(i) for i in ids)])
             for ids in sources for draw in range(n)]
    sampler = Sampler(draws, options.temperature, options.top_k, options.top_p)
    found = greedy(model, memory.select(rows), state.select(rows), limits[rows.to(limits.device)],
                   options.return_attention, vocab, options.no_repeat_ngram,
                   allowed=None if allowed is None else allowed[rows], prefix=None if prefix is None else prefix[rows],
                   sampler=sampler)
    return [sorted((h for hyps in found[b * n: (b + 1) * n] for h in hyps), key=lambda h: -h.score)
            for b in range(batch)]

