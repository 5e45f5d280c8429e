"""Helpers shared by the benchmark scripts: the evaluation sets and their figures (BLEU, chrF,
degenerate outputs, names and numbers carried), peak memory, a measured matmul peak, model FLOPs."""

from __future__ import annotations

import json
import platform
import re
import resource
import time
from pathlib import Path

import torch
from sacrebleu.metrics import BLEU, CHRF

from translate.config import BUNDLED_DATA, ModelConfig
from translate.corpus import read_lines, read_parallel

# the domain-shift set: evaluation only, never training or tuning the tokenizer
BIBLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "bible-es-en.dev"


def evaluation_sets() -> dict[str, tuple[list[str], list[str]]]:
    """Sources and references of the bundled test split ("test") and the Bible verses ("bible")."""
    test = read_parallel(str(BUNDLED_DATA / "test.tsv"), "spa", "eng", "test")
    return {"test": (test.src, test.tgt), "bible": (read_lines(f"{BIBLE}.es"), read_lines(f"{BIBLE}.en"))}


def long_fifth(sources: list[str]) -> list[int]:
    """The indices of the longest fifth of ``sources`` by words (ties by position), in order."""
    by_length = sorted(range(len(sources)), key=lambda i: (-len(sources[i].split()), i))
    return sorted(by_length[: len(by_length) // 5])


_OPENING = re.compile(r"^[\s¿¡]+")
_CLOSING = re.compile(r"[\s.!?]+$")


def casual(line: str) -> str:
    """``line`` as people type it into a chat box: lower case, no opening ``¿ ¡``, no closing
    ``. ! ?`` (marks inside the line stay)."""
    return _CLOSING.sub("", _OPENING.sub("", line.lower()))


_WORD_RUN = re.compile(r"(?<!\S)(\S+)(?:\s+\1){3,}(?!\S)")  # a word 4+ times in a row
_PHRASE_RUN = re.compile(r"(?<!\S)(\S+(?:\s+\S+){1,3}?)(?:\s+\1){3,}(?!\S)")  # 2-4 words, 4+ times in a row
_CHAR_RUN = re.compile(r"(\S)\1{3,}")  # a character 4+ times in a row


def degenerate(hypothesis: str, reference: str) -> bool:
    """What hallucination looks like here: a word, a phrase of up to four words or a character
    repeated four or more times in a row, or more than twice the reference's words."""
    return bool(_WORD_RUN.search(hypothesis) or _PHRASE_RUN.search(hypothesis) or _CHAR_RUN.search(hypothesis)) \
        or len(hypothesis.split()) > 2 * max(1, len(reference.split()))


def length_ratio(hypotheses: list[str], references: list[str]) -> float:
    return sum(len(h.split()) for h in hypotheses) / max(1, sum(len(r.split()) for r in references))


_TOKEN = re.compile(r"\w+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"[.!?;:¿¡«\"(]$")


def names_and_numbers(source: str) -> list[str]:
    """The numbers (any token with a digit) and names (a capitalised word that does not open the
    line or follow a sentence mark) in ``source``."""
    found = []
    for match in _TOKEN.finditer(source):
        token = match.group()
        before = source[: match.start()].rstrip()
        opens = not before or bool(_SENTENCE_END.search(before))
        if any(c.isdigit() for c in token) or (token[:1].isupper() and not opens and not token.isupper()):
            found.append(token)
    return found


def carried(sources: list[str], hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Of the names and numbers of each source that its reference keeps as they are (Jerusalem,
    Tom, 1.5: a translation should too; Moisés -> Moses is left out), the share (%) the hypothesis
    keeps, with how many there were."""
    kept = total = 0
    for source, hypothesis, reference in zip(sources, hypotheses, references):
        expected = [t for t in names_and_numbers(source) if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", reference)]
        total += len(expected)
        kept += sum(1 for t in expected if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", hypothesis))
    return {"carried": 100 * kept / max(1, total), "carried_of": total}


def figures(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults), the share (%) of degenerate outputs and the
    length ratio in words."""
    return {"bleu": BLEU().corpus_score(hypotheses, [references]).score,
            "chrf": CHRF().corpus_score(hypotheses, [references]).score,
            "degenerate": 100 * sum(map(degenerate, hypotheses, references)) / max(1, len(hypotheses)),
            "length_ratio": length_ratio(hypotheses, references)}


def write_json(path: str | Path, payload: object) -> None:
    """A bench's figures as JSON at ``path`` (its folder made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def report(text: str, payload: object, json_path: str | None, doc: str | None, begin: str, end: str) -> None:
    """A bench's table printed, its figures as JSON (``--json``) and the table in a page (``--doc``)."""
    print(text)
    if json_path:
        write_json(json_path, payload)
    if doc:
        write_between(Path(doc), begin, end, text)


def write_between(path: Path, begin: str, end: str, text: str) -> None:
    """Puts ``text`` between the page's two markers (a table a bench makes, never typed)."""
    page = path.read_text(encoding="utf-8")
    start, stop = page.find(begin), page.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"{path} has no {begin} ... {end} markers; add them where the table goes")
    path.write_text(page[: start + len(begin)] + "\n" + text + "\n" + page[stop:], encoding="utf-8")
    print(f"wrote the table into {path}")


def peak_rss_mb() -> float:
    """The peak resident memory of this process or of the largest process it has forked and waited
    for (decoding processes, ``translator.decode_workers``), in MB."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024


def matmul_peak_flops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5,
                      device: torch.device | str = "cpu") -> float:
    """Dense-matmul FLOP/s this machine reaches with torch on ``device`` (the MFU denominator)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
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
