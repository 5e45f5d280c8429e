"""Tokenized corpora: the token ids of many sentences, in memory (``Encoded``) or in flat files
read with ``pread`` (``DiskEncoded``), both read by batching through one declared interface
(``EncodedCorpus``).

A training corpus is tokenized once by ``tokenize_corpus`` with ``Dataset.map`` (in parallel,
cached on disk beside its Arrow data and reused by later runs with the same tokenizer), then
laid out as flat id files. What stays in memory is a few bytes per sentence pair (its lengths,
for bucketing, and the epoch's order), so memory hardly grows with the corpus.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .corpus import column_chunks
from .memory import release_mapped_pages, return_freed_memory
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = "2"  # bump when the cached files change layout (2: a manifest in "done")
MAP_BATCH = 10_000  # rows tokenized, and written, at a time by Dataset.map


@runtime_checkable
class EncodedCorpus(Protocol):
    """What batching reads of a tokenized corpus: every sentence's length (to bucket and budget
    batches without touching the ids) and one sentence's ids at a time."""

    lengths: np.ndarray  # (n,) tokens per sentence, any integer type

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...  # (lengths[i],) int32 ids of sentence i


class Encoded:
    """Token ids of many sentences in one flat array (no per-sentence Python lists)."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        self.offsets = np.zeros(len(sequences) + 1, dtype=np.int64)  # (n + 1,) where each sentence starts
        np.cumsum(lengths, out=self.offsets[1:])
        self.ids = np.fromiter((i for s in sequences for i in s), dtype=np.int32, count=int(self.offsets[-1]))
        self.lengths = lengths  # (n,) int64

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]: self.offsets[i + 1]]


class DiskEncoded:
    """Token ids of many sentences in a flat file, read with ``pread`` per sentence: nothing
    grows with the corpus but ``lengths`` (two bytes a sentence)."""

    def __init__(self, ids_path: Path, offsets_path: Path, lengths: np.ndarray):
        self.ids_path, self.offsets_path = Path(ids_path), Path(offsets_path)
        self.lengths = lengths  # (n,) uint16, clipped at 65535 (memory-mapped)
        self._ids = os.open(self.ids_path, os.O_RDONLY)
        self._offsets = os.open(self.offsets_path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start, end = np.frombuffer(os.pread(self._offsets, 16, 8 * int(i)), dtype=np.int64)
        return np.frombuffer(os.pread(self._ids, 4 * int(end - start), 4 * int(start)), dtype=np.int32)

    def __getstate__(self):
        raise TypeError("DiskEncoded holds open files; pass its paths instead")

    def __del__(self):
        for fd in (getattr(self, "_ids", None), getattr(self, "_offsets", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


# ---------------------------------------------------------------- tokenizing, once, onto disk

def _encode_rows(rows: dict, src_lang: str, tgt_lang: str, protos: tuple[bytes, bytes]) -> dict:
    tokenizer = _tokenizer(protos)
    out = {"src_ids": tokenizer.encode_src(rows[src_lang]), "tgt_ids": tokenizer.encode_tgt(rows[tgt_lang])}
    release_mapped_pages()  # this batch's strings are read: let the process hold none of them
    return out


_TOKENIZERS: dict[tuple[bytes, bytes], Tokenizer] = {}


def _tokenizer(protos: tuple[bytes, bytes]) -> Tokenizer:
    """One tokenizer per worker process, built from the serialized models that ``map`` ships."""
    if protos not in _TOKENIZERS:
        _TOKENIZERS[protos] = Tokenizer(*protos)
    return _TOKENIZERS[protos]


def cache_dir_for(table) -> Path:
    """Where the tokenized files of ``table`` live: beside its Arrow cache."""
    files = getattr(table, "cache_files", None)
    if files:
        return Path(files[0]["filename"]).parent
    return Path(os.environ.get("TRANSLATE_CACHE", Path.home() / ".cache" / "translate"))


def tokenize_corpus(table, tokenizer: Tokenizer, src_lang: str, tgt_lang: str,
                    num_proc: int = 0) -> tuple[DiskEncoded, DiskEncoded]:
    """Tokenizes ``table`` once with ``Dataset.map`` (cached by the data's and the tokenizer's
    fingerprints, so a later run with the same tokenizer reuses it) and lays the ids out flat.

    Safe under concurrent processes (ranks of nodes that share the cache's file system, or a
    second run started at the same time): a reader checks and opens the cache under a shared
    lock (``_locked``); a process that finds no intact cache takes the lock alone, checks again
    (another may have finished it meanwhile), and only then sets a damaged cache aside, so it
    never removes a cache that another process found intact and is opening. It builds in a
    directory of its own and renames it into place in one step; where the file system has no
    locks the first rename wins and the others take its files. A cache is reused only when its
    manifest matches its files and the corpus."""
    key = hashlib.sha256(f"{FORMAT_VERSION}|{table._fingerprint}|{tokenizer.fingerprint}|{src_lang}|{tgt_lang}"
                         .encode()).hexdigest()[:16]
    directory = cache_dir_for(table) / f"translate-{key}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory, exclusive=False):
        if _intact(directory, key, len(table)):
            logger.info("reusing the corpus tokenized by an earlier run (cached beside its Arrow files)")
            return _open_side(directory, "src"), _open_side(directory, "tgt")
    with _locked(directory, exclusive=True):
        if _intact(directory, key, len(table)):  # another process finished it while this one waited
            logger.info("reusing the corpus tokenized by another process (cached beside its Arrow files)")
            return _open_side(directory, "src"), _open_side(directory, "tgt")
        if directory.exists():  # incomplete or damaged, and no process is opening it: set aside, then rebuilt
            logger.info(f"the cached tokenized corpus ({directory.name}) does not match its manifest; tokenizing again")
            _set_aside(directory)
        _build(table, tokenizer, src_lang, tgt_lang, num_proc, key, directory)
        return _open_side(directory, "src"), _open_side(directory, "tgt")


def _build(table, tokenizer: Tokenizer, src_lang: str, tgt_lang: str, num_proc: int, key: str,
           directory: Path) -> None:
    """``tokenize_corpus``' files, written into a directory of this process's own, then renamed
    to ``directory`` in one step."""
    own = directory.with_name(f"{directory.name}.part-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    own.mkdir(parents=True)
    workers = num_proc or max(1, min(os.cpu_count() or 1, 8))
    logger.info(f"tokenizing {len(table):,} pairs with {workers} process(es) (cached for later runs)")
    tokenized = table.map(
        _encode_rows, batched=True, batch_size=MAP_BATCH, writer_batch_size=MAP_BATCH,
        num_proc=workers if workers > 1 else None,
        fn_kwargs={"src_lang": src_lang, "tgt_lang": tgt_lang,
                   "protos": (tokenizer.src_proto, tokenizer.tgt_proto)},
        remove_columns=table.column_names, cache_file_name=str(own / "tokens.arrow"),
        new_fingerprint=key, desc="tokenizing")
    release_mapped_pages()
    _write_flat(tokenized, own)
    del tokenized
    _write_manifest(own, key, len(table))
    try:
        os.rename(own, directory)  # atomic; fails if another writer's directory is already there
    except OSError:
        if not _intact(directory, key, len(table)):
            raise
        shutil.rmtree(own, ignore_errors=True)  # another writer finished first: its files are the same
    return_freed_memory()


@contextlib.contextmanager
def _locked(directory: Path, exclusive: bool) -> Iterator[None]:
    """An advisory lock (``flock``) on a hidden file beside the cache ``directory``, shared or
    exclusive, for ``tokenize_corpus``; none where the file system refuses locks (its writers
    then rely on the atomic rename alone)."""
    try:
        handle = os.open(directory.with_name(f".{directory.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        handle = None
    try:
        if handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError:
                pass
        yield
    finally:
        if handle is not None:
            os.close(handle)  # (which releases the lock)


FLAT_FILES = [f"{side}.{name}" for side in ("src", "tgt") for name in ("ids", "offsets", "lengths")]


def _write_manifest(directory: Path, key: str, pairs: int) -> None:
    sizes = {name: (directory / name).stat().st_size for name in FLAT_FILES}
    (directory / "done").write_text(json.dumps({"key": key, "pairs": pairs, "sizes": sizes}) + "\n")


def _intact(directory: Path, key: str, pairs: int) -> bool:
    """The manifest names this key and corpus size, and every flat file has its recorded size
    (which also fits the pair count: one length and one offset a pair)."""
    try:
        manifest = json.loads((directory / "done").read_text())
        sizes = {name: (directory / name).stat().st_size for name in FLAT_FILES}
    except (OSError, ValueError):
        return False
    return (manifest.get("key") == key and manifest.get("pairs") == pairs and manifest.get("sizes") == sizes
            and all(sizes[f"{side}.lengths"] == 2 * pairs and sizes[f"{side}.offsets"] == 8 * (pairs + 1)
                    for side in ("src", "tgt")))


def _set_aside(directory: Path) -> None:
    """Moves a damaged cache out of the way (renamed first, so no reader sees it half removed);
    under ``tokenize_corpus``' exclusive lock, so no process is opening it."""
    aside = directory.with_name(f"{directory.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(directory, aside)
    except OSError:  # another process moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _write_flat(tokenized, directory: Path) -> None:
    """Arrow list columns -> ``<side>.ids`` (int32, flat), ``<side>.offsets`` (int64) and
    ``<side>.lengths`` (uint16), converted a chunk at a time."""
    for side in ("src", "tgt"):
        total = 0
        with open(directory / f"{side}.ids.tmp", "wb") as ids, open(directory / f"{side}.offsets.tmp", "wb") as offs, \
                open(directory / f"{side}.lengths.tmp", "wb") as lens:
            offs.write(np.zeros(1, dtype=np.int64).tobytes())
            for column in column_chunks(tokenized, f"{side}_ids"):
                lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
                values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
                ids.write(values.tobytes())
                offs.write((np.cumsum(lengths) + total).astype(np.int64).tobytes())
                lens.write(np.minimum(lengths, 65535).astype(np.uint16).tobytes())
                total += int(lengths.sum())
        for name in ("ids", "offsets", "lengths"):
            os.replace(directory / f"{side}.{name}.tmp", directory / f"{side}.{name}")


def _open_side(directory: Path, side: str) -> DiskEncoded:
    # memory-mapped: read once to build the batches' lengths, then left to the page cache
    lengths = np.memmap(directory / f"{side}.lengths", dtype=np.uint16, mode="r")
    return DiskEncoded(directory / f"{side}.ids", directory / f"{side}.offsets", lengths)
