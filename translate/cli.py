"""The ``translate`` command line: parses options and calls library functions."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import click

from . import __version__
from .config import load_config, parse_overrides
from .corpus import iter_lines, no_tqdm_monitor, read_lines
from .errors import CheckpointError, DataError, ServiceError, TrainingError, UserError
from .glossary import read_glossary
from .runtime import DEVICES, configure_logging, configure_process, console_level
from .segment import PHRASE_WORDS, SPLITS
from .serve import DEADLINE, MAX_CONNECTIONS, MAX_COST
from .translator import CPU_PRECISION, DecodeOptions, Translator


class Command(click.Command):
    """Turns the project's user errors into one-line messages with exit code 2, and a run that
    cannot go on into one line with exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.UsageError(str(exc)) from None
        except TrainingError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)


class Group(click.Group):
    command_class = Command


logger = logging.getLogger(__name__)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="translate")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings, errors and results.")
@click.option("-v", "--verbose", is_flag=True, help="Also the resolved configuration and other details.")
def main(quiet, verbose):
    """Neural machine translation: train, evaluate and use RNN attention models.

    \b
    Examples:
      translate train                                   # the default model on the bundled es->en data
      translate train --set model.decoder=bahdanau --run-dir checkpoints/bahdanau
      translate train --config configs/tiny-cpu.yaml --max-minutes 1
      translate eval checkpoints/default                # BLEU, chrF, TER on the bundled test split
      echo "El gato come pan." | translate decode checkpoints/default --beam 5
      translate score checkpoints/default --src pairs.es --ref pairs.en
      translate repl checkpoints/default

    Every config key (model.*, train.*, data.*, tokenizer.*) can be set with --set KEY=VALUE or in
    a YAML --config; docs/configuration.md lists them, and a wrong key is an error
    that lists the valid ones. Run "translate COMMAND --help" for a command's options."""
    configure_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    configure_process()


def _echo_err(line: str) -> None:
    """A command's result on stderr (its log records go through ``logging``)."""
    click.echo(line, err=True)


def _load_translator(checkpoint: str, options: DecodeOptions, precision: str, device: str = "auto",
                     ensemble: tuple[str, ...] = ()) -> Translator:
    """``Translator.load``, with a warning when it cannot decode in the precision asked for."""
    translator = Translator.load(checkpoint, options, precision, device, ensemble)
    if translator.note:
        logger.warning(translator.note)
    logger.debug(f"decoding on {translator.device} in {translator.precision}")
    return translator


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--train", "train_path", help="Training data: TSV/CSV/JSON-lines file or PATH prefix of PATH.<lang>.")
@click.option("--dev", "dev_paths", multiple=True, help="Dev data, in the same forms as --train (or PATH.{SRC,TGT} "
              "for text files with other suffixes); repeated: the first picks best.pt, the others are scored too.")
