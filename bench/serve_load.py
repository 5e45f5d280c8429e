"""Load on ``translate serve``, calm and under attack: N well-behaved clients on localhost, first
alone, then while hostile clients attack the same server, and how their latency compares.

Each well-behaved client sends one sentence a request (a sentence of the bundled test split, in
turn, with a valid API key) on a keep-alive connection and waits for the answer. The hostile
clients, in the second phase:
- stalled: send half a request and wait (dropped after the server's --timeout);
- slow senders: send a request a byte every --trickle seconds, each byte well within the timeout
  (dropped once the request as a whole has taken longer than the timeout);
- oversized bodies (413 at once), and oversized beams: 64 long sentences at beam 64 with
  attention, the issue's 1.3 GB request (413 by the cost budget);
- bad keys (403);
- pipelined: a request with a body on a path that does not take one, with another request in
  that body and one more after it on the same connection (exactly one answer, 404, and the
  connection closed), and a bad request followed by a good one (400 then 200, in turn).
Hostile clients pause --pause seconds between attempts (they share the process, and its
interpreter lock, with the server and the good clients). Any answer other than the expected one
is an error. Prints requests/s, p50/p99 latency, errors and what the hostile clients got, and the
ratio of the good clients' p50 and p99 under attack to calm (the target: within 2x, with 0 errors
for good clients); writes JSON.

    python bench/serve_load.py checkpoints/default --clients 16 --seconds 30
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from translate.corpus import read_parallel
from translate.runtime import configure_process
from translate.serve import Access, RequestBatcher, make_server
from translate.translator import DecodeOptions, Translator

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"


class Tally:
    """What the clients of one phase got: the good clients' latencies and errors, and counts by name."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.counts: dict[str, int] = {"good_errors": 0, "hostile_errors": 0}

    def add(self, name: str, count: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + count

    def good(self, seconds: float | None) -> None:
        with self.lock:
            if seconds is None:
                self.counts["good_errors"] += 1
            else:
                self.latencies.append(seconds)


def good_client(port: int, sentences: list[str], start: int, stop: float, tally: Tally) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = start
    while time.monotonic() < stop:
        body = json.dumps({"sentences": [sentences[i % len(sentences)]], "api_key": KEY})
        began = time.monotonic()
        try:
            connection.request("POST", "/translate", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            error = None if response.status == 200 and isinstance(answer.get("translations"), list) else \
                f"status {response.status}: {answer}"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        if error is not None:
            print(f"good client: {error}", file=sys.stderr)
        tally.good(time.monotonic() - began if error is None else None)
        i += 7
    connection.close()


def _read_to_close(sock: socket.socket, wait: float) -> bytes:
    sock.settimeout(wait)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except OSError:
        pass
    return got


def _statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def _post(path: str, body: bytes) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n" \
        .encode() + body


def stalled(port: int, timeout: float, tally: Tally) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b'POST /translate HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"sentences": ["')
        tally.add("stalled_dropped" if _read_to_close(sock, 3 * timeout + 10) == b"" else "hostile_errors")


def slow_sender(port: int, timeout: float, trickle: float, tally: Tally) -> None:
    request = _post("/translate", json.dumps({"sentences": ["Hola."], "api_key": KEY}).encode())
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                time.sleep(trickle)
                if time.monotonic() - began > 3 * timeout + 10:
                    break
        except OSError:  # dropped, as it should be
            tally.add("slow_dropped")
            return
        tally.add("slow_dropped" if not _statuses(_read_to_close(sock, 1)) else "hostile_errors")


def oversized_body(port: int, max_body: int, tally: Tally) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/translate", b"x" * (max_body + 1), {"Content-Type": "application/json"})
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException):
        status = 0
    connection.close()
    tally.add("body_413" if status == 413 else "hostile_errors")


def _one_request(port: int, body: dict) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/translate", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        connection.close()


def oversized_beam(port: int, long_sentence: str, tally: Tally) -> None:
    body = {"sentences": [long_sentence] * 64, "beam": 64, "attention": True, "split": False, "api_key": KEY}
    tally.add("beam_413" if _one_request(port, body) == 413 else "hostile_errors")


def bad_key(port: int, tally: Tally) -> None:
    body = {"q": "Hola.", "source": "es", "target": "en", "api_key": "not-a-key"}
    tally.add("key_403" if _one_request(port, body) == 403 else "hostile_errors")


def pipelined(port: int, tally: Tally) -> None:
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    good = json.dumps({"sentences": ["Hola."], "api_key": KEY}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_post("/nowhere", smuggled) + _post("/translate", good))
        statuses = _statuses(_read_to_close(sock, 30))
    tally.add("pipelined_404_closed" if statuses == [404] else "hostile_errors")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        last = _post("/translate", good).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
        bad = json.dumps({"sentences": [1], "api_key": KEY}).encode()
        sock.sendall(_post("/translate", bad) + last)
        statuses = _statuses(_read_to_close(sock, 30))
    tally.add("pipelined_400_then_200" if statuses == [400, 200] else "hostile_errors")


