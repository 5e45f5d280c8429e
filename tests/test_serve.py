"""The HTTP service: requests batched across clients, grouped by their decoding options, and
bad requests answered with what is wrong."""

import contextlib
import io
import json
import re
import select
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from translate.errors import RequestError, ServiceError
from translate.segment import segment
from translate.serve import (
    MAX_COST,
    Access,
    Busy,
    Job,
    RequestBatcher,
    Response,
    TranslationService,
    load_api_keys,
    make_server,
    parse_request,
    request_cost,
)
from translate.translator import DecodeOptions, Translation, Translator


@pytest.fixture()
def server(tiny_model, tokenizer):
    translator = Translator(tiny_model, tokenizer)
    batcher = RequestBatcher(translator, max_batch=64, max_wait_ms=200)
    log = []
    httpd = make_server(batcher, "127.0.0.1", 0, max_body=4096, max_sentences=8, info={"step": 7},
                        request_timeout=1.0, access_log=log.append, cors="https://example.org")
    batcher.access = log
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", batcher
    httpd.shutdown()
    httpd.server_close()
    batcher.close()


def _post(url, body: bytes):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _all_at_once(fn, count: int) -> list:
    """fn(0) .. fn(count - 1), each on its own thread, started together."""
    answers = [None] * count

    def run(i):
        answers[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_serve_batches_concurrent_requests(server):
    url, batcher = server
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "step": 7, "languages": ["spa", "eng"]}
    sentences = ["El gato come pan.", "El perro bebe agua.", "", "El niño lee el libro.", "Y.", "El sol."]
    answers = _all_at_once(
        lambda i: _post(url + "/translate", json.dumps({"sentences": [sentences[i]], "beam": 3}).encode()),
        len(sentences))
    expected = batcher.translator.translate(sentences, DecodeOptions(beam=3))
    assert [a[1]["translations"][0] for a in answers] == [e[0].text for e in expected]
    assert all(a[0] == 200 for a in answers)
    assert batcher.searches < len(sentences)  # requests shared batches
    status, body = _post(url + "/translate", json.dumps({"sentences": ["El gato."], "beam": 3, "n_best": 2}).encode())
    assert status == 200 and len(body["translations"][0]) == 2 and "score" in body["translations"][0][0]


def test_jobs_with_different_options_are_not_mixed(tiny_model, tokenizer):
    translator = Translator(tiny_model, tokenizer)
    searches = []
    translate = translator.translate

    def recorded(lines, options=None, on_truncate=None, on_progress=None):
        searches.append((sorted(lines), options))
        return translate(lines, options, on_truncate, on_progress)

    translator.translate = recorded
    batcher = RequestBatcher(translator, max_batch=64, max_wait_ms=500)  # one window holds every job
    greedy, beam = DecodeOptions(beam=1), DecodeOptions(beam=3, n_best=2, alpha=0.5)
    jobs = [(["El gato come pan.", "Y."], greedy), (["El perro bebe agua."], beam), (["El sol."], greedy),
            (["El niño lee el libro."], beam)]
    try:
        answers = _all_at_once(lambda i: batcher.translate(*jobs[i]), len(jobs))
    finally:
        batcher.close()
    assert sorted(searches, key=lambda s: s[1].beam) == [
        (sorted(["El gato come pan.", "Y.", "El sol."]), greedy),
        (sorted(["El perro bebe agua.", "El niño lee el libro."]), beam),
    ]
    for (lines, options), answer in zip(jobs, answers):
        assert [[t.text for t in n] for n in answer] == [[t.text for t in n] for n in translate(lines, options)]


