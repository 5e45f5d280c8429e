"""Where and how the process computes: the device, the mixed-precision type, bounds on the CPU
kernel caches and random-number state, and where the package's log records go. (The process's
memory: ``memory.py``.)

Nothing here runs on import: the command line calls ``configure_process`` and
``configure_logging`` once at its entry (library users may call them too), so importing the
package leaves the process as it was.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

# oneDNN (bf16 matrix products on CPU) and PyTorch's oneDNN glue (ideep: RNN and matrix-product
# set-ups with their weights in oneDNN's layout) keep one cached entry per tensor shape, up to
# 1,024 each. Training and decoding meet many shapes, so the caches grow to GBs; 128 entries keep
# the speed (bench/README.md has the figures). Both libraries read these when they first run.
CPU_CACHE_BOUNDS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}


def configure_process() -> dict[str, str]:
    """Bounds the CPU kernel caches (``CPU_CACHE_BOUNDS``) unless the user has set them. Call it
    before the first tensor operation; returns the values in force."""
    for name, value in CPU_CACHE_BOUNDS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in CPU_CACHE_BOUNDS}


# ---------------------------------------------------------------- log records

PACKAGE_LOGGER = "translate"  # every module logs under it, as logging.getLogger(__name__)


class LevelFormatter(logging.Formatter):
    """A record as this project shows it: the message, behind its level where that is a warning or
    worse ("warning: ..."), so that a message's own text never carries its level."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class StderrHandler(logging.Handler):
    """Writes records to whatever ``sys.stderr`` is when they come (so a captured or replaced
    stream gets them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # as logging's own handlers: a failing handler never raises
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Shows the package's records of ``level`` and above on stderr (the command line's -q:
    WARNING, -v: DEBUG), in place of any handler an earlier call set. The package's logger itself
    passes INFO and above, so that a run's train.log has them whatever the console shows."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, StderrHandler)]:
        logger.removeHandler(handler)
    handler = StderrHandler(level)
    handler.setFormatter(LevelFormatter())
    logger.addHandler(handler)
    logger.setLevel(min(level, logging.INFO))
    return logger


def console_level() -> int:
    """The least level the console shows (``configure_logging``'s; logging's WARNING without it)."""
    handlers = [h for h in logging.getLogger(PACKAGE_LOGGER).handlers if isinstance(h, StderrHandler)]
    return handlers[-1].level if handlers else logging.WARNING


# ---------------------------------------------------------------- device and precision

DEVICES = ("auto", "cpu", "cuda")


def select_device(name: str = "auto", setting: str = "train.device=") -> torch.device:
    """``auto`` (CUDA when visible, else CPU), ``cpu`` or ``cuda``; ``setting`` names the choice in
    the error (``--device `` for the decoding commands)."""
    if name not in DEVICES:
        raise ConfigError(f"{setting}{name}: unknown device; use one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}cuda but no CUDA GPU is visible; use {setting}auto or {setting}cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 pays off."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpu_has_vnni() -> bool:
    """True when fbgemm's int8 products accumulate straight into int32 (AVX512-VNNI). Without it
    they add pairs of u8 x s8 products in int16, which saturates unless activations keep to 7 bits."""
    return "avx512_vnni" in _cpu_flags()


@functools.cache
def cpu_bf16_pays() -> bool:
    """Whether bf16 matrix products run clearly faster than fp32 ones on this CPU, timed once per
    process (about 0.1 s). The flags alone do not tell: with AVX512-BF16, oneDNN's bf16 products
    run at about twice fp32's rate on some CPUs and at half of it on others (docs/training.md, "Mixed precision")."""
    if not cpu_has_bf16():
        return False
    return _matmul_seconds(torch.bfloat16) * 1.25 < _matmul_seconds(torch.float32)


def _matmul_seconds(dtype: torch.dtype) -> float:
    """The best of five timings of a (512, 1024) x (1024, 1024) product in ``dtype`` (a training
    step's products are of this order), after one untimed."""
    a, b = torch.ones(512, 1024, dtype=dtype), torch.ones(1024, 1024, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 arithmetic: compute capability 8.0 (Ampere) or newer. ``torch.cuda.is_bf16_supported()``
    also says yes where bf16 is only emulated (V100, T4), which is slow, and cuDNN's RNNs may refuse it."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def amp_dtype(device: torch.device, mode: str | bool = "auto") -> torch.dtype | None:
    """The mixed-precision type for ``train.amp`` on a device (None: full precision).

    - ``auto``: bf16 on GPUs with native bf16 and on CPUs where it pays (``cpu_bf16_pays``);
      fp16 (with loss scaling) on older GPUs; none on other CPUs and devices;
    - ``bf16``: bf16 (on a GPU, only one with native bf16);
    - ``fp16``: fp16, on CUDA only;
    - ``off``: none. ``True``/``False`` (what earlier versions saved) mean ``auto``/``off``."""
    mode = {True: "auto", False: "off"}.get(mode, mode)
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16":
            return torch.float16
        if mode == "bf16" and not cuda_has_bf16(device):
            raise ConfigError(f"train.amp=bf16: {torch.cuda.get_device_name(device)} has no native bf16 (compute "
                              f"capability below 8.0); use train.amp=fp16 or auto")
        return torch.bfloat16 if mode == "bf16" or cuda_has_bf16(device) else torch.float16
    if mode == "fp16":
        raise ConfigError(f"train.amp=fp16 needs a CUDA GPU; on {device.type} use bf16, auto or off")
    if device.type == "cpu" and (mode == "bf16" or cpu_bf16_pays()):
        return torch.bfloat16
    return None


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------- random state

def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

