"""An HTTP service over a loaded model.

- ``GET /``: a page to translate in a browser (no external resources: it is all in
  ``page.html``), with the score and the attention of the last sentence;
- ``POST /translate``: this project's JSON API, ``{"sentences": [...], "beam": 5}``, and the
  LibreTranslate API on the same path (a body with ``q``, ``source``, ``target``, ``format``,
  JSON or form-encoded, answered with ``translatedText``), so LibreTranslate clients work
  unchanged; ``GET /languages`` (LibreTranslate's), ``GET /health``.

Request threads do not run the model: they queue their sentences, and the ``RequestBatcher``'s
one worker thread takes whatever has queued within ``max_wait_ms`` (up to ``max_batch``
sentences) and translates it with a ``Translator`` in one batched search per set of decoding
options, so concurrent clients share batches instead of queueing behind each other.

A ``TranslationService`` answers parsed requests (method, path, headers, body) with
``Response`` values; the ``Handler`` only moves bytes between a connection and it. Connections are
HTTP/1.1 with keep-alive. Safe to expose: a request's decoding cost is bounded (``request_cost``)
and so is its wait (``deadline``); the server holds at most ``max_connections`` connections, and
a client has ``request_timeout`` seconds to send each request whole, however slowly it trickles;
a body the service did not read, or whose end is ambiguous, closes the connection (so it is never
taken for the next request); ``Access`` holds the API keys and the requests-per-minute limit.
Nothing sent back names the server's files or its exceptions; a client that goes away early is
forgotten without a trace in the log. ``access_log`` gets one line per request.
"""

from __future__ import annotations

import io
import json
import logging
import math
import queue
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch

from .errors import ConfigError, RequestError, ServiceError, UserError
from .glossary import Glossary, check_glossary
from .search import max_lengths
from .segment import SPLITS, segment
from .translator import DecodeOptions, Translation, Translator

logger = logging.getLogger(__name__)

# named as DecodeOptions names them
OPTION_FIELDS = ("beam", "n_best", "alpha", "max_len_ratio", "no_repeat_ngram", "coverage", "temperature", "top_k",
                 "top_p", "seed")
REQUEST_FIELDS = ("sentences", *OPTION_FIELDS, "sample", "prefix", "split", "scores", "attention", "api_key",
                  "glossary")
# extensions of LibreTranslate's request (docs/serving.md): a glossary, a prefix and sampling, named as in this API
LIBRETRANSLATE_EXTENSIONS = ("glossary", "prefix", "sample", "temperature", "top_k", "top_p", "seed")
LIBRETRANSLATE_FIELDS = ("q", "source", "target", "format", "alternatives", "api_key", *LIBRETRANSLATE_EXTENSIONS)
# ISO 639-3 codes (as Tatoeba and this project's defaults name languages) and their ISO 639-1
# codes, which LibreTranslate clients send; a language outside this table is known by its own name
ISO_639_1 = {"spa": "es", "eng": "en", "fra": "fr", "deu": "de", "ita": "it", "por": "pt", "nld": "nl",
             "rus": "ru", "pol": "pl", "tur": "tr", "ara": "ar", "zho": "zh", "cmn": "zh", "jpn": "ja",
             "kor": "ko", "ukr": "uk", "ces": "cs", "swe": "sv", "fin": "fi", "dan": "da", "ell": "el",
             "hun": "hu", "ron": "ro", "cat": "ca", "epo": "eo", "heb": "he", "hin": "hi", "vie": "vi"}
LANGUAGE_NAMES = {"es": "Spanish", "en": "English", "fr": "French", "de": "German", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "pl": "Polish", "tr": "Turkish"}
# a request's decoding cost (``request_cost``) that the server takes by default: 40 MB of attention
# weights in fp32 (beam 5 and 256 sentences of 30 pieces cost 2.9M; beam 64 and 64 of 400 pieces, 1.3G)
MAX_COST = 10_000_000
DEADLINE = 60.0  # seconds a request may wait for its translation by default
MAX_CONNECTIONS = 100  # connections held at once by default
MAX_JSON_DEPTH = 32  # arrays and objects inside each other in a request body; the APIs need 3
# a JSON string (closed, or running to the end of an invalid body) or a bracket; possessive, so
# a body that is not JSON is still read once through
_JSON_TOKEN = re.compile(r'(?s)"(?:[^"\\]|\\.)*+"?|([\[{])|[\]}]')


class Busy(RequestError):
    """The server cannot take a request now (429, 503): the answer says when to try again."""

    def __init__(self, status: int, message: str, retry_after: float):
        super().__init__(status, message)
        self.retry_after = max(1, math.ceil(retry_after))  # whole seconds, as Retry-After takes them


class _Abandoned(Exception):
    """Every client of a running search has stopped waiting: the search stops between batches."""


@dataclass
class Job:
    sentences: list[str]
    options: DecodeOptions
    future: Future = field(default_factory=Future)
    abandoned: bool = False  # its client stopped waiting (past its deadline): nobody reads the result


