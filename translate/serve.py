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
HTTP/1.1 with keep-alive. Each connection's socket has a timeout, so a client that stalls
mid-request is dropped and holds no thread; a client that goes away early is forgotten without a
trace in the log. ``access_log`` gets one line per request.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any, BinaryIO, NamedTuple

from .errors import ConfigError, RequestError
from .segment import SPLITS
from .translator import DecodeOptions, Translation, Translator

logger = logging.getLogger(__name__)

# named as DecodeOptions names them
OPTION_FIELDS = ("beam", "n_best", "alpha", "max_len_ratio", "no_repeat_ngram", "coverage")
REQUEST_FIELDS = ("sentences", *OPTION_FIELDS, "split", "scores", "attention")
LIBRETRANSLATE_FIELDS = ("q", "source", "target", "format", "alternatives", "api_key")
# ISO 639-3 codes (as Tatoeba and this project's defaults name languages) and their ISO 639-1
# codes, which LibreTranslate clients send; a language outside this table is known by its own name
ISO_639_1 = {"spa": "es", "eng": "en", "fra": "fr", "deu": "de", "ita": "it", "por": "pt", "nld": "nl",
             "rus": "ru", "pol": "pl", "tur": "tr", "ara": "ar", "zho": "zh", "cmn": "zh", "jpn": "ja",
             "kor": "ko", "ukr": "uk", "ces": "cs", "swe": "sv", "fin": "fi", "dan": "da", "ell": "el",
             "hun": "hu", "ron": "ro", "cat": "ca", "epo": "eo", "heb": "he", "hin": "hi", "vie": "vi"}
LANGUAGE_NAMES = {"es": "Spanish", "en": "English", "fr": "French", "de": "German", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "pl": "Polish", "tr": "Turkish"}


@dataclass
class Job:
    sentences: list[str]
    options: DecodeOptions
    future: Future = field(default_factory=Future)


class RequestBatcher:
    """Queues the jobs of concurrent requests and has one worker thread translate them together
    with a ``Translator``, one search per set of options."""

    def __init__(self, translator: Translator, max_batch: int = 64, max_wait_ms: float = 10.0):
        self.translator = translator
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.searches = 0  # batched searches run (fewer than requests when batching works)
        self.worker = threading.Thread(target=self._run, name="request-batcher", daemon=True)
        self.worker.start()

    def translate(self, sentences: list[str], options: DecodeOptions) -> list[list[Translation]]:
        """Waits for the n-best translations of ``sentences``, decoded with ``options``."""
        job = Job(sentences, options)
        self.jobs.put(job)
        return job.future.result()

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
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
                pending.append(more)
                size += len(more.sentences)
            by_options: dict[DecodeOptions, list[Job]] = {}
            for item in pending:
                by_options.setdefault(item.options, []).append(item)
            for options, group in by_options.items():
                self._search(group, options)

    def _search(self, group: list[Job], options: DecodeOptions) -> None:
        lines = [s for job in group for s in job.sentences]
        try:
            results = self.translator.translate(lines, options)
            self.searches += 1
        except Exception as exc:  # the clients learn about it; the server keeps serving
            for job in group:
                job.future.set_exception(exc)
            return
        start = 0
        for job in group:
            job.future.set_result(results[start: start + len(job.sentences)])
            start += len(job.sentences)


class Request(NamedTuple):
    sentences: list[str]
    options: DecodeOptions
    scores: bool = False  # (this project's API) send each translation's score


def parse_request(body: bytes, max_sentences: int, max_chars: int,
                  defaults: DecodeOptions | None = None) -> Request:
    """Validates a /translate body of this project's API; raises RequestError(400 or 413) saying
    what is wrong. Returns the sentences, ``defaults`` with the request's beam, n_best, alpha,
    max_len_ratio and attention, and whether scores were asked for."""
    defaults = defaults or DecodeOptions()
    request = _json_object(body)
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; use {', '.join(REQUEST_FIELDS)}")
    sentences = _sentences(request.get("sentences"), '"sentences"', max_sentences, max_chars)
    flags = {name: request.get(name, False) for name in ("scores", "attention")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise RequestError(400, f'"{name}" must be true or false')
    try:  # DecodeOptions owns the bounds and says what is wrong, naming the request's field
        chosen = {name: DecodeOptions.check(name, request[name], label=f'"{name}"')
                  for name in OPTION_FIELDS if name in request}
        options = replace(defaults, **chosen, return_attention=flags["attention"])
    except ConfigError as exc:
        raise RequestError(400, str(exc)) from None
    if "split" in request:
        options = replace(options, split=_split(request["split"], defaults.split))
    return Request(sentences, options, flags["scores"])


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


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not JSON ({exc.__class__.__name__}); send "
                                f'{{"sentences": ["..."]}}') from None
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


