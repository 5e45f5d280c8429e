"""A small HTTP JSON API over a loaded model: ``POST /translate``, ``GET /health``.

Request threads do not run the model: they queue their sentences, and the ``RequestBatcher``'s
one worker thread takes whatever has queued within ``max_wait_ms`` (up to ``max_batch``
sentences) and translates it with a ``Translator`` in one batched search per set of decoding
options, so concurrent clients share batches instead of queueing behind each other.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import ConfigError, RequestError
from .translator import DecodeOptions, Translation, Translator

MAX_BEAM = 64
REQUEST_FIELDS = ("sentences", "beam", "n_best", "alpha", "max_len_ratio")


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


def parse_request(body: bytes, max_sentences: int, max_chars: int,
                  defaults: DecodeOptions | None = None) -> tuple[list[str], DecodeOptions]:
    """Validates a /translate body; raises RequestError(400 or 413) saying what is wrong. Returns
    the sentences and ``defaults`` with the request's beam, n_best, alpha and max_len_ratio."""
    defaults = defaults or DecodeOptions()
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not JSON ({exc.__class__.__name__}); send "
                                f'{{"sentences": ["..."]}}') from None
    if not isinstance(request, dict):
        raise RequestError(400, 'the body must be a JSON object like {"sentences": ["..."]}')
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; use {', '.join(REQUEST_FIELDS)}")
    sentences = request.get("sentences")
    if isinstance(sentences, str):
        sentences = [sentences]
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise RequestError(400, '"sentences" must be a list of strings')
    if len(sentences) > max_sentences:
        raise RequestError(413, f"{len(sentences)} sentences in one request; send at most {max_sentences}")
    if any(len(s) > max_chars for s in sentences):
        raise RequestError(413, f"a sentence is longer than {max_chars} characters; split it")
    beam, n_best = request.get("beam", defaults.beam), request.get("n_best", defaults.n_best)
    alpha, ratio = request.get("alpha", defaults.alpha), request.get("max_len_ratio", defaults.max_len_ratio)
    for name, value in (("beam", beam), ("n_best", n_best)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BEAM:
            raise RequestError(400, f'"{name}" must be an integer from 1 to {MAX_BEAM}')
    if n_best > beam:
        raise RequestError(400, '"n_best" cannot exceed "beam"')
    for name, value in (("alpha", alpha), ("max_len_ratio", ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise RequestError(400, f'"{name}" must be a number from 0 to 100')
    if ratio <= 0:
        raise RequestError(400, '"max_len_ratio" must be positive')
    try:
        options = replace(defaults, beam=beam, n_best=n_best, alpha=float(alpha), max_len_ratio=float(ratio))
    except ConfigError as exc:  # what the checks above let through, should DecodeOptions ask for more
        raise RequestError(400, str(exc)) from None
    return sentences, options


def make_server(batcher: RequestBatcher, host: str = "127.0.0.1", port: int = 8080, max_body: int = 1 << 20,
                max_sentences: int = 256, max_chars: int = 10_000,
                info: dict[str, Any] | None = None) -> ThreadingHTTPServer:
    """An HTTP server (not started) that answers through ``batcher``; a request's options default
    to its translator's."""
    defaults = batcher.translator.options

    class Handler(BaseHTTPRequestHandler):
        server_version = "translate"

        def log_message(self, *args) -> None:  # quiet: one line per request is noise for a service
            pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", **(info or {})})
            else:
                self._send(404, {"error": f"no such path {self.path}; use POST /translate or GET /health"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/translate":
                self._send(404, {"error": f"no such path {self.path}; use POST /translate"})
                return
            try:
                length = int(self.headers.get("Content-Length") or -1)
            except ValueError:
                length = -1
            if length < 0:
                self._send(411, {"error": "send a Content-Length header"})
                return
            if length > max_body:
                self.close_connection = True
                self._send(413, {"error": f"the body has {length} bytes; send at most {max_body}"})
                return
            try:
                sentences, options = parse_request(self.rfile.read(length), max_sentences, max_chars, defaults)
                results = batcher.translate(sentences, options)
            except RequestError as exc:
                self._send(exc.status, {"error": str(exc)})
                return
            except Exception as exc:  # a model failure: report it, keep serving
                self._send(500, {"error": f"translation failed: {exc}"})
                return
            if options.n_best == 1:
                self._send(200, {"translations": [r[0].text for r in results]})
            else:
                self._send(200, {"translations": [[{"text": t.text, "score": round(t.score, 4)} for t in r]
                                                  for r in results]})

    return ThreadingHTTPServer((host, port), Handler)
