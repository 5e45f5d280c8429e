"""The HTTP service: requests batched across clients, grouped by their decoding options, and
bad requests answered with what is wrong."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from translate.errors import RequestError
from translate.serve import RequestBatcher, make_server, parse_request
from translate.translator import DecodeOptions, Translator


@pytest.fixture()
def server(tiny_model, tokenizer):
    translator = Translator(tiny_model, tokenizer)
    batcher = RequestBatcher(translator, max_batch=64, max_wait_ms=200)
    httpd = make_server(batcher, "127.0.0.1", 0, max_body=4096, max_sentences=8, info={"step": 7})
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
        assert json.loads(response.read()) == {"status": "ok", "step": 7}
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
    sentences, options = parse_request(b'{"sentences": "Hola.", "beam": 3, "alpha": 0}', 8, 100, defaults)
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
