"""Load on ``translate serve``: N concurrent clients on localhost for a fixed time.

Each well-behaved client sends one sentence a request (a sentence of the bundled test split, in
turn) on a keep-alive connection and waits for the answer. Mixed in: clients that stall mid-body
(they hold a connection until the server's timeout drops them, then start again) and clients
that send bodies over the limit (they must get 413 at once). Prints requests/s, sentences/s,
p50/p99 latency and errors (any answer other than the expected one), and writes JSON.

    python bench/serve_load.py checkpoints/default --clients 16 --seconds 30
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from translate.corpus import read_parallel
from translate.runtime import configure_process
from translate.serve import RequestBatcher, make_server
from translate.translator import DecodeOptions, Translator

ROOT = Path(__file__).resolve().parents[1]


def good_client(port: int, sentences: list[str], start: int, stop: float, out: dict) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = start
    while time.monotonic() < stop:
        body = json.dumps({"sentences": [sentences[i % len(sentences)]]})
        began = time.monotonic()
        try:
            connection.request("POST", "/translate", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            ok = response.status == 200 and isinstance(answer.get("translations"), list)
        except (OSError, http.client.HTTPException, ValueError):
            ok = False
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        with out["lock"]:
            if ok:
                out["latencies"].append(time.monotonic() - began)
            else:
                out["errors"] += 1
        i += 7
    connection.close()


def stalled_client(port: int, stop: float, out: dict) -> None:
    while time.monotonic() < stop:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b'POST /translate HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"sentences": ["')
            sock.settimeout(120)
            try:
                dropped = sock.recv(100) == b""
            except OSError:
                dropped = True
        with out["lock"]:
            out["stalls_dropped" if dropped else "errors"] += 1


def oversized_client(port: int, stop: float, max_body: int, out: dict) -> None:
    while time.monotonic() < stop:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request("POST", "/translate", b"x" * (max_body + 1), {"Content-Type": "application/json"})
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException):
            status = 0
        connection.close()
        with out["lock"]:
            out["rejected_413" if status == 413 else "errors"] += 1
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--clients", type=int, default=16, help="well-behaved concurrent clients")
    parser.add_argument("--stalled", type=int, default=4, help="clients that stall mid-body")
    parser.add_argument("--oversized", type=int, default=2, help="clients that send too large a body")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=2.0, help="the server's --timeout")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                        help="as `translate serve` decodes (auto: its default)")
    parser.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    args = parser.parse_args()
    configure_process()

    translator = Translator.load(args.checkpoint, DecodeOptions(beam=args.beam), args.precision)
    batcher = RequestBatcher(translator, max_batch=64, max_wait_ms=10)
    max_body = 1 << 16
    server = make_server(batcher, "127.0.0.1", 0, max_body=max_body, request_timeout=args.timeout,
                         languages=(translator.config.data.src_lang, translator.config.data.tgt_lang))
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sentences = read_parallel(str(ROOT / "translate" / "bundled" / "test.tsv"), "spa", "eng", "test").src

    out = {"lock": threading.Lock(), "latencies": [], "errors": 0, "stalls_dropped": 0, "rejected_413": 0}
    stop = time.monotonic() + args.seconds
    threads = [threading.Thread(target=good_client, args=(port, sentences, i, stop, out)) for i in range(args.clients)]
    threads += [threading.Thread(target=stalled_client, args=(port, stop, out)) for _ in range(args.stalled)]
    threads += [threading.Thread(target=oversized_client, args=(port, stop, max_body, out))
                for _ in range(args.oversized)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    server.shutdown()
    server.server_close()
    batcher.close()

    latencies = sorted(out["latencies"])
    figures = {
        "clients": args.clients, "stalled_clients": args.stalled, "oversized_clients": args.oversized,
        "seconds": round(elapsed, 1), "beam": args.beam, "precision": translator.precision,
        "requests": len(latencies), "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
        "batched_searches": batcher.searches, "stalls_dropped": out["stalls_dropped"],
        "rejected_413": out["rejected_413"], "errors": out["errors"],
    }
    for key, value in figures.items():
        print(f"{key:<20} {value}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    if out["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
