"""A small HTTP JSON API over a loaded model: ``POST /translate``, ``GET /health``.

Request threads do not run the model: they queue their sentences, and one worker thread takes
whatever has queued within ``max_wait_ms`` (up to ``max_batch`` sentences) and translates it in
one batched search, so concurrent clients share batches instead of queueing behind each other.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import RequestError
from .search import translate_lines
from .tokenizer import Tokenizer

MAX_BEAM = 64


@dataclass
class Job:
    sentences: list[str]
    options: tuple[int, int, float, float]  # beam, n_best, alpha, max_len_ratio
    future: Future = field(default_factory=Future)


class Translator:
    """Owns the model; batches the jobs of concurrent requests."""

    def __init__(self, model, tokenizer: Tokenizer, max_batch: int = 64, max_wait_ms: float = 10.0, amp: bool = True):
        self.model, self.tokenizer, self.amp = model, tokenizer, amp
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.searches = 0  # batched searches run (fewer than requests when batching works)
        self.worker = threading.Thread(target=self._run, name="translator", daemon=True)
        self.worker.start()

    def translate(self, sentences: list[str], beam: int, n_best: int, alpha: float, max_len_ratio: float) -> list:
        job = Job(sentences, (beam, n_best, alpha, max_len_ratio))
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
            by_options: dict[tuple, list[Job]] = {}
            for item in pending:
                by_options.setdefault(item.options, []).append(item)
            for (beam, n_best, alpha, ratio), group in by_options.items():
                self._search(group, beam, n_best, alpha, ratio)

    def _search(self, group: list[Job], beam: int, n_best: int, alpha: float, ratio: float) -> None:
        lines = [s for job in group for s in job.sentences]
        try:
            results = translate_lines(self.model, self.tokenizer, lines, beam=beam, n_best=n_best, alpha=alpha,
                                      max_len_ratio=ratio, amp=self.amp)
            self.searches += 1
        except Exception as exc:  # the clients learn about it; the server keeps serving
            for job in group:
                job.future.set_exception(exc)
            return
        start = 0
        for job in group:
            job.future.set_result(results[start: start + len(job.sentences)])
            start += len(job.sentences)


def parse_request(body: bytes, max_sentences: int, max_chars: int) -> tuple[list[str], int, int, float, float]:
    """Validates a /translate body; raises RequestError(400) saying what is wrong."""
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not JSON ({exc.__class__.__name__}); send "
                                f'{{"sentences": ["..."]}}') from None
    if not isinstance(request, dict):
        raise RequestError(400, 'the body must be a JSON object like {"sentences": ["..."]}')
    unknown = sorted(set(request) - {"sentences", "beam", "n_best", "alpha", "max_len_ratio"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; use sentences, beam, n_best, alpha, "
                                f"max_len_ratio")
    sentences = request.get("sentences")
    if isinstance(sentences, str):
        sentences = [sentences]
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise RequestError(400, '"sentences" must be a list of strings')
    if len(sentences) > max_sentences:
        raise RequestError(413, f"{len(sentences)} sentences in one request; send at most {max_sentences}")
    if any(len(s) > max_chars for s in sentences):
        raise RequestError(413, f"a sentence is longer than {max_chars} characters; split it")
    beam, n_best = request.get("beam", 5), request.get("n_best", 1)
    alpha, ratio = request.get("alpha", 1.0), request.get("max_len_ratio", 2.0)
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
    return sentences, beam, n_best, float(alpha), float(ratio)


def make_server(translator: Translator, host: str = "127.0.0.1", port: int = 8080, max_body: int = 1 << 20,
                max_sentences: int = 256, max_chars: int = 10_000,
                info: dict[str, Any] | None = None) -> ThreadingHTTPServer:
    """An HTTP server (not started) that answers with ``translator``."""

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
                sentences, beam, n_best, alpha, ratio = parse_request(self.rfile.read(length), max_sentences, max_chars)
                results = translator.translate(sentences, beam, n_best, alpha, ratio)
            except RequestError as exc:
                self._send(exc.status, {"error": str(exc)})
                return
            except Exception as exc:  # a model failure: report it, keep serving
                self._send(500, {"error": f"translation failed: {exc}"})
                return
            if n_best == 1:
                self._send(200, {"translations": [r[0].text for r in results]})
            else:
                self._send(200, {"translations": [[{"text": t.text, "score": round(t.score, 4)} for t in r]
                                                  for r in results]})

    return ThreadingHTTPServer((host, port), Handler)
