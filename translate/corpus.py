"""Reading corpora. Every parallel corpus, training, dev or test (a TSV/CSV/JSON-lines file, a
``PATH.<src>``/``PATH.<tgt>`` pair of plain-text files, or a hub dataset), is read by ``datasets``
into memory-mapped Arrow files and checked the same way, with the same one-line messages: the
training set is kept as that Dataset (``load_pairs``), dev and test sets are taken whole as lists
(``read_parallel``). Arrow data is read as streams (``column_chunks``), so a large corpus never
becomes resident memory. Also: plain-text line readers (decoding input), the split that made the
bundled data, and the switch that keeps tqdm (whose bars ``datasets`` makes) from starting a thread.
"""

from __future__ import annotations

import codecs
import csv
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import shown_path
from .errors import DataError
from .memory import release_mapped_pages

TABLE_SUFFIXES = {".tsv": "\t", ".csv": ","}
JSON_SUFFIXES = {".json", ".jsonl"}
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
CHUNK = 50_000  # rows converted at a time
# Rows per record batch in the Arrow files that ``datasets`` writes from a text corpus. Opening
# such a file reads each batch's header through the memory map, and the kernel maps the pages
# around every page it faults in (fault-around, 64 KB): with the default 1,000-row batches that made
# much of the corpus resident in every process that opened it; large batches leave little.
WRITER_BATCH = 100_000


@dataclass(frozen=True)
class Parallel:
    """Sentence pairs as read, with where they came from (for messages)."""

    src: list[str]
    tgt: list[str]
    origin: str


# ---------------------------------------------------------------- files and their text

def _unreadable(path: Path, exc: OSError) -> DataError:
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{path}: file not found; check the path")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{path}: is a directory, not a data file; give a file path")
    return DataError(f"{path}: cannot read ({exc.strerror}); check its permissions")


def check_utf8(path: Path, chunk_size: int = 1 << 20, require_text: bool = True) -> str:
    """Reads a file of any size in chunks and fails with the line number of the first byte that
    is not UTF-8, or (with ``require_text``) if the file holds no text; returns the first line."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    decoder = codecs.getincrementaldecoder("utf-8")()
    first, head, lines, seen_text = None, "", 0, False
    with handle:
        while True:
            raw = handle.read(chunk_size)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                line = lines + raw[: max(exc.start, 0)].count(b"\n") + 1
                raise DataError(f"{path} line {line}: not valid UTF-8; re-encode the file as UTF-8 "
                                f"(e.g. iconv -f latin1 -t utf-8)") from None
            if first is None:
                head += text
                if "\n" in head or not raw or len(head) > 1 << 20:
                    first = head.split("\n", 1)[0].rstrip("\r")
            seen_text = seen_text or bool(text.strip())
            lines += raw.count(b"\n")
            if not raw:
                break
    if require_text and not seen_text:
        raise DataError(f"{path}: the file is empty; give a corpus with sentence pairs")
    return first or ""


def iter_lines(path: str | Path | None) -> Iterator[str]:
    """Streams a plain-text file (or stdin for ``None``/'-') line by line, failing with the line
    number of the first line that is not UTF-8. A file is checked first, so a bad line stops
    the job before anything is translated; stdin cannot be read twice, so it is checked as read."""
    if path is None or path == "-":
        yield from _decode_lines(sys.stdin.buffer, "stdin")
        return
    path = Path(path)
    check_utf8(path, require_text=False)
    try:
        with open(path, "rb") as handle:
            yield from _decode_lines(handle, str(path))
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _decode_lines(handle, name: str) -> Iterator[str]:
    for number, raw in enumerate(handle, start=1):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise DataError(f"{name} line {number}: not valid UTF-8; re-encode the input as UTF-8") from None


def read_lines(path: str | Path | None) -> list[str]:
    """All lines of a plain-text file (one sentence a line) with ``iter_lines``' checks; ``None``
    or '-' is stdin."""
    return list(iter_lines(path))


# ---------------------------------------------------------------- parallel corpora

SUFFIXES = re.compile(r"^(?P<prefix>.+)\.\{(?P<src>[^{},]+),(?P<tgt>[^{},]+)\}$")  # PATH.{SRC,TGT}


def data_source(spec: str, src_lang: str, tgt_lang: str) -> tuple[str, Path, tuple[Path, Path]]:
    """What a corpus spec names: ``"table"`` (a TSV/CSV/JSON-lines file), ``"pair"`` (the text
    files ``PATH.<src>``/``PATH.<tgt>``, or ``PATH.SRC``/``PATH.TGT`` for ``PATH.{SRC,TGT}``, as
    messages name a pair, when the files' suffixes are not the languages' names) or ``"hub"`` (a
    dataset name), with its path and the text-pair paths. A local-looking path that names none of
    these is an error."""
    suffixes = SUFFIXES.match(spec)
    if suffixes:
        spec, src_lang, tgt_lang = suffixes["prefix"], suffixes["src"], suffixes["tgt"]
    path = Path(spec).expanduser()
    pair = (Path(f"{path}.{src_lang}"), Path(f"{path}.{tgt_lang}"))
    if suffixes and not (pair[0].is_file() and pair[1].is_file()):
        missing = next(side for side in pair if not side.is_file())
        raise DataError(f"{missing}: file not found; PATH.{{SRC,TGT}} names the text files PATH.SRC and PATH.TGT")
    if path.suffix.lower() in TABLE_SUFFIXES or path.suffix.lower() in JSON_SUFFIXES or path.is_file():
        return "table", path, pair
    if pair[0].exists() or pair[1].exists():
        return "pair", path, pair
    if path.exists() or spec.startswith((".", "/", "~")) or path.suffix:
        raise DataError(f"{spec}: no such data file, and no {pair[0].name} / {pair[1].name} beside it; "
                        f"give a TSV/CSV/JSON-lines file or a prefix of plain-text files")
    return "hub", path, pair


def corpus_name(spec: str, src_lang: str, tgt_lang: str) -> str:
    """A short name of a corpus for metrics and logs: a file's stem, a text pair's prefix name
    (``bible.dev`` for ``bible.dev.{es,en}``), a hub dataset's name."""
    kind, path, _ = data_source(spec, src_lang, tgt_lang)
    if kind == "table":
        return path.stem
    if kind == "pair":
        return path.name
    return spec.replace("/", "-").replace(":", "-")


