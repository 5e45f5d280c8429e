"""Helpers shared by the benchmark scripts: peak memory, a measured matmul peak, model FLOPs."""

from __future__ import annotations

import platform
import resource
import time
from pathlib import Path

import torch

from translate.config import BUNDLED_DATA, ModelConfig
from translate.corpus import read_lines, read_parallel

# the domain-shift set: evaluation only, never training or tuning the tokenizer
BIBLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "bible-es-en.dev"


def evaluation_sets() -> dict[str, tuple[list[str], list[str]]]:
    """Sources and references of the bundled test split ("test") and the Bible verses ("bible")."""
    test = read_parallel(str(BUNDLED_DATA / "test.tsv"), "spa", "eng", "test")
    return {"test": (test.src, test.tgt), "bible": (read_lines(f"{BIBLE}.es"), read_lines(f"{BIBLE}.en"))}


def peak_rss_mb() -> float:
    """The peak resident memory of this process or of the largest process it has forked and waited
    for (decoding processes, ``translator.decode_workers``), in MB."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024


def matmul_peak_flops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Dense-matmul FLOP/s this machine reaches with torch (the MFU denominator)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def forward_flops(cfg: ModelConfig, vocab: int, src_tokens: int, tgt_tokens: int, pairs: int) -> float:
    """Matmul FLOPs of one teacher-forced forward pass (padding excluded; elementwise ops ignored).

    ``pairs`` is the summed product src_len x tgt_len over sentences (attention scores, context).
    """
    gates = 4 if cfg.cell == "lstm" else 3
    dirs = 2 if cfg.bidirectional else 1
    enc_h = cfg.hidden_dim // 2 if cfg.bidirectional else cfg.hidden_dim
    enc_out = enc_h * dirs
    dec_h = cfg.hidden_dim
    out_dim = cfg.embed_dim if cfg.tie_embeddings else dec_h
    flops = 0.0
    for layer in range(cfg.layers):
        enc_in = cfg.embed_dim if layer == 0 else enc_out
        flops += src_tokens * dirs * 2 * gates * enc_h * (enc_in + enc_h)
        fed = enc_out if cfg.decoder == "bahdanau" else out_dim if cfg.input_feeding else 0  # context or feed
        dec_in = cfg.embed_dim + fed if layer == 0 else dec_h
        flops += tgt_tokens * 2 * gates * dec_h * (dec_in + dec_h)
    if cfg.attention == "bahdanau":
        flops += src_tokens * 2 * enc_out * dec_h + tgt_tokens * 2 * dec_h * dec_h + pairs * 2 * dec_h
    elif cfg.attention == "luong-general":
        flops += src_tokens * 2 * enc_out * dec_h + pairs * 2 * dec_h
    else:
        flops += pairs * 2 * dec_h
    flops += pairs * 2 * enc_out  # context vectors
    readout_in = dec_h + enc_out + (cfg.embed_dim if cfg.decoder == "bahdanau" else 0)
    flops += tgt_tokens * 2 * readout_in * out_dim  # attentional vector (luong) or readout (bahdanau)
    flops += tgt_tokens * 2 * out_dim * vocab  # output layer
    return flops


def cpu_model() -> str:
    """The CPU's name (machines here differ from session to session, and the budget is wall time)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