class RequestBatcher:
    """Queues the jobs of concurrent requests and has one worker thread translate them together
    with a ``Translator``, one search per set of options. A job whose client stopped waiting is
    skipped while queued, and a search whose every client stopped waiting ends at its next batch,
    so that no request holds the worker past its deadline for long."""

    def __init__(self, translator: Translator, max_batch: int = 64, max_wait_ms: float = 10.0):
        self.translator = translator
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.searches = 0  # batched searches run (fewer than requests when batching works)
        self.worker = threading.Thread(target=self._run, name="request-batcher", daemon=True)
        self.worker.start()

    def translate(self, sentences: list[str], options: DecodeOptions,
                  timeout: float | None = None) -> list[list[Translation]]:
        """Waits for the n-best translations of ``sentences``, decoded with ``options``; raises
        Busy (503) after ``timeout`` seconds (None: no limit), and the job is dropped."""
        job = Job(sentences, options)
        self.jobs.put(job)
        try:
            return job.future.result(timeout=timeout)
        except TimeoutError:
            job.abandoned = True
            job.future.cancel()  # while still queued; a running one stops at its next batch (_search)
            raise Busy(503, f"the translation did not finish within {timeout:g} s (the server is busy); "
                            f"try again later, or send fewer or shorter sentences or a smaller beam",
                       retry_after=5) from None

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():  # its client stopped waiting
                continue
            pending, size = [job], len(job.sentences)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                try:
                    more = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                if more.future.set_running_or_notify_cancel():
                    pending.append(more)
                    size += len(more.sentences)
            by_options: dict[DecodeOptions, list[Job]] = {}
            for item in pending:
                by_options.setdefault(item.options, []).append(item)
            for options, group in by_options.items():
                self._search(group, options)

    def _search(self, group: list[Job], options: DecodeOptions) -> None:
        group = [job for job in group if not job.abandoned]
        if not group:
            return

        def still_wanted(_lines_done: int) -> None:  # hears of lines as their batches finish
            if all(job.abandoned for job in group):
                raise _Abandoned

        lines = [s for job in group for s in job.sentences]
        try:
            results = self.translator.translate(lines, options, on_progress=still_wanted)
            self.searches += 1
        except Exception as exc:  # the clients learn about it (if any still wait); the server keeps serving
            for job in group:
                job.future.set_exception(exc)
            return
        start = 0
        for job in group:
            job.future.set_result(results[start: start + len(job.sentences)])
            start += len(job.sentences)


def request_cost(translator: Translator, sentences: list[str], options: DecodeOptions) -> int:
    """What decoding ``sentences`` with ``options`` costs, as the search will cut them
    (``options.split``): beam x output length limit x source length (in pieces, with EOS, as
    ``search.max_lengths`` and ``max_src_len`` bound them), summed over the pieces. It is the number
    of attention weights the search may hold for them (4 bytes each in fp32), and its time grows
    with it; the server refuses a request that costs more than its ``max_cost``."""
    parts = [part for line in sentences for part in segment(line, options.split, translator.phrase_words).pieces]
    if not parts:
        return 0
    src = torch.tensor([min(len(ids) + 1, options.max_src_len) for ids in translator.tokenizer.encode_src(parts)])
    out = max_lengths(src, options.max_len_ratio)  # (parts,)
    return (options.n_best if options.sample else options.beam) * int((out * src).sum())


class Request(NamedTuple):
    sentences: list[str]
    options: DecodeOptions
    scores: bool = False  # (this project's API) send each translation's score


