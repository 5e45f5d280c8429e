"""Training corpora of any size: read by ``datasets`` into memory-mapped Arrow files, tokenized
once by ``Dataset.map`` (in parallel, cached on disk beside the Arrow data and reused by later
runs with the same tokenizer), then kept as flat id files that batches read with ``pread``.

What stays in memory is a few bytes per sentence pair (its lengths, for bucketing, and the
epoch's order), so a corpus of ten million pairs trains in about the memory of a hundred
thousand. Small corpora take the same path; dev and test sets are read whole (``data.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .data import (
    HUB_SPLITS,
    JSON_SUFFIXES,
    TABLE_SUFFIXES,
    Batch,
    DataError,
    Encoded,
    TrainingData,
    _check_columns,
    check_utf8_stream,
    collate,
    data_source,
    token_batches,
)
from .runtime import release_mapped_pages, return_freed_memory
from .tokenizer import Tokenizer

FORMAT_VERSION = "1"  # bump when the cached files change layout
CHUNK = 50_000  # rows converted at a time
# Rows per record batch in the Arrow files that ``datasets`` writes from a text corpus. Opening
# such a file reads each batch's header through the memory map, and the kernel maps the pages
# around every page it faults in (fault-around, 64 KB): with the default 1,000-row batches that
# made about 60% of the corpus resident in every process that opened it. 100,000-row batches
# leave it at a few MB.
WRITER_BATCH = 100_000
MAP_BATCH = 10_000  # rows tokenized, and written, at a time by Dataset.map


def load_pairs(spec: str, src_lang: str, tgt_lang: str, split: str = "train", streaming: bool = False):
    """A ``datasets`` Dataset with one column per language, memory-mapped from Arrow files that
    ``datasets`` caches (an IterableDataset with ``streaming``). ``spec`` is a TSV/CSV/JSON-lines
    file, a ``PATH`` prefix of ``PATH.<src>``/``PATH.<tgt>`` text files, or a hub dataset name."""
    import datasets

    datasets.disable_progress_bars()
    kind, path, pair = data_source(spec, src_lang, tgt_lang)
    if kind == "table":
        table = _load_table(path, src_lang, tgt_lang, streaming)
    elif kind == "pair":
        table = _load_text_pair(pair[0], pair[1], src_lang, tgt_lang, streaming)
    else:
        table = _load_hub(spec, src_lang, tgt_lang, split, streaming)
    if not streaming:
        _check_sentences(table, src_lang, tgt_lang, spec, header=1 if path.suffix.lower() in TABLE_SUFFIXES else 0)
        release_mapped_pages()
    return table


def _load_table(path: Path, src_lang: str, tgt_lang: str, streaming: bool):
    import csv

    import datasets

    first = check_utf8_stream(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        loader, kwargs = "json", {}
    else:
        delimiter = TABLE_SUFFIXES.get(suffix, "\t")
        columns = next(csv.reader([first], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])
        _check_columns(path, columns, src_lang, tgt_lang)
        features = datasets.Features({c: datasets.Value("string") for c in columns})
        loader = "csv"
        kwargs = dict(delimiter=delimiter, quoting=csv.QUOTE_NONE, keep_default_na=False, na_filter=False,
                      features=features)
    if not streaming:
        kwargs["writer_batch_size"] = WRITER_BATCH
    try:
        table = datasets.load_dataset(loader, data_files=str(path.resolve()), split="train", streaming=streaming,
                                      **kwargs)
    except Exception as exc:  # datasets wraps parser errors in many types
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot be parsed as {loader.upper()} ({reason}); check its format") from None
    if not streaming:
        _check_columns(path, table.column_names, src_lang, tgt_lang)
        if len(table) == 0:
            raise DataError(f"{path}: the corpus is empty; give a corpus with sentence pairs")
    return table


def _load_text_pair(src_path: Path, tgt_path: Path, src_lang: str, tgt_lang: str, streaming: bool):
    import datasets

    for side in (src_path, tgt_path):
        check_utf8_stream(side)
    sides = []
    kwargs = {} if streaming else {"writer_batch_size": WRITER_BATCH}
    for side, lang in ((src_path, src_lang), (tgt_path, tgt_lang)):
        sides.append(datasets.load_dataset("text", data_files=str(side.resolve()), split="train",
                                           streaming=streaming, **kwargs).rename_column("text", lang))
    if not streaming and len(sides[0]) != len(sides[1]):
        raise DataError(f"{src_path} has {len(sides[0])} lines but {tgt_path} has {len(sides[1])}; "
                        f"parallel files must have one sentence a line, line for line")
    return datasets.concatenate_datasets(sides, axis=1)


def _load_hub(name: str, src_lang: str, tgt_lang: str, split: str, streaming: bool):
    import datasets

    hub_name, _, config = name.partition(":")
    try:
        table = datasets.load_dataset(hub_name, config or None, split=HUB_SPLITS.get(split, split),
                                      streaming=streaming)
    except Exception as exc:
        raise DataError(f"{name}: not a local file and could not be loaded as a hub dataset "
                        f"({type(exc).__name__}); check the path or your network") from None
    columns = table.column_names or []
    if src_lang in columns and tgt_lang in columns:
        return table
    if "translation" in columns:  # the hub's usual layout: {"translation": {"es": ..., "en": ...}}
        return table.map(lambda row: {src_lang: row["translation"][src_lang], tgt_lang: row["translation"][tgt_lang]})
    raise DataError(f"{name}: no fields {src_lang!r}/{tgt_lang!r} (columns: {', '.join(columns)}); "
                    f"pick them with --src-lang/--tgt-lang")


def column_chunks(table, column: str) -> Iterator:
    """One column of a Dataset as Arrow arrays, in row order. Arrow cache files are read as
    streams into memory that is freed chunk by chunk: reading through the memory map instead
    would count every page of a large corpus in the process's resident memory."""
    import pyarrow as pa

    files = _files_holding(table, column)
    if files is None:  # in memory, a view or a transformed table: read it as datasets would
        for batch in table.with_format("arrow").iter(batch_size=CHUNK):  # honours an indices mapping
            yield batch.column(column).combine_chunks()
        return
    for filename in files:
        with pa.OSFile(filename) as source:
            reader = pa.ipc.open_stream(source)
            index = reader.schema.get_field_index(column)
            for batch in reader:
                yield batch.column(index)


