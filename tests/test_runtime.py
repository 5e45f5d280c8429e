import logging
import os
import subprocess
import sys

import pytest
import torch

from translate import runtime
from translate.errors import ConfigError

CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def _run(code: str, **extra: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in CACHES}
    env.update(extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.slow  # a fresh interpreter each
def test_importing_the_package_leaves_the_environment_alone():
    code = ("import logging, os, sys; before = dict(os.environ); import translate.cli, translate.build, "
            "translate.serve; package = logging.getLogger('translate'); "
            "print(dict(os.environ) == before, package.handlers == [] and package.level == logging.NOTSET)")
    assert _run(code) == ["True", "True"]


@pytest.mark.slow  # a fresh interpreter each
def test_cpu_caches_are_bounded_by_the_setup_call_unless_the_user_says_otherwise():
    code = ("import os; from translate.runtime import configure_process; configure_process(); "
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])")
    assert _run(code) == ["128", "128"]
    assert _run(code, LRU_CACHE_CAPACITY="7") == ["128", "7"]


@pytest.mark.slow  # a fresh interpreter each
def test_the_command_line_sets_the_bounds(tmp_path):
    code = ("import os, sys; from click.testing import CliRunner; from translate.cli import main; "
            "CliRunner().invoke(main, ['info', 'no-such-checkpoint']); print(os.environ.get('LRU_CACHE_CAPACITY'))")
    assert _run(code) == ["128"]


@pytest.mark.parametrize("capability,auto", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                             ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_gpus_get_bf16_only_where_it_is_native(monkeypatch, capability, auto):
    """torch.cuda.is_bf16_supported() is true on a V100 or T4 too, where bf16 is emulated."""
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.amp_dtype(gpu) is auto and runtime.amp_dtype(gpu, "fp16") is torch.float16
    assert runtime.amp_dtype(gpu, "off") is None
    if auto is torch.float16:
        with pytest.raises(ConfigError, match="no native bf16"):
            runtime.amp_dtype(gpu, "bf16")
    else:
        assert runtime.amp_dtype(gpu, "bf16") is torch.bfloat16


def test_amp_dtype_and_devices(monkeypatch):
    cpu = torch.device("cpu")
    assert runtime.amp_dtype(cpu, "off") is None and runtime.amp_dtype(cpu, False) is None
    monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda: True)
    assert runtime.amp_dtype(cpu) is torch.bfloat16 and runtime.amp_dtype(cpu, True) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda: False)
    assert runtime.amp_dtype(cpu) is None
    assert runtime.amp_dtype(cpu, "bf16") is torch.bfloat16  # asked for: emulated, but it runs
    with pytest.raises(ConfigError, match="train.amp=fp16 needs a CUDA GPU"):
        runtime.amp_dtype(cpu, "fp16")
    assert runtime.select_device("cpu") == cpu
    assert runtime.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bf16_seconds, fp32_seconds, pays", [(1.0, 2.0, True), (2.0, 1.0, False),
                                                              (0.9, 1.0, False)])  # within the margin: fp32
def test_cpu_autocast_is_bf16_only_where_it_measures_faster(monkeypatch, bf16_seconds, fp32_seconds, pays):
    """Some CPUs with AVX512-BF16 multiply bf16 at half fp32's rate: the flags decide nothing alone."""
    timed = []

    def seconds(dtype):
        timed.append(dtype)
        return bf16_seconds if dtype is torch.bfloat16 else fp32_seconds

    monkeypatch.setattr(runtime, "_matmul_seconds", seconds)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    runtime.cpu_bf16_pays.cache_clear()
    try:
        assert runtime.cpu_bf16_pays() is pays and runtime.cpu_bf16_pays() is pays
        assert len(timed) == 2  # timed once per process
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
        runtime.cpu_bf16_pays.cache_clear()
        assert runtime.cpu_bf16_pays() is False and len(timed) == 2  # no bf16 units: nothing to time
    finally:
        runtime.cpu_bf16_pays.cache_clear()


def test_the_matmul_timing_measures_something():
    assert 0 < runtime._matmul_seconds(torch.float32) < 10


def test_rng_state_round_trip():
    cpu = torch.device("cpu")
    runtime.seed_everything(3)
    state = runtime.rng_state(cpu)
    first = torch.rand(3)
    runtime.set_rng_state(state, cpu)
    assert torch.equal(torch.rand(3), first)


def test_the_package_needs_a_recent_enough_torch():
    import translate

    assert translate._release("2.13.0+cpu") == (2, 13) and translate._release("2.4.1") == (2, 4)
    assert translate._release("2.10.0a0+git1234") == (2, 10)
    assert translate._release("2.3.1") < translate.MIN_TORCH <= translate._release("2.4.0")


@pytest.mark.slow  # a fresh interpreter
def test_an_old_torch_is_a_one_line_import_error():
    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda name: '2.2.0' if name == 'torch' else real(name); "
            "import translate")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError: translate needs torch >= 2.4, found 2.2.0; upgrade it: pip install -U torch" in proc.stderr


def test_log_records_show_their_level_outside_their_text(capsys):
    logger = runtime.configure_logging(logging.INFO)
    runtime.configure_logging(logging.INFO)  # a second call replaces the first's handler
    assert sum(isinstance(h, runtime.StderrHandler) for h in logger.handlers) == 1
    child = logging.getLogger("translate.example")
    child.debug("hidden")
    child.info("plain")
    child.warning("look out")
    child.error("broken")
    assert capsys.readouterr().err == "plain\nwarning: look out\nerror: broken\n"
    assert runtime.console_level() == logging.INFO
    runtime.configure_logging(logging.WARNING)  # --quiet
    child.info("hidden")
    child.warning("shown")
    assert capsys.readouterr().err == "warning: shown\n" and runtime.console_level() == logging.WARNING
    runtime.configure_logging(logging.DEBUG)  # --verbose
    child.debug("details")
    assert capsys.readouterr().err == "details\n"
    runtime.configure_logging(logging.INFO)


def test_a_train_log_records_the_run_whatever_the_console_shows(tmp_path, capsys):
    from translate.rundir import TrainLog

    logger = logging.getLogger("translate")
    runtime.configure_logging(logging.WARNING)
    level = logger.level
    log = TrainLog(tmp_path)
    logging.getLogger("translate.example").info("a step")
    logging.getLogger("translate.example").warning("a skipped batch")
    log.close()
    logging.getLogger("translate.example").info("after the run")
    lines = (tmp_path / "train.log").read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == ["a step", "warning: a skipped batch"]
    assert capsys.readouterr().err == "warning: a skipped batch\n" and logger.level == level
    silent = TrainLog(None)  # the log of ranks other than 0: warnings only, no file
    assert logger.level == logging.WARNING
    silent.close()
    assert logger.level == level
    runtime.configure_logging(logging.INFO)


def test_no_message_carries_its_level_in_its_text():
    """Levels are the logger's (``LevelFormatter`` writes them): no string in the package starts
    with one as it writes them. (A command's failing line is click's own "Error: ...".)"""
    import ast
    from pathlib import Path

    package = Path(runtime.__file__).parent
    found = []
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
            if text and text.startswith(("warning:", "error:", "info:", "debug:")):
                found.append(f"{path.name}:{node.lineno}")
    assert not found