def repeat(attack, stop: float, pause: float, *args) -> None:
    while time.monotonic() < stop:
        attack(*args)
        time.sleep(pause)


def run_phase(port: int, sentences: list[str], args, hostile: bool) -> tuple[Tally, float]:
    tally = Tally()
    stop = time.monotonic() + args.seconds
    good = [threading.Thread(target=good_client, args=(port, sentences, i, stop, tally)) for i in range(args.clients)]
    threads: list[threading.Thread] = []
    if hostile:
        long_sentence = " ".join(sentences[:40])
        attacks = [(stalled, port, args.timeout, tally)] * args.stalled
        attacks += [(slow_sender, port, args.timeout, args.trickle, tally)] * args.slow
        attacks += [(oversized_body, port, 1 << 16, tally)] * args.oversized
        attacks += [(oversized_beam, port, long_sentence, tally)] * args.beams
        attacks += [(bad_key, port, tally)] * args.bad_keys
        attacks += [(pipelined, port, tally)] * args.pipelined
        threads += [threading.Thread(target=repeat, args=(attack[0], stop, args.pause, *attack[1:]))
                    for attack in attacks]
    began = time.monotonic()
    for thread in good + threads:
        thread.start()
    for thread in good:
        thread.join()
    elapsed = time.monotonic() - began  # the good clients' time (a hostile one may still wait to be dropped)
    for thread in threads:
        thread.join()
    return tally, elapsed


def figures(tally: Tally, elapsed: float) -> dict:
    latencies = sorted(tally.latencies)
    return {"seconds": round(elapsed, 1), "requests": len(latencies),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
            **dict(sorted(tally.counts.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--clients", type=int, default=16, help="well-behaved concurrent clients")
    parser.add_argument("--stalled", type=int, default=4, help="clients that stall mid-body")
    parser.add_argument("--slow", type=int, default=4, help="clients that send a byte every --trickle seconds")
    parser.add_argument("--oversized", type=int, default=2, help="clients that send too large a body")
    parser.add_argument("--beams", type=int, default=2, help="clients that ask for too costly a search")
    parser.add_argument("--bad-keys", type=int, default=2, help="clients with a wrong API key")
    parser.add_argument("--pipelined", type=int, default=2, help="clients that pipeline requests after an error")
    parser.add_argument("--seconds", type=float, default=30.0, help="each phase's length")
    parser.add_argument("--timeout", type=float, default=2.0, help="the server's --timeout")
    parser.add_argument("--trickle", type=float, default=0.5, help="seconds between a slow sender's bytes")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds a hostile client waits between attempts")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                        help="as `translate serve` decodes (auto: its default)")
    parser.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    args = parser.parse_args()
    configure_process()

    translator = Translator.load(args.checkpoint, DecodeOptions(beam=args.beam), args.precision)
    batcher = RequestBatcher(translator, max_batch=64, max_wait_ms=10)
    server = make_server(batcher, "127.0.0.1", 0, max_body=1 << 16, request_timeout=args.timeout,
                         languages=(translator.config.data.src_lang, translator.config.data.tgt_lang),
                         access=Access({KEY: None}))
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sentences = read_parallel(str(ROOT / "translate" / "bundled" / "test.tsv"), "spa", "eng", "test").src

    calm = figures(*run_phase(port, sentences, args, hostile=False))
    attacked = figures(*run_phase(port, sentences, args, hostile=True))
    server.shutdown()
    server.server_close()
    batcher.close()

    ratio = {f"{k}_ratio": round(attacked[k] / calm[k], 2) if calm[k] and attacked[k] else None
             for k in ("p50_ms", "p99_ms")}
    result = {"clients": args.clients, "beam": args.beam, "precision": translator.precision,
              "timeout_s": args.timeout, "hostile": {name: getattr(args, name) for name in
                                                     ("stalled", "slow", "oversized", "beams", "bad_keys",
                                                      "pipelined")},
              "calm": calm, "under_attack": attacked, **ratio,
              "within_2x": all(r is not None and r <= 2 for r in ratio.values()),
              "good_errors": calm["good_errors"] + attacked["good_errors"],
              "hostile_errors": attacked["hostile_errors"]}
    print(f"{'':<24}{'calm':>12}{'under attack':>16}")
    for key in sorted(set(calm) | set(attacked)):
        print(f"{key:<24}{str(calm.get(key, '-')):>12}{str(attacked.get(key, '-')):>16}")
    for key in ("p50_ms_ratio", "p99_ms_ratio", "within_2x", "good_errors", "hostile_errors"):
        print(f"{key:<24}{result[key]!s:>12}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if result["good_errors"] or result["hostile_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