def parse_request(body: bytes, max_sentences: int, max_chars: int,
                  defaults: DecodeOptions | None = None, parsed: dict[str, Any] | None = None) -> Request:
    """Validates a /translate body of this project's API; raises RequestError(400 or 413) saying
    what is wrong. Returns the sentences, ``defaults`` with the request's beam, n_best, alpha,
    max_len_ratio and attention, and whether scores were asked for. ``parsed``: the body's JSON
    object, where the caller has parsed it already (a body is parsed once)."""
    defaults = defaults or DecodeOptions()
    request = parsed if parsed is not None else _json_object(body)
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; use {', '.join(REQUEST_FIELDS)}")
    sentences = _sentences(request.get("sentences"), '"sentences"', max_sentences, max_chars)
    flags = {name: request.get(name, False) for name in ("scores", "attention")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise RequestError(400, f'"{name}" must be true or false')
    chosen = decoding_fields(request, (*OPTION_FIELDS, "sample", "prefix"))
    try:  # DecodeOptions says what does not go together (a glossary with sampling)
        options = replace(defaults, **chosen, return_attention=flags["attention"],
                          glossary=request_glossary(request, defaults.glossary))
    except ConfigError as exc:
        raise RequestError(400, str(exc)) from None
    if "split" in request:
        options = replace(options, split=_split(request["split"], defaults.split))
    return Request(sentences, options, flags["scores"])


def decoding_fields(request: dict[str, Any], names: Iterable[str], form: bool = False) -> dict[str, Any]:
    """The decoding options among ``names`` (DecodeOptions' numbers, "sample" and "prefix") that a
    request sets, checked and named as DecodeOptions names them; RequestError(400) saying what is
    wrong, naming the request's field. In a form, where every value is text, numbers and true/false
    are read from it."""
    chosen: dict[str, Any] = {}
    for name in names:
        if name not in request:
            continue
        value = _form_value(request[name]) if form and name != "prefix" else request[name]
        if name == "sample":
            if not isinstance(value, bool):
                raise RequestError(400, '"sample" must be true or false')
        elif name == "prefix":
            if not isinstance(value, str) or len(value) > DecodeOptions.MAX_PREFIX:
                raise RequestError(400, f'"prefix" must be text of at most {DecodeOptions.MAX_PREFIX} characters')
        else:
            try:  # DecodeOptions owns the bounds and says what is wrong
                value = DecodeOptions.check(name, value, label=f'"{name}"')
            except ConfigError as exc:
                raise RequestError(400, str(exc)) from None
        chosen[name] = value
    return chosen


def _split(value: Any, default: str) -> str:
    """A request's "split": false (each sentence whole), true (the server's way, or the default
    decoding's where the server does not split) or one of ``segment.SPLITS``."""
    if value is True:
        return default if default != "none" else DecodeOptions().split
    if value is False:
        return "none"
    if value in SPLITS:
        return value
    raise RequestError(400, f'"split" must be true, false or one of {", ".join(SPLITS)}, not {value!r}')


def _loads(body: bytes) -> Any:
    """The body's JSON, refused with RecursionError past MAX_JSON_DEPTH before it is parsed: the
    parser's own limit moves with the Python (about 1,000 deep on 3.11, several thousand on 3.12)."""
    text = body.decode("utf-8")
    depth = 0
    for token in _JSON_TOKEN.finditer(text):
        if token.group(1):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise RecursionError(f"JSON nested over {MAX_JSON_DEPTH} deep")
        elif token.group() in "]}":
            depth -= 1
    return json.loads(text)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = _loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not JSON ({exc.__class__.__name__}); send "
                                f'{{"sentences": ["..."]}}') from None
    except RecursionError:
        raise RequestError(400, "the body's JSON is nested too deeply; send a flat object like "
                                '{"sentences": ["..."]}') from None
    if not isinstance(request, dict):
        raise RequestError(400, 'the body must be a JSON object like {"sentences": ["..."]}')
    return request


def _sentences(value: Any, name: str, max_sentences: int, max_chars: int) -> list[str]:
    sentences = [value] if isinstance(value, str) else value
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise RequestError(400, f"{name} must be a string or a list of strings")
    if len(sentences) > max_sentences:
        raise RequestError(413, f"{len(sentences)} sentences in one request; send at most {max_sentences}")
    if any(len(s) > max_chars for s in sentences):
        raise RequestError(413, f"a sentence is longer than {max_chars} characters; split it")
    return sentences


def language_codes(name: str) -> set[str]:
    """What clients may call a language: its name in the config and its ISO 639-1 code."""
    return {name, ISO_639_1.get(name, name)}


class LibreRequest(NamedTuple):
    sentences: list[str]
    single: bool  # ``q`` was one string: answer with one string
    alternatives: int
    # the extensions the request set (LIBRETRANSLATE_EXTENSIONS), checked, as DecodeOptions names them
    extensions: dict[str, Any] = {}


def request_glossary(request: dict[str, Any], default: Glossary = ()) -> Glossary:
    """A request's "glossary" ([[source, target], ...] or {source: target}; in a form, that as JSON
    text), checked (glossary.py); RequestError(400) saying what is wrong."""
    value = request.get("glossary", default)
    try:
        return check_glossary(json.loads(value) if isinstance(value, str) else value, '"glossary"')
    except (UserError, ValueError) as exc:
        message = str(exc) if isinstance(exc, UserError) else '"glossary" in a form must be JSON'
        raise RequestError(400, message) from None


