"""Parallel corpora: loading through ``datasets``, checks, token-budget batches with length bucketing.

Mask convention everywhere: ``mask`` is True on real tokens and False on padding.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .tokenizer import BOS, EOS, PAD

TABLE_SUFFIXES = {".tsv": "\t", ".csv": ","}
JSON_SUFFIXES = {".json", ".jsonl"}
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


@dataclass
class Parallel:
    """Sentence pairs as read, with where they came from (for messages)."""

    src: list[str]
    tgt: list[str]
    origin: str


# ---------------------------------------------------------------- reading

def _unreadable(path: Path, exc: OSError) -> DataError:
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{path}: file not found; check the path")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{path}: is a directory, not a data file; give a file path")
    return DataError(f"{path}: cannot read ({exc.strerror}); check its permissions")


def check_utf8(path: Path) -> bytes:
    """Reads a file and fails with the line number of the first byte that is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8; re-encode the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)") from None
    return raw


def check_utf8_stream(path: Path, chunk_size: int = 1 << 20) -> str:
    """``check_utf8`` for files of any size: reads in chunks, fails with the line number of the
    first byte that is not UTF-8 or if the file holds no text, and returns the first line."""
    import codecs

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
    if not seen_text:
        raise DataError(f"{path}: the file is empty; give a corpus with sentence pairs")
    return first or ""


def data_source(spec: str, src_lang: str, tgt_lang: str) -> tuple[str, Path, tuple[Path, Path]]:
    """What a corpus spec names: ``"table"`` (a TSV/CSV/JSON-lines file), ``"pair"`` (the text
    files ``PATH.<src>``/``PATH.<tgt>``) or ``"hub"`` (a dataset name), with its path and the
    text-pair paths. A local-looking path that names none of these is an error."""
    path = Path(spec).expanduser()
    pair = (Path(f"{path}.{src_lang}"), Path(f"{path}.{tgt_lang}"))
    if path.suffix.lower() in TABLE_SUFFIXES or path.suffix.lower() in JSON_SUFFIXES or path.is_file():
        return "table", path, pair
    if pair[0].exists() or pair[1].exists():
        return "pair", path, pair
    if path.exists() or spec.startswith((".", "/", "~")) or path.suffix:
        raise DataError(f"{spec}: no such data file, and no {pair[0].name} / {pair[1].name} beside it; "
                        f"give a TSV/CSV/JSON-lines file or a prefix of plain-text files")
    return "hub", path, pair


def read_parallel(spec: str, src_lang: str, tgt_lang: str, split: str = "train") -> Parallel:
    """Reads sentence pairs from a TSV/CSV/JSON-lines file, a ``PATH.src``/``PATH.tgt`` pair of
    text files, or a hub dataset (``NAME`` or ``NAME:CONFIG``; needs network)."""
    kind, path, pair = data_source(spec, src_lang, tgt_lang)
    if kind == "table":
        parallel = _read_table(path, src_lang, tgt_lang)
    elif kind == "pair":
        parallel = _read_text_pair(pair[0], pair[1])
    else:
        parallel = _read_hub(spec, src_lang, tgt_lang, split)
    _check_pairs(parallel, src_lang, tgt_lang)
    return parallel


def _read_table(path: Path, src_lang: str, tgt_lang: str) -> Parallel:
    import datasets

    raw = check_utf8(path)
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; give a corpus with sentence pairs")
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        loader, kwargs = "json", {}
    else:
        delimiter = TABLE_SUFFIXES.get(suffix, "\t")
        header = raw.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")
        columns = next(csv.reader([header], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])
        _check_columns(path, columns, src_lang, tgt_lang)
        if not raw.partition(b"\n")[2].strip():
            raise DataError(f"{path}: the corpus is empty (a header and no pairs); give a corpus with sentence pairs")
        features = datasets.Features({c: datasets.Value("string") for c in columns})
        loader = "csv"
        kwargs = dict(delimiter=delimiter, quoting=csv.QUOTE_NONE, keep_default_na=False,
                      na_filter=False, features=features)
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(loader, data_files=str(path.resolve()), split="train", **kwargs)
    except Exception as exc:  # datasets wraps parser errors in many types
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot be parsed as {loader.upper()} ({reason}); check its format") from None
    _check_columns(path, table.column_names, src_lang, tgt_lang)
    src, tgt = table[src_lang], table[tgt_lang]
    return Parallel(["" if s is None else str(s) for s in src], ["" if t is None else str(t) for t in tgt],
                    str(path))


