"""Model tools: checkpoint info and averaging."""

import json

import pytest
import torch
from click.testing import CliRunner

from translate.checkpoint import load_checkpoint, load_model
from translate.cli import main

from .conftest import tiny_overrides


@pytest.fixture(scope="module")
def run_with_steps(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("avg") / "run"
    args = ["train", "--train", str(corpus["train"]), "--dev", str(corpus["dev"]), "--run-dir", str(run_dir),
            "--max-steps", "30"]
    for key, value in {**tiny_overrides(corpus), "train.eval_every": 10, "train.keep_checkpoints": 2}.items():
        if key not in ("data.train", "data.dev", "train.max_steps"):
            args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return run_dir


def test_keep_checkpoints_keeps_the_newest(run_with_steps):
    assert sorted(p.name for p in run_with_steps.glob("step-*.pt")) == ["step-20.pt", "step-30.pt"]
    light = load_checkpoint(run_with_steps / "step-20.pt")
    assert "optimizer" not in light and light["progress"]["step"] == 20
    load_model(run_with_steps / "step-20.pt")  # decodable on its own


def test_average_is_the_mean_of_the_weights(run_with_steps, tmp_path):
    out = tmp_path / "avg.pt"
    result = CliRunner().invoke(main, ["average", str(run_with_steps), "--last", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "averaged 2 checkpoints (step-20.pt, step-30.pt)" in result.output
    a, b = (load_checkpoint(run_with_steps / f"step-{n}.pt")["model"] for n in (20, 30))
    averaged = load_checkpoint(out)["model"]
    for name, value in averaged.items():
        torch.testing.assert_close(value, (a[name] + b[name]) / 2, msg=name)
    model, _, _, _ = load_model(out)
    decoded = CliRunner().invoke(main, ["decode", str(out), "--beam", "2"], input="El gato come pan.\n")
    assert decoded.exit_code == 0 and decoded.output.strip()


def test_average_without_step_checkpoints_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["average", str(tmp_path)])
    assert result.exit_code == 2 and "train.keep_checkpoints" in result.output and "Traceback" not in result.output


def test_info_text_and_json(run_with_steps):
    text = CliRunner().invoke(main, ["info", str(run_with_steps)])
    assert text.exit_code == 0, text.output
    assert "parameters" in text.output and "best dev BLEU" in text.output and "lstm" in text.output
    raw = CliRunner().invoke(main, ["info", str(run_with_steps / "last.pt"), "--json"])
    details = json.loads(raw.output)
    assert details["step"] == 30 and details["parameters"] > 0 and details["config"]["train"]["keep_checkpoints"] == 2
    assert details["src_vocab"] == details["tgt_vocab"] and details["joint_vocab"] is True


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("translate, version ")


@pytest.fixture()
def server(run_with_steps):
    import threading

    from translate.serve import Translator, make_server

    model, tokenizer, _, _ = load_model(run_with_steps)
    translator = Translator(model, tokenizer, max_batch=64, max_wait_ms=200)
    httpd = make_server(translator, "127.0.0.1", 0, max_body=4096, max_sentences=8)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", translator, model, tokenizer
    httpd.shutdown()
    httpd.server_close()
    translator.close()


def _post(url, body: bytes):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_batches_concurrent_requests(server):
    import threading
    import urllib.request

    from translate.search import translate_lines

    url, translator, model, tokenizer = server
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    sentences = ["El gato come pan.", "El perro bebe agua.", "", "El niño lee el libro.", "Y.", "El sol."]
    answers = [None] * len(sentences)

    def ask(i):
        answers[i] = _post(url + "/translate", json.dumps({"sentences": [sentences[i]], "beam": 3}).encode())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(sentences))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = translate_lines(model, tokenizer, sentences, beam=3)
    assert [a[1]["translations"][0] for a in answers] == [e[0].text for e in expected]
    assert all(a[0] == 200 for a in answers)
    assert translator.searches < len(sentences)  # requests shared batches
    status, body = _post(url + "/translate", json.dumps({"sentences": ["El gato."], "beam": 3, "n_best": 2}).encode())
    assert status == 200 and len(body["translations"][0]) == 2 and "score" in body["translations"][0][0]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"sentences": "x", "beem": 3}', 400, "unknown field"),
    (b'{"sentences": [1]}', 400, "list of strings"),
    (b'{"sentences": ["a"], "beam": 0}', 400, '"beam" must be'),
    (b'{"sentences": ["a"], "beam": 2, "n_best": 3}', 400, "cannot exceed"),
    (json.dumps({"sentences": ["a"] * 9}).encode(), 413, "at most 8"),
    (json.dumps({"sentences": ["a" * 5000]}).encode(), 413, "at most 4096"),
])
def test_serve_rejects_bad_requests(server, body, status, message):
    url = server[0]
    got, answer = _post(url + "/translate", body)
    assert got == status and message in answer["error"]
    ok, _ = _post(url + "/translate", b'{"sentences": ["El gato."]}')  # still serving
    assert ok == 200


def test_quiet_and_verbose_training(corpus, tmp_path):
    base = ["train", "--train", str(corpus["train"]), "--dev", str(corpus["dev"]), "--max-steps", "2"]
    for key, value in tiny_overrides(corpus).items():
        if key not in ("data.train", "data.dev", "train.max_steps"):
            base += ["--set", f"{key}={value}"]
    quiet = CliRunner().invoke(main, ["--quiet", *base, "--run-dir", str(tmp_path / "q")])
    assert quiet.exit_code == 0, quiet.output
    assert "done:" in quiet.output and "training pairs" not in quiet.output
    verbose = CliRunner().invoke(main, ["--verbose", *base, "--run-dir", str(tmp_path / "v")])
    assert verbose.exit_code == 0 and "configuration:" in verbose.output and "hidden_dim: 32" in verbose.output
    normal = CliRunner().invoke(main, [*base, "--run-dir", str(tmp_path / "n")])
    assert "training pairs" in normal.output and "configuration:" not in normal.output


def test_plot_and_attend_write_pngs(run_with_steps, tmp_path):
    curves = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(run_with_steps), "-o", str(curves)])
    assert result.exit_code == 0, result.output
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000
    heat = tmp_path / "attn.png"
    result = CliRunner().invoke(main, ["attend", str(run_with_steps), "El gato come pan.", "-o", str(heat)])
    assert result.exit_code == 0, result.output
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(main, ["plot", str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert missing.exit_code == 2 and "no metrics file" in missing.output


def test_tensorboard_event_files(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "--train", str(corpus["train"]), "--dev", str(corpus["dev"]), "--max-steps", "10",
            "--run-dir", str(tmp_path / "tb"), "--set", "train.tensorboard=true", "--set", "train.eval_every=5"]
    for key, value in tiny_overrides(corpus).items():
        if key not in ("data.train", "data.dev", "train.max_steps", "train.eval_every"):
            args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/tf_ratio", "dev/dev_bleu", "dev/dev_loss"} <= tags
    assert [e.step for e in events.Scalars("dev/dev_bleu")] == [5, 10]