def parse_libretranslate(body: bytes, content_type: str, languages: tuple[str, str], max_sentences: int,
                         max_chars: int) -> LibreRequest:
    """A LibreTranslate ``/translate`` body (JSON or form-encoded) for a model that translates
    ``languages`` (source, target); raises RequestError saying what is wrong."""
    request = _json_dict(body)  # parsed once; a form only when the body is not a JSON object
    if request is None and content_type.startswith("application/x-www-form-urlencoded"):
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
    return LibreRequest(_sentences(q, '"q"', max_sentences, max_chars), isinstance(q, str), alternatives)


def languages_payload(languages: tuple[str, str]) -> list[dict[str, Any]]:
    """``GET /languages`` as LibreTranslate answers it."""
    src, tgt = (ISO_639_1.get(name, name) for name in languages)
    return [{"code": src, "name": LANGUAGE_NAMES.get(src, languages[0]), "targets": [tgt]},
            {"code": tgt, "name": LANGUAGE_NAMES.get(tgt, languages[1]), "targets": []}]


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


class Response(NamedTuple):
    """An answer, as the handler writes it (with no body for HEAD)."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()  # beyond Content-Type and Content-Length, in order
    close: bool = False  # the connection cannot go on: where the request's body ends is unknown


class TranslationService:
    """What the server answers, apart from HTTP's bytes: ``respond`` takes a parsed request and
    returns a ``Response``, so that routing, sniffing the body (JSON or form, this project's API or
    LibreTranslate's) and shaping the answer are tested without sockets (as OpenNMT-py's server
    routes are one-line wrappers over its ``TranslationServer``). Holds the batcher, the page, the
    model's (source, target) ``languages``, the ``cors`` origin and the request limits; a request's
    options default to the batcher's translator's."""

    def __init__(self, batcher: RequestBatcher, max_body: int = 1 << 20, max_sentences: int = 256,
                 max_chars: int = 10_000, info: dict[str, Any] | None = None,
                 languages: tuple[str, str] = ("spa", "eng"), cors: str | None = None):
        self.batcher, self.defaults = batcher, batcher.translator.options
        self.max_body, self.max_sentences, self.max_chars = max_body, max_sentences, max_chars
        self.info, self.languages, self.cors = info or {}, languages, cors
        self.page = files("translate").joinpath(PAGE).read_bytes()

    def respond(self, method: str, target: str, headers: Mapping[str, str],
                body: BinaryIO | None = None) -> Response | None:
        """The answer to ``method`` on ``target`` (a path, perhaps with a query). ``headers``: the
        request's (Content-Length and Content-Type are read); ``body``: the stream a POST's body
        is read from, and only once its Content-Length is accepted. None: the client left
        mid-body, and there is no one to answer."""
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
        return self._post(headers, body)

    def _post(self, headers: Mapping[str, str], body: BinaryIO | None) -> Response | None:
        try:
            length = int(headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if length < 0:  # the body's end is unknown: the connection cannot go on
            return self._json(411, {"error": "send a Content-Length header"}, close=True)
        if length > self.max_body:
            return self._json(413, {"error": f"the body has {length} bytes; send at most {self.max_body}"},
                              close=True)
        data = body.read(length) if body is not None and length else b""
        if len(data) < length:  # the client closed mid-body
            return None
        try:
            return self.translate(data, headers.get("Content-Type", "application/json"))
        except RequestError as exc:
            return self._json(exc.status, {"error": str(exc)})
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # a model failure: report it, keep serving
            return self._json(500, {"error": f"translation failed: {exc}"})

    def translate(self, body: bytes, content_type: str = "application/json") -> Response:
        """A ``POST /translate`` body answered in this project's API or LibreTranslate's, as the
        body says: a JSON object with ``q`` and no ``sentences`` is LibreTranslate's, and so is
        a form (curl -d sends JSON labelled as a form: the body decides). Raises RequestError."""
        as_json = _json_dict(body)
        if as_json is not None:
            libre = "q" in as_json and "sentences" not in as_json
        else:
            libre = content_type.startswith("application/x-www-form-urlencoded")
        return self._libretranslate(body, content_type) if libre else self._own_api(body)

    def _own_api(self, body: bytes) -> Response:
        sentences, options, scores = parse_request(body, self.max_sentences, self.max_chars, self.defaults)
        results = self.batcher.translate(sentences, options)
        answer: dict[str, Any]
        if options.n_best == 1:
            answer = {"translations": [r[0].text for r in results]}
            if scores:
                answer["scores"] = [round(r[0].score, 4) for r in results]
        else:
            answer = {"translations": [[{"text": t.text, "score": round(t.score, 4)} for t in r]
                                       for r in results]}
        if options.return_attention:
            answer["attention"] = [attention_payload(self.batcher.translator, s, r[0], options)
                                   for s, r in zip(sentences, results)]
        return self._json(200, answer)

    def _libretranslate(self, body: bytes, content_type: str) -> Response:
        request = parse_libretranslate(body, content_type, self.languages, self.max_sentences, self.max_chars)
        n = request.alternatives + 1
        options = replace(self.defaults, beam=max(self.defaults.beam, n), n_best=n)
        results = self.batcher.translate(request.sentences, options)
        texts = [r[0].text for r in results]
        answer: dict[str, Any] = {"translatedText": texts[0] if request.single else texts}
        if request.alternatives:
            others = [[t.text for t in r[1:]] for r in results]
            answer["alternatives"] = others[0] if request.single else others
        return self._json(200, answer)

    def _json(self, status: int, payload: Any, extra: Iterable[tuple[str, str]] = (),
              close: bool = False) -> Response:
        return self._answer(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), JSON, extra, close)

    def _answer(self, status: int, body: bytes, content_type: str, extra: Iterable[tuple[str, str]] = (),
                close: bool = False) -> Response:
        """A response with the CORS headers, when the service has an origin to allow, before ``extra``."""
        cors = (("Access-Control-Allow-Origin", self.cors), ("Vary", "Origin")) if self.cors else ()
        return Response(status, content_type, body, (*cors, *extra), close)


class Handler(BaseHTTPRequestHandler):
    """Moves bytes: reads a request, has the server's ``TranslationService`` answer it, writes the
    answer and the access log line. Connections are HTTP/1.1 with keep-alive, with the server's
    ``request_timeout`` on their sockets, so that a silent client is dropped."""

    server: Server
    server_version = "translate"
    protocol_version = "HTTP/1.1"  # keep-alive

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # read by StreamRequestHandler.setup
        super().setup()

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
        response = self.server.service.respond(self.command, self.path, self.headers, self.rfile)
        if response is None:  # the client left mid-body
            self.close_connection = True
            return
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
        if self.server.access_log is not None:
            took = (time.monotonic() - started) * 1000
            self.server.access_log(f'{self.client_address[0]} "{self.command} {self.path} {self.request_version}" '
                                   f"{response.status} {len(response.body)} {took:.1f}ms")

    # the methods the service answers (404, 405 or the route's answer); http.server answers others with 501
    do_GET = do_HEAD = do_OPTIONS = do_POST = do_PUT = do_DELETE = do_PATCH = serve


class Server(ThreadingHTTPServer):
    """The HTTP server of a ``TranslationService``: a thread per connection, a silent connection
    dropped after ``request_timeout`` seconds, and ``access_log`` (when given) hearing of each
    request."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: TranslationService, request_timeout: float = 30.0,
                 access_log: Callable[[str], None] | None = None):
        self.service, self.request_timeout, self.access_log = service, request_timeout, access_log
        super().__init__(address, Handler)

    def handle_error(self, request, client_address) -> None:
        """One line, no traceback (clients that go away are not errors, and are not reported)."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            logger.error(f"serving {client_address[0]}: {type(error).__name__}: {error}")


def make_server(batcher: RequestBatcher, host: str = "127.0.0.1", port: int = 8080, max_body: int = 1 << 20,
                max_sentences: int = 256, max_chars: int = 10_000, info: dict[str, Any] | None = None,
                languages: tuple[str, str] = ("spa", "eng"), request_timeout: float = 30.0,
                access_log: Callable[[str], None] | None = None, cors: str | None = None) -> Server:
    """An HTTP server (not started) that answers through ``batcher``; a request's options default
    to its translator's. ``languages``: the model's (source, target), for the LibreTranslate API;
    ``request_timeout``: seconds a connection may stay silent mid-request or between requests;
    ``cors``: the origin allowed to call it from a browser page of its own (``*``: any)."""
    service = TranslationService(batcher, max_body, max_sentences, max_chars, info, languages, cors)
    return Server((host, port), service, request_timeout, access_log)


def _json_dict(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return request if isinstance(request, dict) else None