def _check_columns(path: Path, columns: Sequence[str], src_lang: str, tgt_lang: str) -> None:
    missing = [c for c in (src_lang, tgt_lang) if c not in columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(columns) or 'none'}); "
                        f"pick them with --src-lang/--tgt-lang")


def _read_text_pair(src_path: Path, tgt_path: Path) -> Parallel:
    src = _read_lines(src_path)
    tgt = _read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                        f"parallel files must have one sentence a line, line for line")
    return Parallel(src, tgt, f"{src_path.with_suffix('')}.{{{src_path.suffix[1:]},{tgt_path.suffix[1:]}}}")


def _read_lines(path: Path) -> list[str]:
    text = check_utf8(path).decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _read_hub(name: str, src_lang: str, tgt_lang: str, split: str) -> Parallel:
    import datasets

    hub_name, _, config = name.partition(":")
    try:
        table = datasets.load_dataset(hub_name, config or None, split=HUB_SPLITS.get(split, split))
    except Exception as exc:
        raise DataError(f"{name}: not a local file and could not be loaded as a hub dataset "
                        f"({type(exc).__name__}); check the path or your network") from None
    if src_lang in table.column_names and tgt_lang in table.column_names:
        return Parallel(table[src_lang], table[tgt_lang], name)
    if "translation" in table.column_names:
        rows = table["translation"]
        if rows and src_lang in rows[0] and tgt_lang in rows[0]:
            return Parallel([r[src_lang] for r in rows], [r[tgt_lang] for r in rows], name)
    raise DataError(f"{name}: no fields {src_lang!r}/{tgt_lang!r} (columns: {', '.join(table.column_names)}); "
                    f"pick them with --src-lang/--tgt-lang")


def _check_pairs(parallel: Parallel, src_lang: str, tgt_lang: str) -> None:
    if not parallel.src:
        raise DataError(f"{parallel.origin}: the corpus is empty; give a corpus with sentence pairs")
    header = 1 if Path(parallel.origin).suffix.lower() in TABLE_SUFFIXES else 0
    for side, lang in ((parallel.src, src_lang), (parallel.tgt, tgt_lang)):
        for i, sentence in enumerate(side):
            if not sentence.strip():
                raise DataError(f"{parallel.origin} line {i + 1 + header}: empty {lang!r} sentence; "
                                f"remove the line or fill it in")