def load_pairs(spec: str, src_lang: str, tgt_lang: str, split: str = "train", streaming: bool = False):
    """A ``datasets`` Dataset with one column per language, memory-mapped from Arrow files that
    ``datasets`` caches (an IterableDataset with ``streaming``, unchecked: it is read once, as it
    trains). ``spec`` is a TSV/CSV/JSON-lines file, a ``PATH`` prefix of ``PATH.<src>``/``PATH.<tgt>``
    text files, or a hub dataset name (``NAME`` or ``NAME:CONFIG``; needs network)."""
    return _load(spec, src_lang, tgt_lang, split, streaming)[0]


def read_parallel(spec: str, src_lang: str, tgt_lang: str, split: str = "train") -> Parallel:
    """A dev or test set whole, as lists: read and checked as ``load_pairs`` reads a training set."""
    table, origin = _load(spec, src_lang, tgt_lang, split, streaming=False)
    src, tgt = ([str(s) for chunk in column_chunks(table, lang) for s in chunk.to_pylist()]
                for lang in (src_lang, tgt_lang))
    return Parallel(src, tgt, origin)


def no_tqdm_monitor() -> None:
    """Keeps tqdm from starting its monitor thread, which stays once its first bar (even a
    disabled one, as ``datasets`` makes) has started it: a process with another thread decodes
    in threads, not forked processes (``translator.can_fork``). Called where bars are made: reading
    a corpus through ``datasets`` (``_load``) and the command line's progress bar."""
    import tqdm

    tqdm.tqdm.monitor_interval = 0


def _load(spec: str, src_lang: str, tgt_lang: str, split: str, streaming: bool):
    """``load_pairs``' Dataset and how messages name the corpus: the file, ``PATH.{src,tgt}`` for a
    text pair, the hub name."""
    import datasets

    datasets.disable_progress_bars()
    no_tqdm_monitor()
    kind, path, pair = data_source(spec, src_lang, tgt_lang)
    if kind == "table":
        table, origin = _load_table(path, src_lang, tgt_lang, streaming), shown_path(path)
    elif kind == "pair":
        table = _load_text_pair(pair[0], pair[1], src_lang, tgt_lang, streaming)
        origin = f"{pair[0].with_suffix('')}.{{{pair[0].suffix[1:]},{pair[1].suffix[1:]}}}"
    else:
        table, origin = _load_hub(spec, src_lang, tgt_lang, split, streaming), spec
    if not streaming:
        header = 1 if kind == "table" and path.suffix.lower() not in JSON_SUFFIXES else 0
        _check_sentences(table, src_lang, tgt_lang, origin, header)
        release_mapped_pages()
    return table, origin