def test_parse_request_gives_options_over_the_defaults():
    defaults = DecodeOptions(batch_sentences=4, inter_threads=1)
    sentences, options, scores = parse_request(b'{"sentences": "Hola.", "beam": 3, "alpha": 0}', 8, 100, defaults)
    assert scores is False
    assert sentences == ["Hola."]
    assert options == DecodeOptions(beam=3, alpha=0.0, batch_sentences=4, inter_threads=1)
    assert parse_request(b'{"sentences": []}', 8, 100)[1] == DecodeOptions()
    with pytest.raises(RequestError, match="cannot exceed") as error:
        parse_request(b'{"sentences": ["a"], "n_best": 2}', 8, 100, DecodeOptions(beam=1))
    assert error.value.status == 400


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"sentences": "x", "beem": 3}', 400, "unknown field"),
    (b'{"sentences": [1]}', 400, "list of strings"),
    (b'{"sentences": ["a"], "scores": 1}', 400, '"scores" must be true or false'),
    (b'{"sentences": ["a"], "beam": 0}', 400, '"beam" must be'),
    (b'{"sentences": ["a"], "beam": 2, "n_best": 3}', 400, "cannot exceed"),
    (b'{"sentences": ["a"], "max_len_ratio": 0}', 400, '"max_len_ratio" must be positive'),
    (json.dumps({"sentences": ["a"] * 9}).encode(), 413, "at most 8"),
    (json.dumps({"sentences": ["a" * 5000]}).encode(), 413, "at most 4096"),
])
def test_serve_rejects_bad_requests(server, body, status, message):
    url = server[0]
    got, answer = _post(url + "/translate", body)
    assert got == status and message in answer["error"]
    ok, _ = _post(url + "/translate", b'{"sentences": ["El gato."]}')  # still serving
    assert ok == 200