def parse_libretranslate(body: bytes, content_type: str, languages: tuple[str, str], max_sentences: int,
                         max_chars: int, parsed: dict[str, Any] | None = None) -> LibreRequest:
    """A LibreTranslate ``/translate`` body (JSON or form-encoded) for a model that translates
    ``languages`` (source, target); raises RequestError saying what is wrong. ``parsed``: the
    body's JSON object, where the caller has parsed it already."""
    # parsed once; a form only when the body is not a JSON object
    request = parsed if parsed is not None else _json_dict(body)
    form = request is None and content_type.startswith("application/x-www-form-urlencoded")
    if form:
        try:
            fields = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise RequestError(400, "the form is not UTF-8") from None
        request = {k: v if k == "q" and len(v) > 1 else v[0] for k, v in fields.items()}
    elif request is None:
        request = _json_object(body)  # raises, saying what is wrong
    unknown = sorted(set(request) - set(LIBRETRANSLATE_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; use {', '.join(LIBRETRANSLATE_FIELDS)}")
    source, target = request.get("source", "auto"), request.get("target")
    src_lang, tgt_lang = languages
    if source != "auto" and source not in language_codes(src_lang):
        raise RequestError(400, f'this model translates from "{ISO_639_1.get(src_lang, src_lang)}", '
                                f'not {source!r}; send "source": "{ISO_639_1.get(src_lang, src_lang)}" or "auto"')
    if target not in language_codes(tgt_lang):
        raise RequestError(400, f'this model translates into "{ISO_639_1.get(tgt_lang, tgt_lang)}", '
                                f'not {target!r}; send "target": "{ISO_639_1.get(tgt_lang, tgt_lang)}"')
    if request.get("format", "text") != "text":
        raise RequestError(400, f'"format" {request["format"]!r} is not supported; send plain text, "format": "text"')
    alternatives = request.get("alternatives", 0)
    try:
        alternatives = int(alternatives)
    except (TypeError, ValueError):
        alternatives = -1
    most = DecodeOptions.MAX_BEAM - 1  # n-best, less the best
    if not 0 <= alternatives <= most:
        raise RequestError(400, f'"alternatives" must be an integer from 0 to {most}')
    q = request.get("q")
    return LibreRequest(_sentences(q, '"q"', max_sentences, max_chars), isinstance(q, str), alternatives,
                        _libre_extensions(request, form))


def _libre_extensions(request: dict[str, Any], form: bool) -> dict[str, Any]:
    """The extensions a LibreTranslate request sets (LIBRETRANSLATE_EXTENSIONS), checked as this
    project's API checks them."""
    chosen = decoding_fields(request, [name for name in LIBRETRANSLATE_EXTENSIONS if name != "glossary"], form)
    glossary = request_glossary(request)
    if glossary:  # none, or an empty one, leaves the server's
        chosen["glossary"] = glossary
    return chosen


def _form_value(text: str) -> Any:
    """A form field's text as the JSON value it spells ("0.7", "40", "true"), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def languages_payload(languages: tuple[str, str]) -> list[dict[str, Any]]:
    """``GET /languages`` as LibreTranslate answers it."""
    src, tgt = (ISO_639_1.get(name, name) for name in languages)
    return [{"code": src, "name": LANGUAGE_NAMES.get(src, languages[0]), "targets": [tgt]},
            {"code": tgt, "name": LANGUAGE_NAMES.get(tgt, languages[1]), "targets": []}]


def json_score(score: float) -> float | None:
    """A translation's score as JSON has it: null for a sentence that got no finite score (an
    empty translation, scored -inf), which strict JSON parsers cannot read as -Infinity."""
    return round(score, 4) if math.isfinite(score) else None


def attention_payload(translator: Translator, source: str, translation: Translation,
                      options: DecodeOptions | None = None) -> dict[str, Any]:
    """The attention of one translation made with ``options``, for the page's heatmap: pieces on
    both sides (the source's as decoded, with EOS) and the weights, a row per target piece."""
    weights = translation.attention  # (target pieces + EOS, source pieces + EOS, as decoded and cut)
    read = translator.options.max_src_len - 1 if weights is None else weights.size(1) - 1
    source_pieces = translator.source_pieces(source, options)[:read] + ["</s>"]
    return {"source": source_pieces, "target": translator.tokenizer.tgt_pieces(translation.tokens) + ["</s>"],
            "weights": [] if weights is None else [[round(float(w), 4) for w in row] for row in weights]}


PAGE = "page.html"
ROUTES = {"/": ("GET",), "/health": ("GET",), "/languages": ("GET",), "/translate": ("POST",)}
JSON = "application/json; charset=utf-8"
FORM = "application/x-www-form-urlencoded"


class Response(NamedTuple):
    """An answer, as the handler writes it (with no body for HEAD)."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()  # beyond Content-Type and Content-Length, in order
    # the connection cannot go on: where the request's body ends is unknown, or the body was not read
    close: bool = False


def model_info(checkpoint: str | Path, step: Any, ensemble: Sequence[str | Path] = ()) -> dict[str, Any]:
    """What ``GET /health`` says of the model: its file's (or run directory's) name, never where
    it lies on the server, and its training step; with ``ensemble``, the names of the models
    decoded with it too."""
    info = {"model": Path(checkpoint).name, "step": step}
    if ensemble:
        info["ensemble"] = [Path(other).name for other in ensemble]
    return info


def load_api_keys(path: str | Path) -> dict[str, int | None]:
    """``--api-keys FILE``: a key a line, optionally followed by the requests per minute that key
    may make (as LibreTranslate's ``ltmanage keys add 120``; otherwise the server's ``--req-limit``);
    blank lines and lines starting with # are skipped. Raises ServiceError saying what is wrong,
    without quoting a key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ServiceError(f"cannot read the API keys in {path} ({why}); give a UTF-8 text file with a key "
                           f"a line") from None
    keys: dict[str, int | None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2 or (len(words) == 2 and not re.fullmatch(r"[1-9][0-9]{0,8}", words[1])):
            raise ServiceError(f"{path}, line {number}: write a key, optionally followed by its requests "
                               f"per minute (a whole number above 0), and nothing else")
        keys[words[0]] = int(words[1]) if len(words) == 2 else None
    if not keys:
        raise ServiceError(f"{path} holds no API keys; write one a line")
    return keys


class Access:
    """Who may translate, and how often, as LibreTranslate's ``--api-keys`` and ``--req-limit``:
    with ``keys``, a request without one of them as its ``api_key`` is refused (403, with
    LibreTranslate's "Invalid API key"); with a limit, each client (an IP address) may make that
    many translation requests in any minute, and is answered 429 with ``Retry-After`` beyond it.
    A key may carry a limit of its own (``load_api_keys``). ``clock``: seconds, for the tests."""

    WINDOW = 60.0  # seconds: the limit is per minute

    def __init__(self, keys: Mapping[str, int | None] | None = None, req_limit: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.keys = None if keys is None else dict(keys)
        self.req_limit, self.clock = req_limit, clock
        self.recent: dict[str, deque[float]] = {}  # client -> the times of its requests within the window
        self.swept = clock()
        self.lock = threading.Lock()

    def admit(self, key: Any, client: str) -> None:
        """Counts a request with ``key`` (None: none given) from ``client``, or raises RequestError
        (403) or Busy (429) saying why it is refused."""
        limit = self.req_limit
        if self.keys is not None:
            if key is None or key == "":
                raise RequestError(403, "Please contact the server operator to get an API key")
            if not isinstance(key, str) or key not in self.keys:
                raise RequestError(403, "Invalid API key")
            limit = self.keys[key] or self.req_limit
        if limit > 0:
            self._count(client, limit)

    def _count(self, client: str, limit: int) -> None:
        now = self.clock()
        with self.lock:
            if now - self.swept > self.WINDOW:  # forget the clients gone quiet, once a window
                self.recent = {c: t for c, t in self.recent.items() if t and t[-1] > now - self.WINDOW}
                self.swept = now
            times = self.recent.setdefault(client, deque())
            while times and times[0] <= now - self.WINDOW:
                times.popleft()
            if len(times) >= limit:
                raise Busy(429, f"Slowdown: {limit} per 1 minute", retry_after=times[0] + self.WINDOW - now)
            times.append(now)


class _Body:
    """A request's body: reads stop at its Content-Length, and ``left`` says how much is unread."""

    def __init__(self, stream: BinaryIO | None, length: int):
        self.stream, self.left = stream, length if stream is not None else 0

    def read(self, size: int) -> bytes:
        data = self.stream.read(min(size, self.left)) if self.left and size > 0 else b""
        self.left -= len(data)
        return data


def _header_fields(headers: Mapping[str, str]) -> dict[str, str]:
    """The request's header fields by lowercase name; a repeated field's values joined by ", "
    (RFC 9110, 5.3), so that two Content-Lengths read as no number."""
    fields: dict[str, str] = {}
    for name, value in headers.items():  # an http.client message gives every occurrence
        key = name.lower()
        fields[key] = f"{fields[key]}, {value}" if key in fields else value
    return fields


def _framing(fields: Mapping[str, str]) -> tuple[int, tuple[int, str] | None]:
    """The length of a request's body (0 where it declares none) and, where its end cannot be
    trusted, the status and message to refuse it with (and close the connection)."""
    if "transfer-encoding" in fields:
        if "content-length" in fields:  # RFC 9112, 6.3: the message is ambiguous, a smuggling vector
            return 0, (400, "a request cannot have both Content-Length and Transfer-Encoding; "
                            "send Content-Length alone")
        return 0, (411, "send the body with a Content-Length header (Transfer-Encoding is not accepted)")
    value = fields.get("content-length")
    if value is None:
        return 0, None
    if not re.fullmatch(r"[0-9]{1,15}", value.strip()):
        return 0, (400, "Content-Length must be one number of bytes")
    return int(value), None


class TranslationService:
    """What the server answers, apart from HTTP's bytes: ``respond`` takes a parsed request and
    returns a ``Response``, so that routing, sniffing the body (JSON or form, this project's API or
    LibreTranslate's) and shaping the answer are tested without sockets (as OpenNMT-py's server
    routes are one-line wrappers over its ``TranslationServer``). Holds the batcher, the page, the
    model's (source, target) ``languages``, the ``cors`` origin and the request limits: ``max_body``
    bytes, ``max_sentences``, ``max_chars`` a sentence, ``char_limit`` characters a request (0: no
    limit; LibreTranslate's ``--char-limit``), ``max_cost`` (``request_cost``), ``deadline``
    seconds to wait for a translation, and ``access`` (keys and requests per minute). A request's
    options default to the batcher's translator's."""

    def __init__(self, batcher: RequestBatcher, max_body: int = 1 << 20, max_sentences: int = 256,
                 max_chars: int = 10_000, info: dict[str, Any] | None = None,
                 languages: tuple[str, str] = ("spa", "eng"), cors: str | None = None, max_cost: int = MAX_COST,
                 char_limit: int = 0, deadline: float | None = DEADLINE, access: Access | None = None,
                 min_confidence: float | None = None):
        self.batcher, self.defaults = batcher, batcher.translator.options
        # with a calibrated model, answers carry each translation's ``confidence`` (confidence.py), and with
        # ``min_confidence`` a ``low_confidence`` flag for each sentence whose best is below it
        self.calibrated = batcher.translator.calibrator is not None
        self.min_confidence = min_confidence if self.calibrated else None
        self.max_body, self.max_sentences, self.max_chars = max_body, max_sentences, max_chars
        self.max_cost, self.char_limit, self.deadline = max_cost, char_limit, deadline
        self.info, self.languages, self.cors = info or {}, languages, cors
        self.access = access or Access()
        self.page = files("translate").joinpath(PAGE).read_bytes()

    def respond(self, method: str, target: str, headers: Mapping[str, str],
                body: BinaryIO | None = None, client: str = "") -> Response | None:
        """The answer to ``method`` on ``target`` (a path, perhaps with a query) from ``client`` (an
        IP address). ``headers``: the request's; ``body``: the stream a POST's body is read from,
        and only once its Content-Length is accepted. A response whose request's body was left
        unread (or could not be delimited) closes the connection, so that the body is never taken
        for the next request. None: the client left mid-body, and there is no one to answer."""
        fields = _header_fields(headers)
        length, refused = _framing(fields)
        if refused is not None:
            return self._json(refused[0], {"error": refused[1]}, close=True)
        stream = _Body(body, length)
        response = self._route(method, target, fields, stream, client)
        if response is not None and stream.left:
            response = response._replace(close=True)
        return response

    def _route(self, method: str, target: str, fields: Mapping[str, str], body: _Body,
               client: str) -> Response | None:
        path = urllib.parse.urlsplit(target).path.rstrip("/") or "/"
        methods = ROUTES.get(path)
        command = "GET" if method == "HEAD" else method
        if methods is None:
            return self._json(404, {"error": f"no such path {target}; use GET /, POST /translate, "
                                             f"GET /languages or GET /health"})
        allowed = ("Allow", ", ".join((*methods, "OPTIONS")))
        if command == "OPTIONS":  # a browser's CORS preflight
            extra = [allowed]
            if self.cors:
                extra += [("Access-Control-Allow-Methods", allowed[1]),
                          ("Access-Control-Allow-Headers", "Content-Type"), ("Access-Control-Max-Age", "600")]
            return self._answer(204, b"", "text/plain", extra)
        if command not in methods:
            return self._json(405, {"error": f"{target} takes {' or '.join(methods)}, not {method}"}, [allowed])
        if path == "/":
            return self._answer(200, self.page, "text/html; charset=utf-8")
        if path == "/languages":
            return self._json(200, languages_payload(self.languages))
        if path == "/health":
            return self._json(200, {"status": "ok", **self.info, "languages": list(self.languages)})
        return self._post(fields, body, client)

    def _post(self, fields: Mapping[str, str], body: _Body, client: str) -> Response | None:
        if "content-length" not in fields:  # the body's end is unknown: the connection cannot go on
            return self._json(411, {"error": "send a Content-Length header"}, close=True)
        length = body.left
        if length > self.max_body:
            return self._json(413, {"error": f"the body has {length} bytes; send at most {self.max_body}"},
                              close=True)
        data = body.read(length)
        if len(data) < length:  # the client closed mid-body
            return None
        try:
            return self.translate(data, fields.get("content-type", "application/json"), client)
        except Busy as exc:
            return self._json(exc.status, {"error": str(exc)}, [("Retry-After", str(exc.retry_after))])
        except RequestError as exc:
            return self._json(exc.status, {"error": str(exc)})
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # a model failure: logged on one line, never sent; the service goes on
            logger.error(f"translation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
            return self._json(500, {"error": "translation failed: an error on the server (it is in the server's log)"})

    def translate(self, body: bytes, content_type: str = "application/json", client: str = "") -> Response:
        """A ``POST /translate`` body from ``client`` answered in this project's API or
        LibreTranslate's, as the body says: a JSON object with ``q`` and no ``sentences`` is
        LibreTranslate's, and so is a form (curl -d sends JSON labelled as a form: the body
        decides). Its ``api_key`` and its client are let in (``access``) before anything else.
        Raises RequestError."""
        as_json = _json_dict(body)
        if as_json is not None:
            libre = "q" in as_json and "sentences" not in as_json
            key = as_json.get("api_key")
        else:
            libre = content_type.startswith(FORM)
            key = _form_field(body, "api_key") if libre else None
        self.access.admit(key, client)
        return self._libretranslate(body, content_type, as_json) if libre else self._own_api(body, as_json)

    def _within_limits(self, sentences: list[str], options: DecodeOptions, lower: str) -> None:
        """Raises RequestError where ``sentences`` hold more characters than ``char_limit`` (400,
        as LibreTranslate says it) or cost more than ``max_cost`` (413, saying what to ``lower``)."""
        chars = sum(len(s) for s in sentences)
        if 0 < self.char_limit < chars:
            raise RequestError(400, f"Invalid request: request ({chars}) exceeds text limit ({self.char_limit})")
        cost = request_cost(self.batcher.translator, sentences, options)
        if cost > self.max_cost:
            raise RequestError(413, f"this request would cost {cost:,} (beam {options.beam} x output length x "
                                    f"source length, in pieces, summed over its sentences); the server takes at "
                                    f"most {self.max_cost:,}: lower {lower}, or send fewer or shorter sentences")

    def _own_api(self, body: bytes, parsed: dict[str, Any] | None) -> Response:
        sentences, options, scores = parse_request(body, self.max_sentences, self.max_chars, self.defaults, parsed)
        self._within_limits(sentences, options, '"beam" or "max_len_ratio"')
        results = self.batcher.translate(sentences, options, self.deadline)
        answer: dict[str, Any]
        if options.n_best == 1:
            answer = {"translations": [r[0].text for r in results]}
            if scores:
                answer["scores"] = [json_score(r[0].score) for r in results]
            if self.calibrated:
                answer["confidence"] = [round(r[0].confidence, 4) for r in results]
        else:
            answer = {"translations": [[{"text": t.text, "score": json_score(t.score),
                                         **({"confidence": round(t.confidence, 4)} if self.calibrated else {})}
                                        for t in r] for r in results]}
        answer.update(self._flags(results, options))
        if options.return_attention:
            answer["attention"] = [attention_payload(self.batcher.translator, s, r[0], options)
                                   for s, r in zip(sentences, results)]
        return self._json(200, answer)

    def _libretranslate(self, body: bytes, content_type: str, parsed: dict[str, Any] | None) -> Response:
        request = parse_libretranslate(body, content_type, self.languages, self.max_sentences, self.max_chars,
                                       parsed)
        n = request.alternatives + 1
        try:  # DecodeOptions says what does not go together (a glossary with sampling)
            options = replace(self.defaults, beam=max(self.defaults.beam, n), n_best=n, **request.extensions)
        except ConfigError as exc:
            raise RequestError(400, str(exc)) from None
        self._within_limits(request.sentences, options, '"alternatives"')
        results = self.batcher.translate(request.sentences, options, self.deadline)
        texts = [r[0].text for r in results]
        answer: dict[str, Any] = {"translatedText": texts}
        if request.alternatives:
            answer["alternatives"] = [[t.text for t in r[1:]] for r in results]
        if self.calibrated:  # extensions of LibreTranslate's answer, as this project's API has them
            answer["confidence"] = [round(r[0].confidence, 4) for r in results]
        answer.update(self._flags(results, options))
        if request.single:  # ``q`` was one string: each field answers for it alone
            answer = {key: values[0] for key, values in answer.items()}
        return self._json(200, answer)

    def _flags(self, results: list[list[Translation]], options: DecodeOptions) -> dict[str, list]:
        """What both APIs add per sentence: with a glossary, the terms the search could not place
        (reported, never dropped); with ``min_confidence``, whether the best translation is under it."""
        flags: dict[str, list] = {}
        if options.glossary:
            flags["missed_terms"] = [list(r[0].missed) for r in results]
        if self.min_confidence is not None:
            flags["low_confidence"] = [r[0].confidence < self.min_confidence for r in results]
        return flags

    def _json(self, status: int, payload: Any, extra: Iterable[tuple[str, str]] = (),
              close: bool = False) -> Response:
        body = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return self._answer(status, body, JSON, extra, close)

    def _answer(self, status: int, body: bytes, content_type: str, extra: Iterable[tuple[str, str]] = (),
                close: bool = False) -> Response:
        """A response with the CORS headers, when the service has an origin to allow, before ``extra``."""
        cors = (("Access-Control-Allow-Origin", self.cors), ("Vary", "Origin")) if self.cors else ()
        return Response(status, content_type, body, (*cors, *extra), close)


class _Reader(io.RawIOBase):
    """A connection's reading side with a deadline on each request as a whole: ``seconds`` for its
    first byte to come (a keep-alive connection may idle that long) and as many again for the rest,
    however the bytes trickle in (a timeout on each read would let a byte every few seconds hold
    the connection for ever)."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock, self.seconds = sock, seconds
        self.until, self.started = math.inf, False

    def next_request(self) -> None:
        self.until, self.started = time.monotonic() + self.seconds, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.until - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self.sock.settimeout(left)
        count = self.sock.recv_into(buffer)
        if count and not self.started:  # the request's first bytes: its own clock starts
            self.started, self.until = True, time.monotonic() + self.seconds
        return count


class Handler(BaseHTTPRequestHandler):
    """Moves bytes: reads a request, has the server's ``TranslationService`` answer it, writes the
    answer and the access log line. Connections are HTTP/1.1 with keep-alive; a client has the
    server's ``request_timeout`` to start each request and as long again to send it whole
    (``_Reader``), and as long to take each answer."""

    server: Server
    server_version = "translate"
    protocol_version = "HTTP/1.1"  # keep-alive

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # read by StreamRequestHandler.setup: for writing answers
        super().setup()
        self.rfile.close()  # the stream setup made: read through the deadline instead
        self.reader = _Reader(self.connection, self.server.request_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.next_request()
        super().handle_one_request()

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError):  # the client went away or stalled: nothing to report
            self.close_connection = True

    def log_message(self, *args) -> None:  # the access log replaces http.server's lines
        pass

    def log_request(self, code="-", size="-") -> None:
        pass

    def serve(self) -> None:
        started = time.monotonic()
        response = self.server.service.respond(self.command, self.path, self.headers, self.rfile,
                                               client=self.client_address[0])
        if response is None:  # the client left mid-body
            self.close_connection = True
            return
        self.connection.settimeout(self.server.request_timeout)  # reads left it at what the deadline had left
        self.close_connection = self.close_connection or response.close
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
        self.server.log_access(f'{self.client_address[0]} "{self.command} {self.path} {self.request_version}" '
                               f"{response.status} {len(response.body)} {(time.monotonic() - started) * 1000:.1f}ms")

    # the methods the service answers (404, 405 or the route's answer); http.server answers others with 501
    do_GET = do_HEAD = do_OPTIONS = do_POST = do_PUT = do_DELETE = do_PATCH = serve


class Server(ThreadingHTTPServer):
    """The HTTP server of a ``TranslationService``: a thread per connection, at most
    ``max_connections`` of them (a connection beyond is answered 503 at once and closed, by the
    accepting thread, which never waits on it), ``request_timeout`` for each request (``Handler``),
    and ``access_log`` (when given) hearing of each request."""

    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted (socketserver's 5 drops a burst of clients)

    def __init__(self, address: tuple[str, int], service: TranslationService, request_timeout: float = 30.0,
                 access_log: Callable[[str], None] | None = None, max_connections: int = MAX_CONNECTIONS):
        self.service, self.request_timeout, self.access_log = service, request_timeout, access_log
        self.max_connections, self.connections = max_connections, 0
        self.counting = threading.Lock()
        super().__init__(address, Handler)

    def log_access(self, line: str) -> None:
        if self.access_log is not None:
            self.access_log(line)

    def process_request(self, request, client_address) -> None:
        with self.counting:
            admitted = self.connections < self.max_connections
            self.connections += admitted
        if not admitted:
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self.counting:
            self.connections -= 1

    def _refuse(self, request: socket.socket, client_address) -> None:
        body = json.dumps({"error": f"the server holds {self.max_connections} connections already; "
                                    f"try again later"}).encode("utf-8")
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
                f"Retry-After: 1\r\nConnection: close\r\n\r\n").encode("ascii")
        try:
            request.setblocking(False)  # a few hundred bytes fit any socket's buffer
            request.send(head + body)
            request.recv(1 << 16)  # what the client sent already, so that closing does not reset the answer
        except OSError:
            pass
        self.shutdown_request(request)
        self.log_access(f'{client_address[0]} "-" 503 {len(body)} 0.0ms (connections full)')

    def handle_error(self, request, client_address) -> None:
        """One line, no traceback (clients that go away are not errors, and are not reported)."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            logger.error(f"serving {client_address[0]}: {type(error).__name__}: {' '.join(str(error).split())[:500]}")


def make_server(batcher: RequestBatcher, host: str = "127.0.0.1", port: int = 8080, max_body: int = 1 << 20,
                max_sentences: int = 256, max_chars: int = 10_000, info: dict[str, Any] | None = None,
                languages: tuple[str, str] = ("spa", "eng"), request_timeout: float = 30.0,
                access_log: Callable[[str], None] | None = None, cors: str | None = None,
                max_connections: int = MAX_CONNECTIONS, max_cost: int = MAX_COST, char_limit: int = 0,
                deadline: float | None = DEADLINE, access: Access | None = None,
                min_confidence: float | None = None) -> Server:
    """An HTTP server (not started) that answers through ``batcher``; a request's options default
    to its translator's. ``languages``: the model's (source, target), for the LibreTranslate API;
    ``request_timeout``: seconds a connection may idle before a request, and then to send it whole;
    ``cors``: the origin allowed to call it from a browser page of its own (``*``: any); the
    other limits as ``TranslationService`` and ``Server`` take them."""
    service = TranslationService(batcher, max_body, max_sentences, max_chars, info, languages, cors,
                                 max_cost, char_limit, deadline, access, min_confidence)
    return Server((host, port), service, request_timeout, access_log, max_connections)


def _form_field(body: bytes, name: str) -> str | None:
    """The first value of ``name`` in a form-encoded body (None: absent, or not UTF-8)."""
    try:
        values = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True).get(name)
    except UnicodeDecodeError:
        return None
    return values[0] if values else None


def _json_dict(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        request = _loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return request if isinstance(request, dict) else None