def iter_lines(path: str | None) -> Iterator[str]:
    """Streams a plain-text file (or stdin for ``None``/'-') line by line, failing with the line
    number of the first line that is not UTF-8. A file is checked in a first pass, so a bad
    line stops the job before anything is translated."""
    import sys

    if path is None or path == "-":
        yield from _decode_lines(sys.stdin.buffer, "stdin")
        return
    try:
        with open(path, "rb") as handle:
            for _ in _decode_lines(handle, path):
                pass
        with open(path, "rb") as handle:
            yield from _decode_lines(handle, path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a text file; give a file path") from None
    except PermissionError:
        raise DataError(f"{path}: cannot read (permission denied); check its permissions") from None


def _decode_lines(handle, name: str) -> Iterator[str]:
    for number, raw in enumerate(handle, start=1):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise DataError(f"{name} line {number}: not valid UTF-8; re-encode the input as UTF-8") from None


def read_lines(path: str | None) -> list[str]:
    """Reads a plain-text file (one sentence a line) with UTF-8 checks; ``None`` or '-' is stdin."""
    if path is None or path == "-":
        import sys

        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(f"stdin line {line}: not valid UTF-8; re-encode the input as UTF-8") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [line.rstrip("\r") for line in lines]
    return _read_lines(Path(path))


# ---------------------------------------------------------------- the bundled split

def split_corpus(path: str | Path, out_dir: str | Path, key: str = "eng", dev_size: int = 1000,
                 test_size: int = 2000, seed: int = 20261125) -> dict[str, int]:
    """Splits a TSV corpus into train/dev/test by ``key`` sentence (every pair sharing that
    sentence lands in the same split), deterministically for a given seed."""
    path, out_dir = Path(path), Path(out_dir)
    lines = check_utf8(path).decode("utf-8").split("\n")
    header, rows = lines[0], [line for line in lines[1:] if line]
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


# ---------------------------------------------------------------- ids and batches

class Encoded:
    """Token ids of many sentences in one flat array (no per-sentence Python lists)."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        self.offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.ids = np.fromiter((i for s in sequences for i in s), dtype=np.int32, count=int(self.offsets[-1]))
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]: self.offsets[i + 1]]


@dataclass
class Batch:
    src: torch.Tensor  # (batch, src_len) ids with EOS, PAD after it
    src_lengths: torch.Tensor  # (batch,) on the CPU, for packing
    src_mask: torch.Tensor  # (batch, src_len) True on real tokens
    tgt_in: torch.Tensor | None  # (batch, tgt_len) BOS y1 .. yn, PAD after
    tgt_out: torch.Tensor | None  # (batch, tgt_len) y1 .. yn EOS, PAD after
    indices: list[int]  # the sentences' positions in the corpus

    @property
    def size(self) -> int:
        return self.src.size(0)

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        move = lambda t: None if t is None else t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.src), self.src_lengths, move(self.src_mask), move(self.tgt_in),
                     move(self.tgt_out), self.indices)


def collate(src: Encoded, tgt: Encoded | None, indices: Sequence[int], max_src_len: int | None = None) -> Batch:
    """Pads one batch; source gets EOS, target gets BOS (input) and EOS (output)."""
    src_seqs = [src[i] if max_src_len is None else src[i][: max_src_len - 1] for i in indices]
    src_lengths = torch.tensor([len(s) + 1 for s in src_seqs], dtype=torch.long)
    src_ids = torch.full((len(indices), int(src_lengths.max())), PAD, dtype=torch.long)
    for row, seq in enumerate(src_seqs):
        src_ids[row, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        src_ids[row, len(seq)] = EOS
    src_mask = src_ids != PAD
    tgt_in = tgt_out = None
    if tgt is not None:
        tgt_seqs = [tgt[i] for i in indices]
        width = max(len(t) for t in tgt_seqs) + 1
        tgt_in = torch.full((len(indices), width), PAD, dtype=torch.long)
        tgt_out = torch.full((len(indices), width), PAD, dtype=torch.long)
        for row, seq in enumerate(tgt_seqs):
            ids = torch.from_numpy(seq.astype(np.int64))
            tgt_in[row, 0] = BOS
            tgt_in[row, 1: len(seq) + 1] = ids
            tgt_out[row, : len(seq)] = ids
            tgt_out[row, len(seq)] = EOS
    return Batch(src_ids, src_lengths, src_mask, tgt_in, tgt_out, list(indices))


def token_batches(lengths: np.ndarray, batch_tokens: int, rng: np.random.Generator | None = None,
                  pool_batches: int = 50) -> list[np.ndarray]:
    """Groups sentence indices into batches of at most ``batch_tokens`` padded tokens.

    ``lengths`` is each example's padded length (the longer side); 0 leaves an example out. With
    ``rng`` the corpus is shuffled, then sorted by length inside pools of ``pool_batches``
    batches (length bucketing: little padding, yet random batches), and the batches are
    shuffled; without it, batches follow length order (for decoding). Works on the lengths alone
    (a few bytes a sentence), never on the sentences, and loops over batches, not sentences.
    """
    n = len(lengths)
    index_type = np.int32 if n < 2 ** 31 else np.int64
    kept = lengths > 0
    order = np.arange(n, dtype=index_type) if kept.all() else np.flatnonzero(kept).astype(index_type)
    del kept
    if rng is not None:
        rng.shuffle(order)  # the same permutation as rng.permutation, without an int64 copy
    count = len(order)
    mean = max(1.0, float(lengths.sum(dtype=np.float64)) / count) if count else 1.0
    pool = max(1, int(pool_batches * batch_tokens / mean)) if rng is not None else max(count, 1)
    batches: list[np.ndarray] = []
    for start in range(0, count, pool):
        chunk = order[start: start + pool]
        chunk[:] = chunk[np.argsort(lengths[chunk], kind="stable")]  # in place: batches are views of order
        sizes = lengths[chunk].astype(np.int64)  # ascending
        i, m = 0, len(chunk)
        while i < m:
            # the longest run chunk[i:j] whose padded size sizes[j-1] * (j - i) fits; at least one
            lo, hi = i + 1, min(m, i + max(1, batch_tokens // int(sizes[i])))
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if sizes[mid - 1] * (mid - i) <= batch_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            batches.append(chunk[i:lo])
            i = lo
    if rng is not None:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def padding_fraction(lengths: np.ndarray, batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions in the batches (0 = no padding)."""
    real = padded = 0
    for batch in batches:
        sizes = lengths[batch]
        real += int(sizes.sum())
        padded += int(sizes.max()) * len(batch)
    return 1 - real / padded if padded else 0.0


class TrainingData:
    """A tokenized training corpus (in memory or on disk) and its epoch-by-epoch batches. Pairs
    with an empty side or a side longer than ``max_len`` pieces stay in the corpus but never
    enter a batch."""

    def __init__(self, src, tgt, batch_tokens: int, seed: int, max_len: int | None = None):
        self.src, self.tgt = src, tgt
        self.batch_tokens, self.seed = batch_tokens, seed
        # padded length (the longer side + EOS/BOS), 0 for pairs left out; 2 bytes a pair, computed
        # a million pairs at a time, so a corpus of any size needs no large temporaries
        n = len(src.lengths)
        self.lengths = np.empty(n, dtype=np.uint16)
        for start in range(0, n, 1 << 20):
            s_len = np.asarray(src.lengths[start: start + (1 << 20)])
            t_len = np.asarray(tgt.lengths[start: start + (1 << 20)])
            part = np.minimum(np.maximum(s_len, t_len), 65534).astype(np.uint16) + 1
            part[(s_len == 0) | (t_len == 0)] = 0
            if max_len is not None:
                part[part > max_len + 1] = 0
            self.lengths[start: start + len(part)] = part
        self.size = int(np.count_nonzero(self.lengths))
        self.dropped = n - self.size

    def __len__(self) -> int:
        return self.size

    def target_tokens(self, indices: Sequence[int]) -> int:
        """Target tokens the loss counts for these examples (each sentence and its EOS)."""
        indices = np.asarray(indices)
        return int(self.tgt.lengths[indices].sum(dtype=np.int64)) + len(indices)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch; the same for the same seed and epoch (for exact resume)."""
        rng = np.random.default_rng([self.seed, epoch])
        return token_batches(self.lengths, self.batch_tokens, rng)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        for position, indices in enumerate(self.epoch_batches(epoch)[start:], start=start):
            yield position, collate(self.src, self.tgt, indices)

    def steps(self, epoch: int, start: int, group: int, mine: slice) -> Iterator[tuple[int, list[Batch], int]]:
        """(position after the step, this process's collated batches, target tokens of the whole
        step) for each optimiser step of the epoch from batch ``start`` on. A step takes ``group``
        consecutive batches; an incomplete tail is left for the next epoch's shuffle."""
        batches = self.epoch_batches(epoch)
        for position in range(start, len(batches) - group + 1, group):
            step = batches[position: position + group]
            yield (position + group, [collate(self.src, self.tgt, b) for b in step[mine]],
                   sum(self.target_tokens(b) for b in step))