def _request(url, method="GET", body=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_page_and_the_methods(server):
    url, batcher = server
    status, headers, page = _request(url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<textarea" in page and b"fetch(\"translate\"" in page
    assert b"http://" not in page and b"https://" not in page  # nothing from elsewhere
    assert b'<input id="key" type="password"' in page and b"api_key: key.value" in page  # for --api-keys
    status, headers, body = _request(url + "/translate")
    assert status == 405 and "POST" in headers["Allow"] and b"takes POST" in body
    assert _request(url + "/health", "PUT", b"{}")[0] == 405
    assert _request(url + "/nowhere")[0] == 404
    status, headers, _ = _request(url + "/translate", "OPTIONS")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://example.org"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert any('"GET / HTTP/1.1" 200' in line for line in batcher.access)  # the access log
    assert any('"GET /translate HTTP/1.1" 405' in line for line in batcher.access)


def test_scores_and_attention_for_the_page(server):
    url, batcher = server
    status, body = _post(url + "/translate", json.dumps({"sentences": ["El gato come pan.", "Y."], "beam": 2,
                                                          "scores": True, "attention": True}).encode())
    expected = batcher.translator.translate(["El gato come pan.", "Y."], DecodeOptions(beam=2))
    assert status == 200 and body["scores"] == [round(e[0].score, 4) for e in expected]
    first = body["attention"][0]
    assert len(first["weights"]) == len(first["target"]) == len(expected[0][0].tokens) + 1
    assert all(len(row) == len(first["source"]) for row in first["weights"])
    assert all(abs(sum(row) - 1) < 1e-3 for row in first["weights"])
    assert first["source"][-1] == "</s>" and first["target"][-1] == "</s>"


def test_libretranslate_clients_work(server):
    url, batcher = server
    status, _, body = _request(url + "/languages")
    assert status == 200 and json.loads(body) == [{"code": "es", "name": "Spanish", "targets": ["en"]},
                                                   {"code": "en", "name": "English", "targets": []}]
    expected = [t[0].text for t in batcher.translator.translate(["El gato come pan.", "Y."])]
    status, answer = _post(url + "/translate", json.dumps({"q": "El gato come pan.", "source": "es", "target": "en",
                                                            "format": "text"}).encode())
    assert status == 200 and answer == {"translatedText": expected[0]}
    status, answer = _post(url + "/translate", json.dumps({"q": ["El gato come pan.", "Y."], "source": "auto",
                                                            "target": "eng", "api_key": ""}).encode())
    assert status == 200 and answer == {"translatedText": expected}
    labelled_as_forms = (b'{"q": "El gato come pan.", "source": "es", "target": "en"}',
                         b'{"sentences": ["El gato come pan."]}')
    for body in labelled_as_forms:
        status, _, answer = _request(url + "/translate", "POST", body,  # JSON labelled as a form, as curl -d does
                                     {"Content-Type": "application/x-www-form-urlencoded"})
        answer = json.loads(answer)
        assert status == 200 and (answer.get("translatedText") or answer["translations"][0]) == expected[0]
    form = urllib.parse.urlencode({"q": "El gato come pan.", "source": "es", "target": "en"}).encode()
    status, _, body = _request(url + "/translate", "POST", form,
                               {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and json.loads(body) == {"translatedText": expected[0]}
    status, answer = _post(url + "/translate", json.dumps({"q": "El gato.", "source": "es", "target": "en",
                                                            "alternatives": 2}).encode())
    assert status == 200 and len(answer["alternatives"]) == 2
    for bad, message in (({"q": "x", "source": "fr", "target": "en"}, 'translates from "es"'),
                         ({"q": "x", "source": "es", "target": "de"}, 'translates into "en"'),
                         ({"q": "x", "source": "es", "target": "en", "format": "html"}, "not supported"),
                         ({"q": 3, "source": "es", "target": "en"}, "string or a list")):
        status, answer = _post(url + "/translate", json.dumps(bad).encode())
        assert status == 400 and message in answer["error"], answer


def test_keep_alive_and_clients_that_stall_or_leave(server, capfd):
    import http.client
    import socket

    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    for sentence in ("El gato.", "El perro."):  # two requests on one connection
        connection.request("POST", "/translate", json.dumps({"sentences": [sentence]}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Connection") != "close"
        json.loads(response.read())
    connection.close()
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"sent")  # and no more
    gone = socket.create_connection((host, int(port)))
    gone.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    gone.close()  # leaves mid-body
    ok, _ = _post(url + "/translate", b'{"sentences": ["El sol."]}')  # others are served meanwhile
    assert ok == 200
    stalled.settimeout(10)
    assert stalled.recv(100) == b""  # dropped after the server's 1 s timeout
    stalled.close()
    errors = capfd.readouterr().err
    assert "Traceback" not in errors and "error serving" not in errors


@pytest.fixture()
def service(tiny_model, tokenizer):
    batcher = RequestBatcher(Translator(tiny_model, tokenizer), max_wait_ms=1)
    yield TranslationService(batcher, max_body=4096, max_sentences=8, info={"step": 7}, cors="https://example.org")
    batcher.close()


def _call(service, method, path, body: bytes | None = None, content_type="application/json") -> Response:
    """What the service answers, with no socket: the body from a stream, as a connection gives it."""
    headers = {} if body is None else {"Content-Type": content_type, "Content-Length": str(len(body))}
    return service.respond(method, path, headers, None if body is None else io.BytesIO(body))


def _json(response: Response):
    assert response.content_type == "application/json; charset=utf-8"
    return json.loads(response.body)


def test_the_service_answers_both_apis_without_sockets(service):
    expected = [t[0].text for t in service.batcher.translator.translate(["El gato come pan.", "Y."])]
    own = _call(service, "POST", "/translate", json.dumps({"sentences": ["El gato come pan.", "Y."]}).encode())
    assert own.status == 200 and _json(own) == {"translations": expected}
    assert ("Access-Control-Allow-Origin", "https://example.org") in own.headers and not own.close
    libre = _call(service, "POST", "/translate", json.dumps({"q": "El gato come pan.", "target": "en"}).encode())
    assert libre.status == 200 and _json(libre) == {"translatedText": expected[0]}
    form = urllib.parse.urlencode({"q": ["El gato come pan.", "Y."], "source": "es", "target": "en"}, doseq=True)
    answer = _call(service, "POST", "/translate", form.encode(), "application/x-www-form-urlencoded")
    assert answer.status == 200 and _json(answer) == {"translatedText": expected}
    for body in (b'{"q": "El gato come pan.", "target": "en"}', b'{"sentences": "El gato come pan."}'):
        labelled = _call(service, "POST", "/translate", body, "application/x-www-form-urlencoded")
        assert labelled.status == 200 and expected[0] in json.dumps(_json(labelled), ensure_ascii=False)
    for body in (b'{"sentences": []}', b'{"sentences": [""]}'):  # no sentences, an empty one
        empty = _call(service, "POST", "/translate", body)
        assert empty.status == 200 and _json(empty) == {"translations": [""] * len(json.loads(body)["sentences"])}
    health = _call(service, "GET", "/health?full=1")
    assert _json(health) == {"status": "ok", "step": 7, "languages": ["spa", "eng"]}
    page = _call(service, "HEAD", "/")
    assert page.status == 200 and page.content_type.startswith("text/html") and b"<textarea" in page.body


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/translate", b"{not json", 400, "not JSON"),
    ("POST", "/translate", b'{"sentences": "x", "beem": 3}', 400, "unknown field(s) beem"),
    ("POST", "/translate", b'{"sentences": ["a"], "beam": 65}', 400, '"beam" must be an integer from 1 to 64, not 65'),
    ("POST", "/translate", b'{"sentences": ["a"], "beam": "3"}', 400, '"beam" must be an integer from 1 to 64'),
    ("POST", "/translate", b'{"sentences": ["a"], "alpha": -1}', 400, '"alpha" must be a number from 0 to 100'),
    ("POST", "/translate", b'{"q": "x", "target": "en", "alternatives": 64}', 400, "from 0 to 63"),
    ("POST", "/translate", b"q=x&target=en&beam=3", 400, "unknown field(s) beam"),
    ("POST", "/translate", json.dumps({"sentences": ["a"] * 9}).encode(), 413, "at most 8"),
    ("POST", "/translate", b"x" * 4097, 413, "send at most 4096"),
    ("GET", "/nowhere", None, 404, "no such path /nowhere"),
    ("GET", "/translate", None, 405, "/translate takes POST, not GET"),
    ("DELETE", "/health", None, 405, "/health takes GET, not DELETE"),
    ("POST", "/", b"{}", 405, "/ takes GET, not POST"),
    ("POST", "/translate", None, 411, "send a Content-Length header"),
])
def test_the_service_says_what_is_wrong(service, method, path, body, status, message):
    content_type = "application/x-www-form-urlencoded" if body and body.startswith(b"q=") else "application/json"
    response = _call(service, method, path, body, content_type)
    assert response.status == status and message in _json(response)["error"]
    assert dict(response.headers).get("Allow") == ({"/translate": "POST, OPTIONS"}.get(path, "GET, OPTIONS")
                                                   if status == 405 else None)
    # where the body ends is unknown, or the body was left unread (so it is never read as the next request)
    assert response.close == (status == 411 or b"x" * 4097 == body or (body is not None and status in (404, 405)))


def test_the_service_answers_a_preflight_and_a_client_that_leaves(service):
    preflight = _call(service, "OPTIONS", "/translate")
    assert preflight.status == 204 and preflight.body == b""
    assert dict(preflight.headers) == {"Access-Control-Allow-Origin": "https://example.org", "Vary": "Origin",
                                       "Allow": "POST, OPTIONS", "Access-Control-Allow-Methods": "POST, OPTIONS",
                                       "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "600"}
    cut = service.respond("POST", "/translate", {"Content-Length": "100"}, io.BytesIO(b'{"sent'))
    assert cut is None  # nobody to answer


def test_a_model_failure_is_a_500_that_keeps_its_reason_in_the_log(service, monkeypatch, caplog):
    def fails(*args):
        raise RuntimeError("CUDA error at /home/someone/secret/model.py:12\nsecond line")

    monkeypatch.setattr(service.batcher, "translate", fails)
    response = _call(service, "POST", "/translate", b'{"sentences": ["a"]}')
    assert response.status == 500
    assert _json(response) == {"error": "translation failed: an error on the server (it is in the server's log)"}
    logged = [r.getMessage() for r in caplog.records if r.name == "translate.serve"]
    assert logged == ["translation failed: RuntimeError: CUDA error at /home/someone/secret/model.py:12 second line"]
    assert not any(r.exc_info for r in caplog.records)  # one line, no traceback


def test_a_sentence_without_a_finite_score_is_null_in_strict_json(service, monkeypatch):
    def no_finite_score(sentences, options, deadline=None):
        return [[Translation("", float("-inf"), [])] * options.n_best for _ in sentences]

    monkeypatch.setattr(service.batcher, "translate", no_finite_score)
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} is not JSON")}
    one = _call(service, "POST", "/translate", b'{"sentences": ["a"], "scores": true}')
    assert json.loads(one.body, **strict) == {"translations": [""], "scores": [None]}
    two = _call(service, "POST", "/translate", b'{"sentences": ["a"], "n_best": 2, "beam": 2}')
    assert json.loads(two.body, **strict) == {"translations": [[{"text": "", "score": None}] * 2]}


def test_a_request_may_turn_splitting_off_and_the_page_gets_a_split_line_s_attention(service):
    translator = service.batcher.translator
    line = "El gato come pan. El perro bebe agua."
    default = translator.options.split
    for field, split in ((False, "none"), (True, default), ("sentences", "sentences"), (None, default)):
        body = {"sentences": [line], "attention": True} | ({} if field is None else {"split": field})
        answer = _json(_call(service, "POST", "/translate", json.dumps(body).encode()))
        expected = translator.translate([line], DecodeOptions(split=split, return_attention=True))[0][0]
        assert answer["translations"] == [expected.text]
        attention = answer["attention"][0]
        assert len(attention["source"]) == len(translator.tokenizer.src_pieces(line)) + 1
        assert all(len(row) == len(attention["source"]) for row in attention["weights"])
    whole = translator.translate([line], DecodeOptions(split="none"))[0][0].text
    assert _json(_call(service, "POST", "/translate", json.dumps({"sentences": [line], "split": False}).encode())) \
        == {"translations": [whole]}
    bad = _call(service, "POST", "/translate", json.dumps({"sentences": [line], "split": "words"}).encode())
    assert bad.status == 400
    assert '"split" must be true, false or one of sentences, clauses, phrases, none' in _json(bad)["error"]
    libre = _call(service, "POST", "/translate", json.dumps({"q": line, "target": "en"}).encode())
    assert _json(libre) == {"translatedText": translator.translate([line])[0][0].text}  # the server's default


# Safe to expose: costs, deadlines, connections, framing, what is told, keys and limits


@contextlib.contextmanager
def _serving(tiny_model, tokenizer, **limits):
    """A server on a free port with ``limits`` (make_server's keywords); yields its port."""
    batcher = RequestBatcher(Translator(tiny_model, tokenizer, DecodeOptions(beam=2)), max_wait_ms=1)
    httpd = make_server(batcher, "127.0.0.1", 0, **limits)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        batcher.close()


def _exchange(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Sends ``data`` on a fresh connection and reads until the server closes it (or ``wait`` s)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        return _read_to_close(sock, wait)


def _read_to_close(sock: socket.socket, wait: float) -> bytes:
    sock.settimeout(wait)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def _statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def _post_raw(path: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


def _reference_cost(tokenizer, sentences, options) -> int:
    """beam x output limit x source length, clause by clause, written out plainly."""
    total = 0
    for line in sentences:
        for clause in segment(line, options.split).pieces:
            src = min(len(tokenizer.encode_src([clause])[0]) + 1, options.max_src_len)
            total += options.beam * min(1024, int(src * options.max_len_ratio) + 10) * src
    return total


def test_a_request_s_cost_is_beam_by_output_by_source_length(tiny_model, tokenizer):
    translator = Translator(tiny_model, tokenizer)
    lines = ["El gato come pan.", "", "El perro bebe agua; el niño lee el libro.", "Hola " * 300]
    for options in (DecodeOptions(), DecodeOptions(beam=64, max_len_ratio=100.0), DecodeOptions(split="none", beam=1)):
        assert request_cost(translator, lines, options) == _reference_cost(tokenizer, lines, options)
    assert request_cost(translator, [], DecodeOptions()) == 0


def test_a_costly_request_is_refused_saying_what_to_lower(service):
    long = " ".join(["el gato come pan con el perro"] * 60)
    costly = {"sentences": [long] * 8, "beam": 64, "attention": True, "split": False}  # the 1.3 GB request
    service.max_body = 1 << 20
    response = _call(service, "POST", "/translate", json.dumps(costly).encode())
    assert response.status == 413
    error = _json(response)["error"]
    assert "beam 64 x output length x source length" in error and '"beam" or "max_len_ratio"' in error
    assert f"at most {MAX_COST:,}" in error
    service.max_cost = 5000
    cheap = _call(service, "POST", "/translate", b'{"sentences": ["El gato."], "beam": 2}')
    assert cheap.status == 200
    libre = _call(service, "POST", "/translate", json.dumps({"q": [long], "target": "en", "alternatives": 3}).encode())
    assert libre.status == 413 and 'lower "alternatives"' in _json(libre)["error"]


def test_a_request_waits_no_longer_than_its_deadline_and_is_then_dropped(tiny_model, tokenizer):
    translator = Translator(tiny_model, tokenizer)
    release, searched = threading.Event(), []
    translate = translator.translate

    def blocking(lines, options=None, on_truncate=None, on_progress=None):
        searched.append(list(lines))
        if lines == ["a"]:
            release.wait(30)
        return translate(lines, options, on_truncate, on_progress)

    translator.translate = blocking
    batcher = RequestBatcher(translator, max_wait_ms=1)
    try:
        options = DecodeOptions(beam=1)
        with pytest.raises(Busy, match="did not finish within 0.2 s") as busy:
            batcher.translate(["a"], options, timeout=0.2)  # the worker is held by this search
        assert busy.value.status == 503 and busy.value.retry_after >= 1
        with pytest.raises(Busy):
            batcher.translate(["b"], options, timeout=0.2)  # queued behind it, and given up
        release.set()
        assert batcher.translate(["c"], options, timeout=30)[0][0].text == translate(["c"], options)[0][0].text
    finally:
        release.set()
        batcher.close()
    assert searched == [["a"], ["c"]]  # the job given up while queued was never decoded


def test_a_search_nobody_waits_for_stops_at_its_next_batch(tiny_model, tokenizer, monkeypatch):
    translator = Translator(tiny_model, tokenizer, DecodeOptions(batch_sentences=1, inter_threads=1))
    batcher = RequestBatcher(translator, max_wait_ms=1)
    job = Job(["El gato come pan.", "El perro bebe agua.", "Y."], translator.options)
    job.future.set_running_or_notify_cancel()
    batches = []
    search = translator._search

    def one_batch(src, indices, *rest):
        batches.append(list(indices))
        job.abandoned = True  # its client gives up while the first batch decodes
        return search(src, indices, *rest)

    monkeypatch.setattr(translator, "_search", one_batch)
    try:
        batcher._search([job], translator.options)
    finally:
        batcher.close()
    assert len(batches) == 1  # of three
    assert job.future.exception() is not None and batcher.searches == 0


def test_connections_beyond_the_cap_are_refused_at_once(tiny_model, tokenizer):
    with _serving(tiny_model, tokenizer, max_connections=2, request_timeout=30) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            with socket.create_connection(("127.0.0.1", port)) as extra:
                answer = _read_to_close(extra, 10)
            assert _statuses(answer) == [503] and b"Retry-After: 1" in answer and b"2 connections" in answer
        finally:
            for sock in held:
                sock.close()
        for _ in range(200):  # the held connections' threads end and give their places back
            answer = _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if _statuses(answer) == [200]:
                break
        assert _statuses(answer) == [200]


def test_a_client_trickling_a_request_is_dropped_after_the_timeout(tiny_model, tokenizer, capfd):
    with _serving(tiny_model, tokenizer, request_timeout=1.0) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\n")
            dropped = False
            for _ in range(100):  # a byte every 0.2 s, each well within the 1 s timeout: 20 s in all
                readable, _, _ = select.select([sock], [], [], 0.2)
                if readable:
                    dropped = _read_to_close(sock, 1) == b""
                    break
                try:
                    sock.sendall(b"X")
                except OSError:
                    dropped = True
                    break
        assert dropped
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("method, path", [("POST", "/nowhere"), ("PUT", "/health"), ("POST", "/"),
                                          ("OPTIONS", "/translate"), ("GET", "/health")])
def test_a_body_left_unread_is_never_read_as_the_next_request(tiny_model, tokenizer, method, path):
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
    with _serving(tiny_model, tokenizer, request_timeout=5.0) as port:
        answer = _exchange(port, request + smuggled)
    assert len(_statuses(answer)) == 1 and b"Connection: close" in answer  # one answer, then the connection ends
    assert b'"status": "ok"' not in answer or path == "/health" and method == "GET"


def test_requests_after_an_error_on_a_kept_alive_connection_are_answered_in_turn(tiny_model, tokenizer):
    with _serving(tiny_model, tokenizer, request_timeout=2.0) as port:
        answer = _exchange(port, _post_raw("/translate", b"{not json") + _post_raw("/translate", b'{"sentences": "x"}')
                           + _post_raw("/translate", b'{"sentences": ["El gato."]}', "Connection: close"))
    assert _statuses(answer) == [400, 200, 200]


@pytest.mark.parametrize("headers, status, message", [
    (("Transfer-Encoding: chunked",), 400, b"both Content-Length and Transfer-Encoding"),
    (("Content-Length: 27",), 400, b"one number of bytes"),  # two Content-Lengths
])
def test_a_request_whose_body_s_end_is_ambiguous_is_refused_and_closed(tiny_model, tokenizer, headers, status,
                                                                       message, capfd):
    body = b'{"sentences": ["El gato."]}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if "chunked" in headers[0] else body
    request = _post_raw("/translate", chunked, *headers)
    with _serving(tiny_model, tokenizer, request_timeout=5.0) as port:
        answer = _exchange(port, request + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        only_chunked = _exchange(port, b"POST /translate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + chunked)
    assert _statuses(answer) == [status] and message in answer and b"Connection: close" in answer
    assert _statuses(only_chunked) == [411] and b"Connection: close" in only_chunked
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("body", [b"[" * 5000 + b"]" * 5000, b'{"q": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                  b'{"sentences": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001],
                         ids=["arrays", "libretranslate", "objects"])
def test_deeply_nested_json_is_a_400(service, body):
    service.max_body = 1 << 16
    response = _call(service, "POST", "/translate", body)
    assert response.status == 400 and "nested too deeply" in _json(response)["error"]


def test_the_depth_limit_is_the_server_s_own_and_brackets_in_strings_do_not_count(service):
    from translate.serve import MAX_JSON_DEPTH

    service.max_body = 1 << 16
    deep = b'{"sentences": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"  # one past the limit
    response = _call(service, "POST", "/translate", deep)
    assert response.status == 400 and "nested too deeply" in _json(response)["error"]
    brackets = '[{\\"[' * 1000  # in a string, with an escaped quote: text, not nesting
    response = _call(service, "POST", "/translate", json.dumps({"sentences": [brackets]}).encode())
    assert response.status == 200 and len(_json(response)["translations"]) == 1


def test_a_body_is_parsed_once_in_either_api(service, monkeypatch):
    from translate import serve

    parsed = []
    real = serve._loads
    monkeypatch.setattr(serve, "_loads", lambda body: parsed.append(body) or real(body))
    service.max_body = 1 << 16
    for body in (b'{"sentences": ["Hola."]}', b'{"q": "Hola.", "source": "es", "target": "en"}'):
        parsed.clear()
        response = _call(service, "POST", "/translate", body)
        assert response.status == 200 and parsed == [body]
    parsed.clear()  # not an object: refused as before, the second parse saying why
    response = _call(service, "POST", "/translate", b'["Hola."]')
    assert response.status == 400 and "JSON object" in _json(response)["error"] and len(parsed) == 2


def test_health_names_the_model_by_its_file_name_only(tiny_model, tokenizer, tiny_config, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from translate import cli, serve

    translator = Translator(tiny_model, tokenizer)
    translator.config, translator.progress = tiny_config, {"step": 7}
    monkeypatch.setattr(cli, "_load_translator", lambda *args: translator)
    made = {}

    class Stopped:
        server_address = ("127.0.0.1", 8080)

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            pass

    def capture(batcher, host, port, **kwargs):
        made.update(kwargs)
        return Stopped()

    monkeypatch.setattr(serve, "make_server", capture)
    checkpoint = tmp_path / "secret-dir" / "best.pt"
    keys = tmp_path / "keys.txt"
    keys.write_text("# who\nk1\nk2 120\n", encoding="utf-8")
    result = CliRunner().invoke(cli.main, ["serve", str(checkpoint), "--api-keys", str(keys), "--req-limit", "30",
                                           "--char-limit", "500", "--max-connections", "7", "--deadline", "9"])
    assert result.exit_code == 0, result.output
    assert made["info"] == {"model": "best.pt", "step": 7}
    assert str(tmp_path) not in json.dumps(made["info"])
    assert (made["max_connections"], made["char_limit"], made["deadline"]) == (7, 500, 9.0)
    assert made["access"].keys == {"k1": None, "k2": 120} and made["access"].req_limit == 30
    missing = CliRunner().invoke(cli.main, ["serve", str(checkpoint), "--api-keys", str(tmp_path / "none.txt")])
    assert missing.exit_code == 2 and "cannot read the API keys" in missing.output and "Traceback" not in missing.output


def test_api_keys_are_read_from_a_file_that_says_where_it_is_wrong(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("\n# the team\nabc\n  def 60  \n", encoding="utf-8")
    assert load_api_keys(keys) == {"abc": None, "def": 60}
    keys.write_text("abc\nsecret-key 60 extra\n", encoding="utf-8")
    with pytest.raises(ServiceError, match="line 2: write a key") as error:
        load_api_keys(keys)
    assert "secret-key" not in str(error.value)
    keys.write_text("# none\n", encoding="utf-8")
    with pytest.raises(ServiceError, match="holds no API keys"):
        load_api_keys(keys)


def test_api_keys_let_in_only_their_holders_as_libretranslate_does(service):
    service.access = Access({"good": None})
    cases = [(b'{"q": "El gato.", "target": "en"}', 403, "Please contact the server operator to get an API key"),
             (b'{"q": "El gato.", "target": "en", "api_key": "bad"}', 403, "Invalid API key"),
             (b'{"sentences": ["El gato."], "api_key": ["good"]}', 403, "Invalid API key"),
             (b"q=El+gato.&target=en&api_key=bad", 403, "Invalid API key"),
             (b'{"q": "El gato.", "target": "en", "api_key": "good"}', 200, None),
             (b'{"sentences": ["El gato."], "api_key": "good"}', 200, None),
             (b"q=El+gato.&target=en&api_key=good", 200, None)]
    for body, status, error in cases:
        content_type = "application/x-www-form-urlencoded" if body.startswith(b"q=") else "application/json"
        response = _call(service, "POST", "/translate", body, content_type)
        assert response.status == status, body
        assert error is None or _json(response) == {"error": error}
    assert _call(service, "GET", "/health").status == 200  # only translation needs a key


def test_each_client_gets_its_requests_per_minute_then_429_with_retry_after(service):
    now = [1000.0]
    service.access = Access({"vip": 3, "plain": None}, req_limit=2, clock=lambda: now[0])

    def ask(client, key="plain"):
        body = json.dumps({"sentences": ["Y."], "api_key": key}).encode()
        return service.respond("POST", "/translate", {"Content-Type": "application/json",
                                                      "Content-Length": str(len(body))}, io.BytesIO(body), client)

    assert [ask("10.0.0.1").status for _ in range(2)] == [200, 200]
    now[0] += 20
    refused = ask("10.0.0.1")
    assert refused.status == 429 and _json(refused) == {"error": "Slowdown: 2 per 1 minute"}
    assert ("Retry-After", "40") in refused.headers
    assert ask("10.0.0.2").status == 200  # another client has its own minute
    assert [ask("10.0.0.3", "vip").status for _ in range(4)] == [200, 200, 200, 429]  # the key's own limit
    now[0] += 40.5
    assert ask("10.0.0.1").status == 200  # the first two have left the minute


def test_a_request_over_the_character_limit_is_a_400_as_libretranslate_says_it(service):
    service.char_limit = 10
    for body in (b'{"q": ["El gato.", "Y el pan."], "target": "en"}', b'{"sentences": ["El gato.", "Y el pan."]}'):
        response = _call(service, "POST", "/translate", body)
        assert response.status == 400
        assert _json(response) == {"error": "Invalid request: request (17) exceeds text limit (10)"}
    assert _call(service, "POST", "/translate", b'{"sentences": ["El gato."]}').status == 200


def test_a_request_past_its_deadline_is_a_503_with_retry_after(service, monkeypatch):
    release = threading.Event()
    translate = service.batcher.translator.translate

    def held(lines, options=None, on_truncate=None, on_progress=None):
        release.wait(30)
        return translate(lines, options, on_truncate, on_progress)

    monkeypatch.setattr(service.batcher.translator, "translate", held)
    service.deadline = 0.2
    try:
        response = _call(service, "POST", "/translate", b'{"q": "El gato.", "target": "en"}')
    finally:
        release.set()
    assert response.status == 503 and ("Retry-After", "5") in response.headers and not response.close
    assert _json(response)["error"].startswith("the translation did not finish within 0.2 s (the server is busy)")
