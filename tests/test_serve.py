"""The HTTP service: requests batched across clients, grouped by their decoding options, and
bad requests answered with what is wrong."""

import io
import json
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from translate.errors import RequestError
from translate.serve import RequestBatcher, Response, TranslationService, make_server, parse_request
from translate.translator import DecodeOptions, Translator


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

    def recorded(lines, options=None, on_truncate=None):
        searches.append((sorted(lines), options))
        return translate(lines, options, on_truncate)

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
    assert response.close == (status == 411 or b"x" * 4097 == body)  # where the body ends is unknown


def test_the_service_answers_a_preflight_and_a_client_that_leaves(service):
    preflight = _call(service, "OPTIONS", "/translate")
    assert preflight.status == 204 and preflight.body == b""
    assert dict(preflight.headers) == {"Access-Control-Allow-Origin": "https://example.org", "Vary": "Origin",
                                       "Allow": "POST, OPTIONS", "Access-Control-Allow-Methods": "POST, OPTIONS",
                                       "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "600"}
    cut = service.respond("POST", "/translate", {"Content-Length": "100"}, io.BytesIO(b'{"sent'))
    assert cut is None  # nobody to answer


def test_a_model_failure_is_a_500_and_the_service_goes_on(service, monkeypatch):
    monkeypatch.setattr(service.batcher, "translate", lambda *args: 1 / 0)
    response = _call(service, "POST", "/translate", b'{"sentences": ["a"]}')
    assert response.status == 500 and _json(response) == {"error": "translation failed: division by zero"}


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
    assert '"split" must be true, false or one of sentences, clauses, none' in _json(bad)["error"]
    libre = _call(service, "POST", "/translate", json.dumps({"q": line, "target": "en"}).encode())
    assert _json(libre) == {"translatedText": translator.translate([line])[0][0].text}  # the server's default
