"""SentencePiece subword tokenizer (Kudo & Richardson, 2018), joint or separate vocabularies.

The serialized models travel inside every checkpoint, so decoding never depends on files
next to it; ``fingerprint`` tells whether two tokenizers are the same.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from .errors import TokenizerError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL = 4  # the ids below are the special tokens above
WORD_START = "\u2581"  # SentencePiece's mark of a piece that starts a word


def train_sentencepiece(sentences: Sequence[str], vocab_size: int, model_type: str = "unigram",
                        character_coverage: float = 1.0, max_sentences: int = 400_000,
                        seed: int = 1234) -> bytes:
    """Trains a SentencePiece model in memory and returns its serialized proto."""
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
        raise TokenizerError("no sentences to train the tokenizer on; the training data is empty")
    if len(sentences) > max_sentences:
        sentences = random.Random(seed).sample(sentences, max_sentences)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, hard_vocab_limit=False,
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=2,
            max_sentence_length=16384, minloglevel=2)
    except RuntimeError as exc:
        raise TokenizerError(f"SentencePiece training failed: {exc}") from None
    return model.getvalue()


def _processor(proto: bytes) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as exc:
        raise TokenizerError(f"not a SentencePiece model: {exc}") from None
    if (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) != (PAD, UNK, BOS, EOS):
        raise TokenizerError("the SentencePiece model must use pad=0, unk=1, bos=2, eos=3; "
                             "retrain it with those ids or let `translate train` train one")
    return sp


def _inside_word(piece, before: bool = False) -> bool:
    """Whether ``piece`` (a SentencePiece proto piece) goes on the word next to it: letters or
    digits, and no word boundary (``▁``) between them (``before``: it may open the word)."""
    text = piece.surface.strip()
    return bool(text) and text.isalnum() and (before or not piece.piece.startswith(WORD_START))


class Tokenizer:
    """Source and target SentencePiece models (the same one when the vocabulary is joint)."""

    def __init__(self, src_proto: bytes, tgt_proto: bytes | None = None):
        self.src_proto = src_proto
        self.tgt_proto = tgt_proto if tgt_proto is not None else src_proto
        self.src = _processor(self.src_proto)
        self.tgt = self.src if self.tgt_proto == self.src_proto else _processor(self.tgt_proto)

    @property
    def joint(self) -> bool:
        return self.src_proto == self.tgt_proto

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.src_proto)
        if not self.joint:
            digest.update(self.tgt_proto)
        return digest.hexdigest()[:16]

    @classmethod
    def train(cls, src: Sequence[str], tgt: Sequence[str], vocab_size: int, model_type: str = "unigram",
              joint: bool = True, character_coverage: float = 1.0, max_sentences: int = 400_000,
              seed: int = 1234) -> Tokenizer:
        kwargs = dict(vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                      max_sentences=max_sentences, seed=seed)
        if joint:
            return cls(train_sentencepiece(list(src) + list(tgt), **kwargs))
        return cls(train_sentencepiece(src, **kwargs), train_sentencepiece(tgt, **kwargs))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Loads a joint ``.model`` file, or a run directory's ``src.model`` / ``tgt.model`` pair."""
        path = Path(path)
        try:
            if path.is_dir():
                return cls((path / "src.model").read_bytes(), (path / "tgt.model").read_bytes())
            return cls(path.read_bytes())
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer {path}: {exc.strerror}; check the path") from None

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        (directory / "src.model").write_bytes(self.src_proto)
        (directory / "tgt.model").write_bytes(self.tgt_proto)

    def encode_src(self, lines: Iterable[str]) -> list[list[int]]:
        return self.src.encode(list(lines))

    def encode_tgt(self, lines: Iterable[str]) -> list[list[int]]:
        return self.tgt.encode(list(lines))

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text of target ids. PAD, BOS and EOS are left out; an unknown piece (UNK) stays visible as
        SentencePiece writes it, " ⁇ ", rather than vanishing from the output unseen."""
        return [self.tgt.decode([i for i in seq if i not in (PAD, BOS, EOS)]) for seq in ids]

    def src_pieces(self, line: str) -> list[str]:
        return self.src.encode(line, out_type=str)

    def src_holds_word(self, word: str) -> bool:
        """Whether the source vocabulary holds ``word`` as one whole-word piece."""
        return self.src.piece_to_id(WORD_START + word) != self.src.unk_id()

    def tgt_holds_word(self, word: str) -> bool:
        """Whether the target vocabulary holds ``word`` as one whole-word piece."""
        return self.tgt.piece_to_id(WORD_START + word) != self.tgt.unk_id()

    def src_pieces_within(self, line: str, start: int, end: int) -> tuple[int, int]:
        """The first and last source piece of ``line`` that hold the characters ``start:end``."""
        begin, stop = len(line[:start].encode("utf-8")), len(line[:end].encode("utf-8"))
        pieces = self.src.encode(line, return_type="proto").pieces
        inside = [i for i, p in enumerate(pieces) if p.end > begin and p.begin < stop and p.surface.strip()]
        return (inside[0], inside[-1]) if inside else (len(pieces), len(pieces))

    def src_unknown(self, line: str) -> list[tuple[int, int, str]]:
        """The words of ``line`` that the source vocabulary cannot cover (characters its training
        text never had become UNK): for each run of UNK pieces, widened to the letters and digits
        of the word it sits in, its first and last piece and its text as written in ``line``."""
        pieces = self.src.encode(line, return_type="proto").pieces
        found: list[tuple[int, int, str]] = []
        i = 0
        while i < len(pieces):
            if pieces[i].id != UNK or (found and i <= found[-1][1]):
                i += 1
                continue
            first, last = i, i
            while last + 1 < len(pieces) and (pieces[last + 1].id == UNK or _inside_word(pieces[last + 1])):
                last += 1
            while (first > 0 and not pieces[first].piece.startswith(WORD_START)
                   and _inside_word(pieces[first - 1], True)):
                first -= 1
            found.append((first, last, "".join(p.surface for p in pieces[first: last + 1]).strip()))
            i = last + 1
        return found

    def tgt_pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.tgt.id_to_piece(int(i)) for i in ids]
