import os
import subprocess
import sys

import pytest
import torch

from translate import runtime

CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def _run(code: str, **extra: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in CACHES}
    env.update(extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.slow  # a fresh interpreter each
def test_importing_the_package_leaves_the_environment_alone():
    code = ("import os, sys; before = dict(os.environ); import translate.cli, translate.build, "
            "translate.serve; print(dict(os.environ) == before)")
    assert _run(code) == ["True"]


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


def test_amp_dtype_and_devices(monkeypatch):
    cpu = torch.device("cpu")
    assert runtime.amp_dtype(cpu, enabled=False) is None
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.amp_dtype(cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.amp_dtype(cpu) is None
    assert runtime.select_device("cpu") == cpu
    assert runtime.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_rng_state_round_trip():
    cpu = torch.device("cpu")
    runtime.seed_everything(3)
    state = runtime.rng_state(cpu)
    first = torch.rand(3)
    runtime.set_rng_state(state, cpu)
    assert torch.equal(torch.rand(3), first)