def _load_table(path: Path, src_lang: str, tgt_lang: str, streaming: bool):
    import datasets

    first = check_utf8(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        loader, kwargs = "json", {}
    else:
        delimiter = TABLE_SUFFIXES.get(suffix, "\t")
        columns = next(csv.reader([first], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])
        _check_columns(path, columns, src_lang, tgt_lang)
        if not _has_rows(path):  # datasets fails on it with a message that does not say so
            raise DataError(f"{path}: the corpus is empty (a header and no pairs); give a corpus with sentence pairs")
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
    if streaming:
        return table
    _check_columns(path, table.column_names, src_lang, tgt_lang)
    other = [lang for lang in (src_lang, tgt_lang) if table.features[lang] != datasets.Value("string")]
    if other:  # JSON numbers (or mixed values) are sentences too, as they are in a TSV
        features = table.features.copy()
        features.update({lang: datasets.Value("string") for lang in other})
        table = table.map(lambda row: {lang: None if row[lang] is None else str(row[lang]) for lang in other},
                          features=features)
    return table


def _check_columns(path: Path, columns: Sequence[str], src_lang: str, tgt_lang: str) -> None:
    missing = [c for c in (src_lang, tgt_lang) if c not in columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(columns) or 'none'}); "
                        f"pick them with --src-lang/--tgt-lang")


def _has_rows(path: Path, chunk_size: int = 1 << 20) -> bool:
    """Whether a table holds any text after its header line (read until the first that does)."""
    with open(path, "rb") as handle:
        handle.readline()
        while chunk := handle.read(chunk_size):
            if chunk.strip():
                return True
    return False


def _load_text_pair(src_path: Path, tgt_path: Path, src_lang: str, tgt_lang: str, streaming: bool):
    import datasets

    for side in (src_path, tgt_path):
        check_utf8(side)
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
    # the hub's usual layout: {"translation": {"es": ..., "en": ...}}; a stream is not read ahead to check it
    if "translation" in columns and (streaming or _translates(table, src_lang, tgt_lang)):
        return table.map(lambda row: {src_lang: row["translation"][src_lang], tgt_lang: row["translation"][tgt_lang]})
    raise DataError(f"{name}: no fields {src_lang!r}/{tgt_lang!r} (columns: {', '.join(columns)}); "
                    f"pick them with --src-lang/--tgt-lang")


def _translates(table, src_lang: str, tgt_lang: str) -> bool:
    """Whether the first row of a ``translation`` column holds both languages."""
    first = table[0]["translation"] if len(table) else {}
    return src_lang in first and tgt_lang in first


def _check_sentences(table, src_lang: str, tgt_lang: str, origin: str, header: int) -> None:
    """Fails on an empty corpus, or on the first empty or whitespace-only sentence, naming its line
    (Arrow compute: no Python loop over the corpus)."""
    import pyarrow.compute as pc

    if len(table) == 0:
        raise DataError(f"{origin}: the corpus is empty; give a corpus with sentence pairs")
    for lang in (src_lang, tgt_lang):
        offset = 0
        for column in column_chunks(table, lang):
            blank = pc.or_(pc.is_null(column), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0))
            if pc.any(blank).as_py():
                row = offset + int(pc.index(blank, True).as_py())
                raise DataError(f"{origin} line {row + 1 + header}: empty {lang!r} sentence; "
                                f"remove the line or fill it in")
            offset += len(column)


# ---------------------------------------------------------------- reading Arrow data

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


def sample_sentences(table, column: str, limit: int, seed: int) -> list[str]:
    """Up to ``limit`` sentences of a column for training the tokenizer: all of them in corpus
    order when they fit, else a seeded random sample (the order ``Tokenizer.train`` expects)."""
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


# ---------------------------------------------------------------- the bundled split

def split_corpus(path: str | Path, out_dir: str | Path, key: str = "eng", dev_size: int = 1000,
                 test_size: int = 2000, seed: int = 20261125) -> dict[str, int]:
    """Splits a TSV corpus into train/dev/test by ``key`` sentence (every pair sharing that
    sentence lands in the same split), deterministically for a given seed."""
    path, out_dir = Path(path), Path(out_dir)
    header, *lines = read_lines(path) or [""]
    rows = [line for line in lines if line]
    columns = header.split("\t")
    if key not in columns:
        raise DataError(f"{path}: no column {key!r} to split by (columns: {', '.join(columns)})")
    col = columns.index(key)
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row.split("\t")[col], []).append(row)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    splits: dict[str, list[str]] = {"test": [], "dev": [], "train": []}
    for k in keys:
        group = groups[k]
        if len(splits["test"]) + len(group) <= test_size:
            splits["test"].extend(group)
        elif len(splits["dev"]) + len(group) <= dev_size:
            splits["dev"].extend(group)
        else:
            splits["train"].extend(group)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        (out_dir / f"{name}.tsv").write_text("\n".join([header, *part]) + "\n", encoding="utf-8")
    return {name: len(part) for name, part in splits.items()}