def _files_holding(table, column: str) -> list[str] | None:
    """The Arrow files that hold ``column`` as it is, in row order; None when it is not simply
    stored (an index mapping, a renamed or sliced table, or data in memory)."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    if getattr(table, "_indices", None) is not None:
        return None
    data = table.data
    blocks = data.blocks if isinstance(data, ConcatenationTable) else [[data]]
    files = []
    for row in blocks:
        holders = [block for block in row if column in block.column_names]
        if len(holders) != 1 or not isinstance(holders[0], MemoryMappedTable):
            return None
        if any(replay[0] != "replace_schema_metadata" for replay in holders[0].replays or []):
            return None  # renamed, cast or sliced after writing: the file is not the column
        files.append(holders[0].path)
    return files


def _check_sentences(table, src_lang: str, tgt_lang: str, origin: str, header: int) -> None:
    """Fails on the first empty or whitespace-only sentence, naming its line (Arrow compute: no
    Python loop over the corpus)."""
    import pyarrow.compute as pc

    for lang in (src_lang, tgt_lang):
        offset = 0
        for column in column_chunks(table, lang):
            blank = pc.or_(pc.is_null(column), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0))
            if pc.any(blank).as_py():
                row = offset + int(pc.index(blank, True).as_py())
                raise DataError(f"{origin} line {row + 1 + header}: empty {lang!r} sentence; "
                                f"remove the line or fill it in")
            offset += len(column)


# ---------------------------------------------------------------- tokenized, on disk

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


def cache_dir_for(table) -> Path:
    """Where the tokenized files of ``table`` live: beside its Arrow cache."""
    files = getattr(table, "cache_files", None)
    if files:
        return Path(files[0]["filename"]).parent
    return Path(os.environ.get("TRANSLATE_CACHE", Path.home() / ".cache" / "translate"))


def tokenize_corpus(table, tokenizer: Tokenizer, src_lang: str, tgt_lang: str, num_proc: int = 0,
                    log=lambda line: None) -> tuple[DiskEncoded, DiskEncoded]:
    """Tokenizes ``table`` once with ``Dataset.map`` (cached by the data's and the tokenizer's
    fingerprints, so a later run with the same tokenizer reuses it) and lays the ids out flat."""
    key = hashlib.sha256(f"{FORMAT_VERSION}|{table._fingerprint}|{tokenizer.fingerprint}|{src_lang}|{tgt_lang}"
                         .encode()).hexdigest()[:16]
    directory = cache_dir_for(table) / f"translate-{key}"
    done = directory / "done"
    if not done.exists():
        directory.mkdir(parents=True, exist_ok=True)
        workers = num_proc or max(1, min(os.cpu_count() or 1, 8))
        log(f"tokenizing {len(table):,} pairs with {workers} process(es) into {directory}")
        tokenized = table.map(
            _encode_rows, batched=True, batch_size=MAP_BATCH, writer_batch_size=MAP_BATCH,
            num_proc=workers if workers > 1 else None,
            fn_kwargs={"src_lang": src_lang, "tgt_lang": tgt_lang,
                       "protos": (tokenizer.src_proto, tokenizer.tgt_proto)},
            remove_columns=table.column_names, cache_file_name=str(directory / "tokens.arrow"),
            new_fingerprint=key, desc="tokenizing")
        release_mapped_pages()
        _write_flat(tokenized, directory)
        del tokenized
        done.write_text(key + "\n")
        return_freed_memory()
    else:
        log(f"reusing the tokenized corpus in {directory}")
    return (_open_side(directory, "src"), _open_side(directory, "tgt"))


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


def sample_sentences(table, column: str, limit: int, seed: int) -> list[str]:
    """Up to ``limit`` sentences of a column for training the tokenizer: all of them in corpus
    order when they fit, else a seeded random sample (the order ``Tokenizer.train`` expects)."""
    import random

    n = len(table)
    chosen = None if n <= limit else np.sort(np.array(random.Random(seed).sample(range(n), limit), dtype=np.int64))
    out: list[str] = []
    offset = 0
    # read as a stream: picking a sample spread over the corpus through the memory map would make
    # nearly every page of it resident
    for column_chunk in column_chunks(table, column):
        if chosen is None:
            out.extend(str(s) for s in column_chunk.to_pylist())
        else:
            lo, hi = np.searchsorted(chosen, [offset, offset + len(column_chunk)])
            if hi > lo:
                out.extend(str(s) for s in column_chunk.take(chosen[lo:hi] - offset).to_pylist())
        offset += len(column_chunk)
    return out


class StreamingData:
    """Training batches from a corpus read as a stream (``data.streaming``), never materialised:
    pairs are tokenized as they arrive and bucketed by length inside pools of ``pool_batches``
    batches, each shuffled with the epoch's seed. A pass over the stream is an epoch; resuming
    reads the stream again and skips the batches already trained on."""

    def __init__(self, table, tokenizer: Tokenizer, src_lang: str, tgt_lang: str, batch_tokens: int, seed: int,
                 max_len: int, pool_batches: int = 50, mean_length: int = 20):
        self.table, self.tokenizer = table, tokenizer
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.batch_tokens, self.seed, self.max_len = batch_tokens, seed, max_len
        self.pool = max(1000, pool_batches * batch_tokens // mean_length)  # pairs per bucketing pool
        self.dropped = 0

    def _pools(self) -> Iterator[tuple[Encoded, Encoded]]:
        src: list[list[int]] = []
        tgt: list[list[int]] = []
        for rows in self.table.iter(batch_size=1000):
            src_ids = self.tokenizer.encode_src(rows[self.src_lang])
            encoded = zip(src_ids, self.tokenizer.encode_tgt(rows[self.tgt_lang]))
            for s, t in encoded:
                if 0 < len(s) <= self.max_len and 0 < len(t) <= self.max_len:
                    src.append(s)
                    tgt.append(t)
                else:
                    self.dropped += 1
            if len(src) >= self.pool:
                yield Encoded(src), Encoded(tgt)
                src, tgt = [], []
        if src:
            yield Encoded(src), Encoded(tgt)

    def steps(self, epoch: int, start: int, group: int, mine: slice) -> Iterator[tuple[int, list[Batch], int]]:
        """(position after the step, this process's collated batches, target tokens of the whole
        step) for each optimiser step of the epoch from batch ``start`` on."""
        rng = np.random.default_rng([self.seed, epoch])
        position = 0
        self.dropped = 0
        for src, tgt in self._pools():
            data = TrainingData(src, tgt, self.batch_tokens, self.seed)
            batches = token_batches(data.lengths, self.batch_tokens, rng)
            for first in range(0, len(batches) - group + 1, group):  # a pool's incomplete tail is left
                position += group
                if position <= start:
                    continue
                step = batches[first: first + group]
                yield position, [collate(src, tgt, b) for b in step[mine]], sum(data.target_tokens(b) for b in step)


def first_sentences(table, src_lang: str, tgt_lang: str, limit: int) -> tuple[list[str], list[str]]:
    """The first ``limit`` pairs of a streamed corpus, for training the tokenizer."""
    src: list[str] = []
    tgt: list[str] = []
    for rows in table.iter(batch_size=1000):
        src.extend(str(x) for x in rows[src_lang])
        tgt.extend(str(x) for x in rows[tgt_lang])
        if len(src) >= limit:
            break
    if not src:
        raise DataError("the streamed training corpus is empty; give a corpus with sentence pairs")
    return src[:limit], tgt[:limit]