@click.option("--src-lang", help="Source column or file suffix (default spa).")
@click.option("--tgt-lang", help="Target column or file suffix (default eng).")
@click.option("--max-steps", type=int, help="Stop after this many updates (and drop the time budget).")
@click.option("--max-epochs", type=int, help="Stop after this many passes over the training data.")
@click.option("--max-minutes", type=float, help="Stop after this many minutes of training.")
@click.option("--run-dir", default="checkpoints/default", show_default=True, type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last.pt.")
@click.option("--streaming", is_flag=True, default=None,
              help="Read the training corpus as a stream (a hub dataset or a file too big to copy to Arrow).")
@click.option("--init-from", metavar="MODEL", help="Fine-tune this model (checkpoint, run directory or exported "
              "folder): its weights, tokenizer and model config, with a new optimiser, LR schedule and step count.")
@click.option("--adapt-vocab", is_flag=True, default=None, help="With --init-from: a tokenizer of the new data, the "
              "model's rows carried over for the pieces both hold (train.init_vocab=adapt), for a large new corpus.")
@click.option("--mix", "mix_path", help="Mix a sample of this corpus (e.g. the model's original training data) into "
              "each epoch: data.mix_ratio of its tokens per training token (default 1: as many).")
def train(config_file, overrides, train_path, dev_paths, src_lang, tgt_lang, max_steps, max_epochs, max_minutes,
          run_dir, resume, streaming, init_from, adapt_vocab, mix_path):
    """Train a model (defaults: the bundled Spanish-English data, into checkpoints/default), or
    fine-tune one with --init-from."""
    from .build import train as run_training

    pairs = parse_overrides(overrides)
    dev_path, *extra_dev = dev_paths or [None]
    for key, value in (("data.train", train_path), ("data.dev", dev_path), ("data.src_lang", src_lang),
                       ("data.tgt_lang", tgt_lang), ("train.max_steps", max_steps),
                       ("train.max_epochs", max_epochs), ("train.max_minutes", max_minutes),
                       ("data.streaming", streaming), ("data.extra_dev", extra_dev or None),
                       ("train.init_from", init_from), ("data.mix", mix_path),
                       ("train.init_vocab", "adapt" if adapt_vocab else None)):
        if value is not None:
            pairs[key] = value
    if (max_steps is not None or max_epochs is not None) and "train.max_minutes" not in pairs:
        pairs["train.max_minutes"] = 0
    config = load_config(config_file, pairs)
    if logger.isEnabledFor(logging.DEBUG):
        import yaml

        logger.debug("configuration:\n" + yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
    result = run_training(config, run_dir, resume=resume)
    if result.main:
        _echo_err(result.summary())
    if result.stopped_by:  # as a shell reports a process ended by that signal
        sys.exit(143 if result.stopped_by == "SIGTERM" else 130)


DEFAULT_DECODING = DecodeOptions()


def _bounded(name: str) -> click.ParamType:
    """The click type of a DecodeOptions field, with the bounds that DecodeOptions checks."""
    bound = DecodeOptions.BOUNDS[name]
    if bound.kind is int:
        return click.IntRange(bound.low, bound.high)
    return click.FloatRange(bound.low, bound.high, min_open=bound.low_open)


# the flags of the commands that decode, by the DecodeOptions field they set ("precision": --fp32 / --bf16 / --int8;
# "device": --device, the device to decode on)
DECODING_FLAGS = {
    "beam": [click.option("--beam", default=DEFAULT_DECODING.beam, show_default=True, type=_bounded("beam"),
                          help="Beam size; 1 is greedy.")],
    "n_best": [click.option("--n-best", default=DEFAULT_DECODING.n_best, show_default=True,
                            type=_bounded("n_best"),
                            help="Print the K best translations with their scores, tab-separated.")],
    "max_len_ratio": [click.option("--max-len-ratio", default=DEFAULT_DECODING.max_len_ratio, show_default=True,
                                   type=_bounded("max_len_ratio"),
                                   help="Longest output as a multiple of the source length (plus 10).")],
    "alpha": [click.option("--alpha", default=DEFAULT_DECODING.alpha, show_default=True, type=_bounded("alpha"),
                           help="Length penalty exponent.")],
    "no_repeat_ngram": [click.option("--no-repeat-ngram", default=DEFAULT_DECODING.no_repeat_ngram, show_default=True,
                                     type=_bounded("no_repeat_ngram"), help="No translation repeats an n-gram of N "
                                     "target pieces (stops loops); 0: off.")],
    "coverage": [click.option("--coverage", default=DEFAULT_DECODING.coverage, show_default=True,
                              type=_bounded("coverage"), help="Beam search: weight of the coverage penalty (Wu et "
                              "al., 2016) that ranks lower a finished translation that left source words "
                              "unattended; 0: off.")],
    "split": [click.option("--split", default=DEFAULT_DECODING.split, show_default=True, type=click.Choice(SPLITS),
                           help="Cut each line into clauses (at . ! ? ; :) or sentences (at . ! ?), translate the "
                           "pieces together and join them, a line for a line; none: each line whole.")],
    "restore_casual": [click.option("--restore/--no-restore", "restore_casual", default=DEFAULT_DECODING.restore_casual,
                                    show_default=True, help="Give a sentence typed casually (no capital letter, or "
                                    "no final mark) the capitals and the final mark the model was trained on, and "
                                    "older Spanish spelling (fué, á) the modern one.")],
    "fold_accents": [click.option("--fold-accents/--keep-accents", "fold_accents",
                                  default=DEFAULT_DECODING.fold_accents, show_default=True,
                                  help="Spell a word carried from the source (a name) in the letters of the model's "
                                  "training targets, where dropping its accents does it: Saúl -> Saul in English.")],
    "sample": [click.option("--sample", "--sampling", "sample", is_flag=True, default=DEFAULT_DECODING.sample,
                            help="Draw each token from the model's distribution instead of searching (the beam "
                            "is then unused; an n-best of N: N draws, likeliest first, not deduplicated).")],
    "temperature": [click.option("--temperature", default=DEFAULT_DECODING.temperature, show_default=True,
                                 type=_bounded("temperature"), help="Sampling: divide the logits by T (below 1: "
                                 "surer, above 1: more varied); 0: the likeliest token.")],
    "top_k": [click.option("--top-k", default=DEFAULT_DECODING.top_k, show_default=True, type=_bounded("top_k"),
                           help="Sampling: draw from the K likeliest tokens only; 0: all.")],
    "top_p": [click.option("--top-p", default=DEFAULT_DECODING.top_p, show_default=True, type=_bounded("top_p"),
                           help="Sampling: draw from the likeliest tokens that hold P of the probability "
                           "(nucleus sampling); 1: all.")],
    "seed": [click.option("--seed", default=DEFAULT_DECODING.seed, show_default=True, type=_bounded("seed"),
                          help="Sampling: the seed; a sentence draws the same with the same seed, whatever its "
                          "batch or place in the input.")],
    "prefix": [click.option("--prefix", default=DEFAULT_DECODING.prefix, metavar="TEXT",
                            help="Every translation starts with TEXT (forced, its log-probability in the score), "
                            "and the search goes on from there; a line with a prefix is translated whole.")],
    "glossary": [click.option("--glossary", default=None, metavar="FILE", type=click.Path(dir_okay=False),
                              help="A TSV file of SOURCE<TAB>TARGET terms: a sentence that holds a source term (whole "
                              "words, any case) gets its target term in the translation (constrained beam search); "
                              "a term that cannot be placed is named on stderr.")],
    "precision": [
        click.option("--fp32", is_flag=True, help=f"Decode in full precision, also on a GPU. (By default a CPU "
                     f"decodes in {CPU_PRECISION}, which keeps BLEU within 0.1 of fp32 and is faster; a GPU under "
                     f"the checkpoint's train.amp.)"),
        click.option("--bf16", is_flag=True, help="On a CPU with native bf16, decode in bf16. (On CUDA, decoding "
                     "uses bf16/fp16 whenever the checkpoint's train.amp is on.)"),
        click.option("--int8", is_flag=True, help="On CPU, decode with int8 weights (dynamic quantisation)."),
    ],
    "shortlist": [click.option("--shortlist", default=DEFAULT_DECODING.shortlist, show_default=True,
                               type=_bounded("shortlist"), help="Score only the K likeliest translations of "
                               "each source piece (the checkpoint's lexicon) and the "
                               f"{DEFAULT_DECODING.shortlist_frequent} most frequent target pieces; 0: the whole "
                               "vocabulary.")],
    "device": [click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
                            help="Decode on this device; auto: a CUDA GPU when one is visible, else the CPU.")],
    "inter_threads": [click.option("--inter-threads", default=DEFAULT_DECODING.inter_threads, show_default=True,
                                   type=_bounded("inter_threads"), help="Batches decoded at once; 0: on a Linux CPU "
                                   "one per thread, each in a process of its own; two on other CPUs; one on GPU.")],
}


# the models decoded with CHECKPOINT as one (ensemble.py): an option rather than more arguments, so that CHECKPOINT
# stays the model whose config, languages and progress a command reports, and attend's SENTENCE stays an argument
ensemble_option = click.option("--ensemble", "ensemble", multiple=True, metavar="CHECKPOINT",
                               help="Decode with this model too (repeatable): the models' log-probabilities are "
                               "averaged at each step; they must share CHECKPOINT's tokenizer.")


def decoding_options(*names: str, **fixed):
    """Adds the decoding flags ``names`` (keys of DECODING_FLAGS) to a command, which receives
    ``options``, a DecodeOptions of those flags and ``fixed``, in their place, ``precision``
    (auto, fp32, bf16 or int8) when "precision" is among them, and ``device`` (auto, cpu or cuda)
    when "device" is."""

    def decorate(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            chosen = {name: kwargs.pop(name) for name in names if name not in ("precision", "device")}
            if "glossary" in chosen:  # a file's name -> its entries (glossary.py)
                chosen["glossary"] = read_glossary(chosen["glossary"]) if chosen["glossary"] else ()
            if chosen.get("n_best", 1) > chosen.get("beam", 1) and not chosen.get("sample"):
                raise click.UsageError(f"--n-best ({chosen['n_best']}) cannot exceed --beam ({chosen['beam']})")
            if "precision" in names:
                flags = [name for name in ("fp32", "bf16", "int8") if kwargs.pop(name)]
                if len(flags) > 1:
                    raise click.UsageError(f"--{flags[0]} and --{flags[1]} exclude each other; pick one")
                kwargs["precision"] = flags[0] if flags else "auto"
            return command(*args, options=DecodeOptions(**chosen, **fixed), **kwargs)

        for name in reversed(names):  # click lists the flags in the order of ``names``
            for flag in reversed(DECODING_FLAGS[name]):
                run = flag(run)
        return run

    return decorate


@main.command(name="eval")
@click.argument("checkpoint")
@click.option("--src", "src_file", type=click.Path(dir_okay=False), help="Source sentences, one a line.")
@click.option("--ref", "ref_file", type=click.Path(dir_okay=False), help="Reference translations, one a line.")
@click.option("--test", "test_path", help="A TSV/CSV/JSON-lines test set (default: the bundled test split).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Also write the translations here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@ensemble_option
@decoding_options("beam", "alpha", "no_repeat_ngram", "coverage", "split", "restore_casual", "fold_accents",
                  "shortlist", "precision", "device", "inter_threads", "sample", "temperature", "top_k", "top_p",
                  "seed", "prefix", "glossary")
def eval_command(checkpoint, src_file, ref_file, test_path, output, as_json, ensemble, options, precision, device):
    """Score a checkpoint with BLEU, chrF and TER (sacrebleu) on the test split or --src/--ref."""
    from .confidence import calibration_figures
    from .evaluate import score, test_set

    translator = _load_translator(checkpoint, options, precision, device, ensemble)
    config = translator.config
    if (src_file is None) != (ref_file is None):
        raise click.UsageError("give both --src and --ref, or neither")
    if src_file:
        sources, references = read_lines(src_file), read_lines(ref_file)
        if len(sources) != len(references):
            raise DataError(f"{src_file} has {len(sources)} lines but {ref_file} has {len(references)}; "
                            f"they must match line for line")
        origin = src_file
    else:
        test = test_set(config, test_path)
        sources, references, origin = test.src, test.tgt, test.origin
    if not sources:
        raise DataError(f"{origin} holds no sentences to score; give a test set with at least one pair")
    with _progress_bar(len(sources)) as advance:
        nbests = translator.translate(sources, on_progress=advance)
    hyps = [nbest[0].text for nbest in nbests]
    scores = score(hyps, references)
    # with a calibrator: mean confidence, share acceptable, ECE (confidence.py)
    calibration = {} if translator.calibrator is None else calibration_figures(nbests, references,
                                                                                translator.calibrator.threshold)
    if output:
        Path(output).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    if as_json:
        click.echo(json.dumps({**scores, "beam": options.beam, "sentences": len(sources), "test": origin,
                               "device": translator.device.type, "precision": translator.precision, **calibration}))
    else:
        click.echo(f"{origin}: {len(sources)} sentences, beam {options.beam}")
        click.echo(f"BLEU {scores['bleu']:.2f} | chrF {scores['chrf']:.2f} | TER {scores['ter']:.2f}")
        if calibration:
            click.echo(f"confidence {calibration['confidence']:.3f} | acceptable (sentence chrF >= "
                       f"{calibration['threshold']:g}) {calibration['acceptable']:.3f} | ECE {calibration['ece']:.3f}")
        click.echo(scores["signature"])


@main.command()
@click.argument("checkpoint")
@click.option("-i", "--input", "input_file", type=click.Path(dir_okay=False), help="Input file (default stdin).")
@click.option("-o", "--output", "output_file", type=click.Path(dir_okay=False), help="Output file (default stdout).")
@click.option("--scores", is_flag=True, help="Print each translation's score (log-probability, length-normalised "
              "in beam search) before it, tab-separated; with a calibrated checkpoint, its confidence after it.")
@click.option("--prefix-tab", is_flag=True, help="Each input line is SOURCE<TAB>PREFIX, as Marian's --force-decode "
              "reads them: its translation starts with PREFIX (a line without a tab: --prefix's).")
@click.option("--min-confidence", type=float, metavar="P", help="Name on stderr each line whose translation's "
              "confidence (the probability it is acceptable; a calibrated checkpoint's) is below P (0 to 1).")
@decoding_options("beam", "n_best", "max_len_ratio", "alpha", "no_repeat_ngram", "coverage", "split", "restore_casual",
                  "fold_accents", "shortlist", "precision", "device", "inter_threads", "sample", "temperature",
                  "top_k", "top_p", "seed", "prefix", "glossary")
@ensemble_option
def decode(checkpoint, input_file, output_file, scores, prefix_tab, min_confidence, options, precision, device,
           ensemble):
    """Translate lines from stdin or -i FILE to stdout or -o FILE. With --scores and a calibrated
    checkpoint, each translation's confidence follows it in a last column (n-best lists too)."""
    from .confidence import check_min_confidence

    translator = _load_translator(checkpoint, options, precision, device, ensemble)
    check_min_confidence(min_confidence, translator.calibrator, checkpoint)
    calibrated = translator.calibrator is not None
    if scores and not calibrated:
        logger.info("no confidence column: " + ("an ensemble has no calibrator" if ensemble else
                    f"{checkpoint} has no confidence calibrator (`translate calibrate` fits one)"))
    low = 0
    truncated = []
    total = _count_lines(input_file) if input_file else None
    with _progress_bar(total, quiet=not input_file) as advance, _output(output_file) as out:
        lines, prefixes = iter_lines(input_file), None
        if prefix_tab:  # one pass over the input, read twice
            first, second = itertools.tee(line.partition("\t") for line in lines)
            lines = (source for source, _, _ in first)
            prefixes = (prefix if tab else options.prefix for _, tab, prefix in second)
        stream = translator.stream(lines, on_truncate=truncated.append, on_progress=advance, prefixes=prefixes)
        for index, nbest in enumerate(stream):
            confidence = [f"\t{t.confidence:.4f}" if calibrated and scores else "" for t in nbest]
            if options.n_best == 1:
                out.write(f"{nbest[0].score:.4f}\t{nbest[0].text}{confidence[0]}\n" if scores else nbest[0].text + "\n")
            else:
                out.write("".join(f"{index}\t{t.score:.4f}\t{t.text}{c}\n" for t, c in zip(nbest, confidence)))
            if min_confidence is not None and nbest[0].confidence < min_confidence:
                low += 1
                _echo_err(f"line {index + 1}: confidence {nbest[0].confidence:.3f} below --min-confidence "
                          f"{min_confidence:g}")
    if low:
        logger.warning(f"{low} translation(s) below --min-confidence {min_confidence:g}")
    if truncated:
        logger.warning(f"{sum(truncated)} input line(s) longer than the model reads were truncated")


@main.command()
@click.argument("checkpoint")
@click.option("--src", "src_file", required=True, type=click.Path(dir_okay=False), help="Source sentences, one a line.")
@click.option("--ref", "ref_file", required=True, type=click.Path(dir_okay=False),
              help="Their translations, one a line.")
@click.option("-o", "--output", "output_file", type=click.Path(dir_okay=False), help="Output file (default stdout).")
@decoding_options("shortlist", "precision", "device")
@ensemble_option
def score(checkpoint, src_file, ref_file, output_file, options, precision, device, ensemble):
    """Score given translations (forced decoding): per pair, the log-probability per target piece
    and in all, tab-separated, in input order. For ranking or filtering a corpus. As decoding
    scores: over each source's shortlist, where a piece outside it scores -inf (--shortlist 0: over
    the whole vocabulary)."""
    translator = _load_translator(checkpoint, options, precision, device, ensemble)
    if translator.lexicon is not None and options.shortlist > 0:
        logger.info(f"scoring over each source's shortlist (--shortlist {options.shortlist}), as decoding does: a "
                    f"target piece outside it scores -inf; --shortlist 0 scores over the whole vocabulary")
    sources, references = read_lines(src_file), read_lines(ref_file)
    if len(sources) != len(references):
        raise DataError(f"{src_file} has {len(sources)} lines but {ref_file} has {len(references)}; "
                        f"they must match line for line")
    with _output(output_file) as out:
        for pair in translator.score_pairs(sources, references):
            out.write(f"{pair.per_piece:.4f}\t{pair.logprob:.4f}\n")


@contextlib.contextmanager
def _progress_bar(total: int | None, quiet: bool = False):
    """A progress bar on stderr while a file is decoded, where stderr is a terminal (and not with
    --quiet); yields the function that advances it."""
    if quiet or console_level() > logging.INFO or not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    no_tqdm_monitor()
    with tqdm(total=total, unit=" lines", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield bar.update


def _count_lines(path: str) -> int | None:
    """Lines in a file, counted in binary chunks (fast, for a progress bar's total)."""
    try:
        with open(path, "rb") as file:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    except OSError:
        return None  # iter_lines reports the problem


@contextlib.contextmanager
def _output(path: str | None):
    """stdout, or a file that appears only when complete (written beside it, then renamed)."""
    if path is None:
        yield sys.stdout
        return
    target = Path(path)
    if target.is_dir():
        raise DataError(f"{path}: is a directory; give a file path for -o")
    try:
        handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent or ".",
                                             prefix=f".{target.name}.", suffix=".tmp", delete=False)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror}; choose a writable location") from None
    try:
        with handle:
            yield handle
        os.replace(handle.name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


@main.command()
@click.argument("checkpoint")
@decoding_options("beam", "split", "restore_casual", "shortlist", "precision", "device", "sample", "temperature",
                  "top_k", "top_p", "seed", "prefix", "glossary")
@ensemble_option
def repl(checkpoint, options, precision, device, ensemble):
    """Translate lines as you type them (:help for commands)."""
    from .repl import Repl

    Repl(_load_translator(checkpoint, options, precision, device, ensemble)).run(sys.stdin, sys.stdout)


@main.command()
@click.argument("checkpoint")
@click.option("-o", "--output", "folder", required=True, type=click.Path(), help="Folder to write the model into.")
@click.option("--beam", default=DEFAULT_DECODING.beam, show_default=True, type=_bounded("beam"),
              help="Beam of the test-set scores on the model card.")
@click.option("--test", "test_path", help="The test set of the card's scores: a TSV/CSV/JSON-lines file in the "
              "model's languages (default: its data.test, else the bundled split where its languages are spa/eng).")
@click.option("--no-scores", is_flag=True, help="Leave the scores off the card (no test set is decoded).")
def export(checkpoint, folder, beam, test_path, no_scores):
    """Write a model to share: model.safetensors, config.json, the SentencePiece models and a
    README.md model card with its test scores. Every command that takes a checkpoint takes it.
    The folder appears complete or not at all."""
    from .export import export_model

    card = export_model(checkpoint, folder, beam=beam, scores=not no_scores, test=test_path)
    if card["note"]:
        logger.warning(card["note"])
    scores = card["scores"]
    summary = f"; BLEU {scores['bleu']:.2f} on {scores['test']}" if scores else ""
    click.echo(f"exported to {folder} ({card['parameters']:,} parameters{summary})")


@main.command()
@click.argument("checkpoint")
@click.option("--dev", "dev_path", help="The dev pairs to fit on: a TSV/CSV/JSON-lines file or PATH prefix (default: "
              "the model's data.dev, else the bundled dev split).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write a calibrated copy of a .pt checkpoint "
              "here (default: the checkpoint itself, replaced atomically).")
@click.option("--threshold", default=50.0, show_default=True, type=float,
              help="The sentence chrF from which a translation counts as acceptable (0 to 100).")
@decoding_options("precision", "device")
def calibrate(checkpoint, dev_path, output, threshold, options, precision, device):
    """Fit a checkpoint's confidence calibrator on dev pairs, decoded as decode decodes by default:
    the probability that a translation's sentence chrF reaches --threshold, from its log-probability."""
    from .confidence import dev_pairs, fit_on_dev, store

    translator = Translator.load(checkpoint, DecodeOptions(), precision, device, calibrated=False)
    dev = dev_pairs(translator.config, dev_path)
    calibrator = fit_on_dev(translator, dev.src, dev.tgt, threshold)
    written = store(checkpoint, calibrator, output)
    click.echo(f"calibrated on {calibrator.sentences} pairs of {dev.origin} (sentence chrF >= {threshold:g} "
               f"acceptable; dev ECE {calibrator.dev_ece:.3f}) into {written}")


@main.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(checkpoint, as_json):
    """What a checkpoint holds: model size, vocabularies, training progress, config."""
    from .checkpoint import checkpoint_info, describe_source, provenance_chain

    details = checkpoint_info(checkpoint)
    if as_json:
        click.echo(json.dumps(details))
        return
    m = details["config"]["model"]
    bleu = details["best_dev_bleu"]
    lines = [
        f"checkpoint      {details['checkpoint']}",
        f"model           {m['cell']} {'bidirectional ' if m['bidirectional'] else ''}encoder, {m['decoder']} "
        f"decoder ({m['attention']} attention), embed {m['embed_dim']}, hidden {m['hidden_dim']}, {m['layers']} "
        f"layer(s){', input feeding' if m['input_feeding'] else ''}{', layer norm' if m['layer_norm'] else ''}"
        f"{', tied embeddings' if m['tie_embeddings'] else ''}",
        f"parameters      {details['parameters']:,}",
        f"vocabulary      {details['src_vocab']:,} source / {details['tgt_vocab']:,} target"
        f"{' (joint)' if details['joint_vocab'] else ''}, tokenizer {details['tokenizer_fingerprint'][:12]}",
        f"trained         {details['step'] or 0:,} steps, {details['tokens'] or 0:,} target tokens, "
        f"{details['training_minutes']} min",
        f"best dev BLEU   {bleu:.2f} at step {details['best_step']:,}" if bleu is not None and bleu >= 0
        else "best dev BLEU   not validated yet",
        "shortlists      " + ("from its lexicon (--shortlist)" if details["shortlist_lexicon"]
                               else "none: no lexicon (written before lexicons were saved); the whole vocabulary"),
        "training text   " + (f"99.9% of the sources {details['source_words']} words or fewer (--split phrases "
                               f"keeps a clause of up to {max(PHRASE_WORDS, details['source_words'])} whole)"
                               if details["source_words"] else "sources' length not counted (written before)"),
    ]
    if details["averaged_from"]:
        lines.append(f"averaged from   {len(details['averaged_from'])} checkpoints")
    for depth, source in enumerate(provenance_chain(details["init_from"])):
        lines.append(f"{'fine-tuned from' if depth == 0 else '  which was from':<15} {describe_source(source)}")
    if details["init_from"] and details["config"]["train"]["init_vocab"] == "adapt":
        lines.append("vocabulary      adapted: a tokenizer of the fine-tuning data, the first model's rows "
                     "carried over")
    click.echo("\n".join(lines))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--last", "last", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="How many of the newest step-N.pt checkpoints to average.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write it (default RUN_DIR/averaged.pt).")
def average(run_dir, last, output):
    """Average the weights of a run's last checkpoints (kept with train.keep_checkpoints)."""
    from .checkpoint import average_checkpoints, save_checkpoint, step_checkpoints

    paths = step_checkpoints(run_dir)[-last:]
    if not paths:
        raise CheckpointError(f"{run_dir}: no step-N.pt checkpoints to average; train with "
                              f"--set train.keep_checkpoints=5 (kept at each validation)")
    target = Path(output) if output else Path(run_dir) / "averaged.pt"
    save_checkpoint(target, average_checkpoints(paths))
    click.echo(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) into {target}")


@main.command()
@click.argument("checkpoint")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="Sentences translated together, from concurrent requests.")
@click.option("--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0, 10_000),
              help="How long a request waits for others to share its batch.")
@click.option("--max-sentences", default=256, show_default=True, type=click.IntRange(1, 100_000),
              help="Most sentences in one request.")
@click.option("--timeout", "request_timeout", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a connection may idle before a request, and then to send the request whole; "
              "a client slower than that is dropped.")
@click.option("--deadline", default=DEADLINE, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a request may wait for its translation before it is answered 503 and dropped.")
@click.option("--max-connections", default=MAX_CONNECTIONS, show_default=True, type=click.IntRange(1, 100_000),
              help="Connections held at once; one more is answered 503 and closed.")
@click.option("--max-cost", default=MAX_COST, show_default=True, type=click.IntRange(1),
              help="Most a request may cost: beam x output length x source length (pieces), summed over "
              "its sentences; a costlier one is answered 413.")
@click.option("--api-keys", "api_keys_file", type=click.Path(dir_okay=False),
              help="A file of API keys, one a line (optionally followed by its own requests per minute): a "
              "request without one of them as its api_key is refused 403.")
@click.option("--req-limit", default=0, show_default=True, type=click.IntRange(0),
              help="Translation requests per minute per client IP address (0: no limit); beyond: 429.")
@click.option("--char-limit", default=0, show_default=True, type=click.IntRange(0),
              help="Characters per request (0: no limit); beyond: 400.")
@click.option("--access-log", is_flag=True, help="One line per request on stderr: client, request, status, "
              "bytes, time.")
@click.option("--cors", metavar="ORIGIN", help="Let pages from ORIGIN (or * for any) call the API from a browser.")
@click.option("--min-confidence", type=float, metavar="P", help="Flag (\"low_confidence\" in the answers) each "
              "translation whose confidence (a calibrated checkpoint's) is below P (0 to 1).")
@decoding_options("split", "restore_casual", "shortlist", "precision", "device")
@ensemble_option
def serve(checkpoint, host, port, max_batch, max_wait_ms, max_sentences, request_timeout, deadline, max_connections,
          max_cost, api_keys_file, req_limit, char_limit, access_log, cors, min_confidence, options, precision, device,
          ensemble):
    """Serve a model over HTTP: a page to translate in a browser at /; POST /translate with
    {"sentences": [...], "beam": 5} or LibreTranslate's {"q": ..., "source": ..., "target": ...};
    GET /languages; GET /health."""
    from .serve import Access, RequestBatcher, load_api_keys, make_server, model_info

    access = Access(load_api_keys(api_keys_file) if api_keys_file else None, req_limit)
    from .confidence import check_min_confidence

    translator = _load_translator(checkpoint, options, precision, device, ensemble)
    check_min_confidence(min_confidence, translator.calibrator, checkpoint)
    batcher = RequestBatcher(translator, max_batch, max_wait_ms)
    languages = (translator.config.data.src_lang, translator.config.data.tgt_lang)
    try:
        server = make_server(batcher, host, port, max_sentences=max_sentences, languages=languages,
                             info=model_info(checkpoint, translator.progress.get("step"), ensemble),
                             request_timeout=request_timeout, access_log=logger.info if access_log else None,
                             cors=cors, max_connections=max_connections, max_cost=max_cost, char_limit=char_limit,
                             deadline=deadline, access=access, min_confidence=min_confidence)
    except OSError as exc:
        raise ServiceError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    _echo_err(f"serving {checkpoint} on http://{server.server_address[0]}:{server.server_address[1]} "
              f"(a page at /, POST /translate, GET /languages, GET /health); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        batcher.close()


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
def plot(run_dir, output):
    """Plot a run's training curves (loss, dev BLEU, teacher-forcing ratio) into a PNG."""
    from .plots import plot_training

    click.echo(f"wrote {plot_training(run_dir, output)}")


@main.command()
@click.argument("checkpoint")
@click.argument("sentence")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@decoding_options("beam", "shortlist", "precision", return_attention=True)
@ensemble_option
def attend(checkpoint, sentence, output, options, precision, ensemble):
    """Translate SENTENCE and draw its attention as a heatmap PNG (pieces on the axes)."""
    from .plots import plot_attention
    from .repl import alignment

    if not sentence.strip():
        raise click.UsageError("give a sentence to translate")
    translator = _load_translator(checkpoint, options, precision, ensemble=ensemble)
    result = translator.translate([sentence])[0][0]
    src, tgt, weights = alignment(translator, sentence, result)
    click.echo(result.text)
    click.echo(f"wrote {plot_attention(src, tgt, weights, output, title=result.text)}")


@main.command(name="split-data")
@click.option("--input", "input_file", required=True, type=click.Path(dir_okay=False),
              help="TSV corpus with a header line, e.g. a Tatoeba export.")
@click.option("--out-dir", default="data", show_default=True, type=click.Path(file_okay=False),
              help="Where train.tsv, dev.tsv and test.tsv go.")
@click.option("--key", default="eng", show_default=True, help="Column whose sentences never cross splits.")
@click.option("--dev-size", default=1000, show_default=True)
@click.option("--test-size", default=2000, show_default=True)
@click.option("--seed", default=20261125, show_default=True)
def split_data(input_file, out_dir, key, dev_size, test_size, seed):
    """Make the deterministic train/dev/test split of a TSV corpus (how the bundled split in
    translate/bundled/ was made; see data/README.md)."""
    from .corpus import split_corpus

    sizes = split_corpus(input_file, out_dir, key, dev_size, test_size, seed)
    click.echo(", ".join(f"{name} {n:,} pairs" for name, n in sizes.items()) + f" in {out_dir}")


if __name__ == "__main__":
    main()
