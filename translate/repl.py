"""Interactive translation: the model is loaded once, then every typed line is translated."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from .errors import ConfigError, UserError
from .glossary import read_glossary
from .segment import SPLITS
from .translator import DecodeOptions, Translation, Translator

SAMPLING = ("temperature", "top_k", "top_p", "seed")  # the options of ``Repl.set_option``

HELP = """commands:
  :beam N   beam size for the next translations (1 = greedy)
  :split M  sentences, clauses or none: how a line is cut before it is translated
  :sample on|off     draw each token from the model's distribution instead of searching
  :temperature T     sampling: divide the logits by T (0: the likeliest token)
  :top-k K           sampling: draw from the K likeliest tokens only (0: all)
  :top-p P           sampling: draw from the nucleus of probability P (1: all)
  :seed S            sampling: the seed (a line draws the same with the same seed)
  :prefix TEXT       every translation starts with TEXT (:prefix alone: none)
  :glossary FILE     a TSV file of SOURCE<TAB>TARGET terms whose target terms translations must hold
                     (:glossary alone: none)
  :confidence on|off  a calibrated model: each translation ends with its confidence (on by default)
  :attn     attention of the last translation, as a table (rows: output pieces)
  :help     this help
  :quit     leave (Ctrl-D works too; Ctrl-C cancels the line)"""


def attention_table(src_pieces: list[str], tgt_pieces: list[str], weights) -> str:
    """Renders weights (len(tgt_pieces), len(src_pieces)) as percentages in a text table."""
    rows = [[f"{100 * float(w):.0f}" for w in row] for row in weights]
    width = [max(len(p), 3) for p in src_pieces]
    label = max([len(p) for p in tgt_pieces] + [1])
    lines = [" " * label + " | " + " ".join(p.rjust(w) for p, w in zip(src_pieces, width))]
    lines.append("-" * len(lines[0]))
    for piece, row in zip(tgt_pieces, rows):
        lines.append(piece.ljust(label) + " | " + " ".join(v.rjust(w) for v, w in zip(row, width)))
    return "\n".join(lines)


def alignment(translator: Translator, line: str, result: Translation, options: DecodeOptions | None = None
              ) -> tuple[list[str], list[str], list[list[float]]]:
    """Source pieces as decoded, output pieces (each with its end-of-sentence mark) and the
    attention weights between them (rows: output pieces), from a translation of ``line`` made with
    ``return_attention`` and ``options``."""
    columns = result.attention.size(1)  # the source as decoded, cut to what the model reads
    src = translator.source_pieces(line, options)[: columns - 1] + ["</s>"]
    tgt = translator.tokenizer.tgt_pieces(result.tokens) + ["</s>"]
    return src, tgt, result.attention[: len(tgt), : len(src)].tolist()


class Repl:
    """Translates each line with ``translator`` and ``options`` (the translator's by default),
    keeping the attention of the last one for ``:attn``; with a calibrated translator each
    translation ends with its confidence, as the page and the APIs give it, until ``:confidence off``."""

    def __init__(self, translator: Translator, options: DecodeOptions | None = None):
        self.translator, self.tokenizer = translator, translator.tokenizer
        self.options = replace(options or translator.options, return_attention=True)
        self.last: tuple[str, Translation] | None = None
        self.calibrated = getattr(translator, "calibrator", None) is not None  # tests pass stand-ins without one
        self.show_confidence = self.calibrated

    def translate(self, line: str) -> str:
        result = self.translator.translate([line], self.options)[0][0]
        self.last = (line, result)
        if self.show_confidence and result.confidence is not None:
            return f"{result.text}  (confidence {result.confidence:.2f})"
        return result.text

    def command(self, line: str) -> tuple[str, bool]:
        """Runs a ``:command``; returns what to print and whether to quit."""
        name, _, arg = line[1:].strip().partition(" ")
        if name in ("quit", "q", "exit"):
            return "", True
        if name == "help":
            return HELP, False
        if name == "beam":
            return self.set_beam(arg), False
        if name == "split":
            return self.set_split(arg.strip()), False
        if name == "sample":
            return self.set_sample(arg.strip()), False
        if name.replace("-", "_") in SAMPLING:
            return self.set_option(name.replace("-", "_"), arg.strip()), False
        if name == "prefix":
            return self.set_prefix(arg.strip()), False
        if name == "glossary":
            return self.set_glossary(arg.strip()), False
        if name == "confidence":
            return self.set_confidence(arg.strip()), False
        if name == "attn":
            return self.attention(), False
        return f"unknown command :{name}; :help lists them", False

    def set_beam(self, arg: str) -> str:
        """``:beam N``; DecodeOptions says what a beam may be."""
        try:
            beam = int(arg)
        except ValueError:
            return f"usage: :beam N with N {DecodeOptions.BOUNDS['beam'].describe()}"
        try:
            self.options = replace(self.options, beam=beam, n_best=min(self.options.n_best, beam))
        except ConfigError as exc:
            return f"usage: :beam N; {exc}"
        return f"beam {beam}"

    def set_sample(self, arg: str) -> str:
        """``:sample on|off``; sampling draws one translation, so n_best stays 1."""
        if arg not in ("on", "off"):
            return "usage: :sample on|off"
        self.options = replace(self.options, sample=arg == "on")
        return f"sample {arg}"

    def set_option(self, name: str, arg: str) -> str:
        """``:temperature T`` and the like: a number, checked against ``DecodeOptions.BOUNDS``."""
        bound = DecodeOptions.BOUNDS[name]
        label = ":" + name.replace("_", "-")
        try:
            value = bound.kind(arg)
        except ValueError:
            return f"usage: {label} {name[0].upper()} with {name[0].upper()} {bound.describe()}"
        try:
            self.options = replace(self.options, **{name: value})
        except ConfigError as exc:
            return f"usage: {label}; {exc}"
        return f"{name.replace('_', '-')} {value:g}" + ("" if self.options.sample else " (:sample on to sample)")

    def set_prefix(self, arg: str) -> str:
        try:
            self.options = replace(self.options, prefix=arg)
        except ConfigError as exc:
            return f"usage: :prefix TEXT; {exc}"
        return f"prefix {arg!r}" if arg else "no prefix"

    def set_glossary(self, arg: str) -> str:
        """``:glossary FILE``, read as ``--glossary`` reads it; ``:glossary`` alone: none."""
        try:
            self.options = replace(self.options, glossary=read_glossary(arg) if arg else ())
        except UserError as exc:
            return f"usage: :glossary FILE; {exc}"
        return f"glossary of {len(self.options.glossary)} entries from {arg}" if arg else "no glossary"

    def set_confidence(self, arg: str) -> str:
        """``:confidence on|off``: only a model with a calibrator has a confidence to show."""
        if arg not in ("on", "off"):
            return "usage: :confidence on|off"
        if not self.calibrated:
            return "this model has no confidence calibrator (translate calibrate fits one)"
        self.show_confidence = arg == "on"
        return f"confidence {arg}"

    def set_split(self, arg: str) -> str:
        """``:split MODE``; segment.SPLITS names the modes."""
        if arg not in SPLITS:
            return f"usage: :split MODE with MODE one of {', '.join(SPLITS)}"
        self.options = replace(self.options, split=arg)
        return f"split {arg}"

    def attention(self) -> str:
        if self.last is None or self.last[1].attention is None:
            return "nothing translated yet"
        return attention_table(*alignment(self.translator, *self.last, self.options))

    def handle(self, line: str) -> tuple[str, bool]:
        line = line.rstrip("\r\n")
        if line.startswith(":"):
            return self.command(line)
        return self.translate(line), False

    def run(self, stdin: TextIO, stdout: TextIO) -> None:
        if stdin.isatty():
            self._interactive(stdout)
            return
        for line in stdin:
            out, quit_ = self.handle(line)
            if quit_:
                break
            stdout.write(out + "\n")
            stdout.flush()

    def _interactive(self, stdout: TextIO) -> None:
        history = Path(os.environ.get("TRANSLATE_HISTORY", Path.home() / ".translate_history"))
        try:
            import readline

            try:
                readline.read_history_file(history)
            except OSError:
                pass
        except ImportError:
            readline = None
        stdout.write("translate repl: type a sentence; :help for commands, Ctrl-D to leave\n")
        try:
            while True:
                try:
                    line = input("> ")
                except KeyboardInterrupt:
                    stdout.write("\n")
                    continue
                except EOFError:
                    stdout.write("\n")
                    break
                try:
                    out, quit_ = self.handle(line)
                except KeyboardInterrupt:
                    stdout.write("\n(cancelled)\n")
                    continue
                if quit_:
                    break
                stdout.write(out + "\n")
        finally:
            if readline is not None:
                try:
                    readline.write_history_file(history)
                except OSError:
                    pass
