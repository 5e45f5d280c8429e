"""Setting up a training run and running it. ``build_trainer`` makes everything a run needs ready
before its loop starts: the process group, the run directory and the resume rules, threads,
device and seeds, the tokenizer, the batched training corpus and the dev set (``Corpora``), the
model, optimiser, LR schedule and mixed precision (``Learner``), the run's files (``RunOutput``)
and its ``Validator``; ``training.Trainer`` only runs the loop (the split of Sockeye's train.py
and OpenNMT-py's build_trainer). ``train`` builds, runs and cleans up."""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .casual import accented_pieces
from .checkpoint import (
    PRECISIONS,
    CheckpointSaver,
    Progress,
    Source,
    describe_source,
    load_source,
    precision_name,
    restore_tokenizer,
    restore_training_state,
)
from .confidence import fit_on_dev, store
from .config import Config, finetune_config, resume_config, shown_path
from .corpus import Parallel, corpus_name, first_sentences, load_pairs, read_parallel, sample_sentences
from .data import MixedData, StreamingData, TrainingData, padding_fraction
from .distributed import World, barrier, broadcast, init_world, leave
from .encoded import Encoded, tokenize_corpus
from .errors import ConfigError, DataError
from .model import build_model
from .mrt import MinimumRisk
from .rundir import MetricsLog, ProgressLine, TrainLog, open_run_dir, refuse_a_run, write_config
from .runtime import amp_dtype, seed_everything, select_device, set_rng_state
from .schedules import LRSchedule, scaled_lr
from .shortlist import Lexicon, build_lexicon
from .tokenizer import WORD_START, Tokenizer
from .training import Corpora, Learner, RunOutput, ScheduledForward, Trainer, TrainResult
from .translator import Translator, stand_ins_for
from .validation import DevSet, Validator
from .vocabulary import adapt_weights, shared_pieces

logger = logging.getLogger(__name__)
training_logger = logging.getLogger("translate.training")  # the progress lines: the loop's own


def train(config: Config, run_dir: str | Path, resume: bool = False,
          progress_bar: bool | None = None) -> TrainResult:
    """Trains (or resumes) a model in ``run_dir``. Under torchrun every process calls this; the
    process group is left when training ends. Messages go to the ``translate`` logger (and the
    run's train.log); the result says what the run reached."""
    finished, trainer, calibration = False, None, None
    try:
        trainer = build_trainer(config, run_dir, resume, progress_bar)
        result = trainer.run()
        calibration = to_calibrate(trainer, result)
        finished = True
    except BaseException as exc:
        if trainer is not None:
            trainer.train_log.close()
        traceback.clear_frames(exc.__traceback__)  # the frames' locals (the trainer) go with the group
        raise
    finally:
        # the trainer's DistributedDataParallel holds the process group (through reference cycles):
        # it goes before the group does, so no gloo object is left for interpreter exit to tear down
        trainer = None
        gc.collect()
        leave(finished)
    if calibration is not None:  # after the process group is left: the other ranks wait for nothing
        calibrate_run(*calibration)
    return result


def to_calibrate(trainer: Trainer, result: TrainResult) -> tuple[Path, DevSet, torch.device] | None:
    """Rank 0, once a run has ended (not stopped to be resumed), with ``train.calibrate``: the
    checkpoint to calibrate (best.pt, else last.pt), the dev set and the device; else None."""
    target = result.best_checkpoint or result.last_checkpoint
    if (not result.main or trainer.validator is None or not trainer.config.train.calibrate or result.stopped_by
            or target is None):
        return None
    return target, trainer.validator.dev, trainer.device


def calibrate_run(target: Path, dev: DevSet, device: torch.device) -> None:
    """The confidence calibrator (confidence.py) fitted on ``dev`` as ``target`` decodes it by
    default, written into ``target``. The run's weights and figures stay as they are."""
    try:
        translator = Translator.load(target, device=device, calibrated=False)
        calibrator = fit_on_dev(translator, dev.sources, dev.references)
    except DataError as exc:
        logger.warning(f"no confidence calibrator in {shown_path(target)}: {exc}")
        return
    store(target, calibrator)
    logger.info(f"confidence calibrated on {calibrator.sentences} dev sentences (chrF >= {calibrator.threshold:g} "
                f"acceptable; ECE {calibrator.dev_ece:.3f}) into {shown_path(target)}")


def build_trainer(config: Config, run_dir: str | Path, resume: bool = False,
                  progress_bar: bool | None = None) -> Trainer:
    """A ``Trainer`` for a new run in ``run_dir``, or for the run there with ``resume``. Under
    torchrun every process calls this; rank 0 alone logs, validates and writes files."""
    world = init_world(config.train.device, config.train.dist_timeout_minutes)
    source = None
    if world.main and not resume and config.train.init_from:
        refuse_a_run(run_dir)  # checked before the source is read; open_run_dir checks it again
        source = load_source(config.train.init_from)
        if config.train.init_vocab == "keep":
            _check_tokenizer(config, source)
        config = finetune_config(config, source.config)
    if world.main and not resume and (source is not None or config.data.mix or config.data.extra_dev):
        _check_corpora(config)  # a new run's mistakes found before its directory is made
    payload = broadcast(world, open_run_dir(run_dir, resume) if world.main else None)
    if payload is not None:
        config = resume_config(config, Config.from_dict(payload["config"]))
    config = broadcast(world, config)  # (rank 0's source stays there: DDP gives its weights to the others)
    if world.main:  # the run directory keeps the resolved config and everything the run says
        write_config(run_dir, config)
    train_log = TrainLog(run_dir if world.main else None)
    try:
        return _assemble(config, world, payload, Path(run_dir), train_log, progress_bar, source)
    except BaseException:  # a run that cannot start leaves the logger as it found it
        train_log.close()
        raise


def _check_tokenizer(config: Config, source: Source) -> None:
    """A fine-tuning run keeps its source's tokenizer: ``tokenizer.model`` may only name that one."""
    given = config.tokenizer.model
    if given and given != source.config.tokenizer.model:
        fingerprint = Tokenizer.load(given).fingerprint
        if fingerprint != source.tokenizer.fingerprint:
            raise ConfigError(f"tokenizer.model={given} is another tokenizer (fingerprint {fingerprint[:12]}) than "
                              f"the one of the model given with --init-from ({source.tokenizer.fingerprint[:12]}); "
                              f"fine-tuning keeps that model's tokenizer: drop tokenizer.model")


def _check_corpora(config: Config) -> None:
    """Reads the corpora of a run as it will read them, so that a missing, empty or broken one is
    an error before anything is written (the reads are cached: the run reads them again quickly)."""
    data = config.data
    for spec in (data.train, data.mix):
        if spec:
            load_pairs(spec, data.src_lang, data.tgt_lang, "train", streaming=data.streaming)
    for spec in (data.dev, *data.extra_dev):
        read_parallel(spec, data.src_lang, data.tgt_lang, "dev")


def _assemble(config: Config, world: World, payload: dict | None, run_dir: Path, train_log: TrainLog,
              progress_bar: bool | None, source: Source | None = None) -> Trainer:
    """``build_trainer``'s parts, in the order they depend on each other; ``source``: the model a
    new fine-tuning run starts from."""
    cfg = config.train
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    seed_everything(cfg.seed + world.rank)  # each rank its own dropout masks

    corpora = prepare_corpora(config, world, payload, run_dir, source)
    saved_precision = None if payload is None else payload.get("precision")
    learner = build_learner(config, world, corpora.tokenizer, device, saved_precision)
    progress = Progress()
    if payload is not None:
        progress = restore_learner(payload, learner, world, cfg.seed)
        learner.origin = payload.get("init_from")
        logger.info(f"resumed {run_dir} at step {progress.step} (epoch {progress.epoch + 1}, "
                    f"best dev BLEU {max(progress.best_bleu, 0):.2f})")
    elif source is not None:  # (the other ranks take rank 0's weights when DDP wraps the model)
        weights, vocabulary = source.weights, "tokenizer"
        if cfg.init_vocab == "adapt":
            weights = adapt_weights(weights, source.tokenizer, corpora.tokenizer)
            shared, total = shared_pieces(source.tokenizer, corpora.tokenizer)
            vocabulary = f"rows for the {shared:,} of this run's {total:,} pieces that it has (vocabulary adapted)"
        learner.model.load_state_dict(weights)
        learner.origin = source.provenance
        logger.info(f"fine-tuning {describe_source(source.provenance)}: its weights, {vocabulary} and model config; "
                    f"a new optimiser, LR schedule and step count")
    if world.distributed:  # wrapping broadcasts rank 0's parameters to every rank
        learner.forward = DistributedDataParallel(learner.forward,
                                                  device_ids=[device.index] if device.type == "cuda" else None)
    in_place = (sys.stderr.isatty() if progress_bar is None else progress_bar) and world.main
    main = world.main  # rank 0 alone validates and writes files
    output = RunOutput(run_dir, ProgressLine(training_logger.info, in_place, train_log), train_log,
                       saver=CheckpointSaver(run_dir, cfg.keep_checkpoints) if main else None,
                       metrics=MetricsLog(run_dir, cfg.tensorboard) if main else None)
    validator = Validator(learner.model, corpora.tokenizer, corpora.dev, beam=cfg.eval_beam, amp=cfg.amp,
                          device=device, amp_dtype=learner.amp_dtype, lexicon=corpora.lexicon,
                          extra=corpora.extra_dev, stand_in_names=stand_ins_for(config)) if main else None
    trainer = Trainer(config, world, corpora, learner, progress, output, validator)
    _announce(trainer)
    return trainer


def build_learner(config: Config, world: World, tokenizer: Tokenizer, device: torch.device,
                  saved_precision: dict | None = None) -> Learner:
    """A new model on ``device`` and what trains it: Adam at the LR scaled for the world size, the
    LR schedule, the mixed-precision type (``training_precision``; ``saved_precision``: what a
    resumed run's checkpoint says it trained in) and fp16's loss scaler."""
    cfg = config.train
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).to(device)
    peak_lr = scaled_lr(cfg, world.size)
    precision = training_precision(world, device, cfg.amp, saved_precision)
    # the training pass of train.objective: scheduled teacher forcing's cross-entropy, or minimum risk training
    forward = MinimumRisk(model, cfg, tokenizer) if cfg.objective == "mrt" else ScheduledForward(model, cfg)
    return Learner(model, forward, make_adam(model, peak_lr), LRSchedule(cfg, peak_lr),
                   torch.amp.GradScaler("cuda", enabled=precision == torch.float16), device, precision)


def training_precision(world: World, device: torch.device, mode: str, saved: dict | None = None) -> torch.dtype | None:
    """The autocast type of a run for ``train.amp`` = ``mode``: rank 0's decision, sent to every
    rank (``auto`` on a CPU times bf16 against fp32, and timings differ from process to process,
    so ranks deciding for themselves could train in different types). A resumed run with
    ``auto`` on the kind of device it ``saved`` (its checkpoint's ``precision``, written by
    ``training_payload``) keeps that type, whatever a timing now says: exact resume must not
    switch precision."""
    decision = None
    if world.main:
        try:
            decision = ("ok", precision_name(_precision_for(device, mode, saved)))
        except ConfigError as exc:  # said on every rank, not only where it was found
            decision = ("error", str(exc))
    outcome, value = broadcast(world, decision)
    if outcome == "error":
        raise ConfigError(value)
    return PRECISIONS[value]


def _precision_for(device: torch.device, mode: str, saved: dict | None) -> torch.dtype | None:
    if mode == "auto" and saved and saved.get("device") == device.type and saved.get("amp") in PRECISIONS:
        try:
            return amp_dtype(device, saved["amp"])
        except ConfigError:  # this device cannot: decided anew
            logger.warning(f"the run trained in {saved['amp']}, which {device} lacks; train.amp=auto decides again")
    return amp_dtype(device, mode)


def restore_learner(payload: dict, learner: Learner, world: World, seed: int) -> Progress:
    """Loads a resumed run's checkpoint into ``learner``; returns the run's progress. Every rank
    takes its own RNG state where the checkpoint has it."""
    progress = restore_training_state(payload, learner.model, learner.optimizer, learner.lr_schedule,
                                      learner.scaler, learner.device)
    if world.rank:  # restore_training_state set rank 0's RNG state; this rank's own, if saved
        own = payload.get("rank_rng") or []
        if len(own) == world.size:
            set_rng_state(own[world.rank], learner.device)
        else:  # saved by a run of another size (or an earlier version): new masks of its own
            torch.manual_seed(seed + world.rank + 7919 * progress.step)
    return progress


def _announce(trainer: Trainer) -> None:
    """What the run trains on and where, said once it is built."""
    cfg, data, world = trainer.config.train, trainer.data, trainer.world
    if isinstance(data, StreamingData):  # a stream: no epoch to count ahead
        corpus = f"a streamed corpus, bucketed in pools of {data.pool:,} pairs"
    else:
        epoch_batches = data.epoch_batches(trainer.progress.epoch)
        corpus = (f"{len(data):,} training pairs, {len(epoch_batches):,} batches an epoch "
                  f"(padding {padding_fraction(data.lengths, epoch_batches):.1%})")
    precision = f" with {str(trainer.amp_dtype).split('.')[-1]}" if trainer.amp_dtype else ""
    logger.info(f"{corpus}; {trainer.model.parameter_count():,} parameters; device {trainer.device}{precision}; "
                f"run directory {trainer.run_dir}")
    batches = cfg.accumulate * world.size
    if batches > 1:
        logger.info(f"{world.size} process(es) x accumulate {cfg.accumulate}: {batches} batches (up to "
                    f"{cfg.batch_tokens * batches:,} tokens) a step; peak lr {trainer.lr_schedule.peak:.2e} "
                    f"(train.lr_scaling={cfg.lr_scaling})")


def prepare_corpora(config: Config, world: World, payload: dict | None, run_dir: Path,
                    source: Source | None = None) -> Corpora:
    """Reads the training corpus (Arrow, memory-mapped; or a stream with ``data.streaming``), the
    mixed corpus (``data.mix``) and the dev sets, trains or loads the tokenizer (rank 0, then sent
    to the others; a fine-tuning run's ``source`` gives it), and tokenizes the corpora once into
    files beside their Arrow cache (the first process of each node; the others reuse them)."""
    data, cfg = config.data, config.train
    train = load_pairs(data.train, data.src_lang, data.tgt_lang, "train", streaming=data.streaming)
    dev = read_parallel(data.dev, data.src_lang, data.tgt_lang, "dev")
    if payload is not None:
        tokenizer = restore_tokenizer(payload)  # (the weights are loaded into the run's model below)
    elif not world.main:
        tokenizer = Tokenizer(*broadcast(world, None))
    else:
        keep = source is not None and config.train.init_vocab == "keep"
        tokenizer = source.tokenizer if keep else _main_tokenizer(config, train)
        broadcast(world, (tokenizer.src_proto, tokenizer.tgt_proto))
    if world.main:
        tokenizer.save(run_dir)

    if data.streaming:
        batches = StreamingData(train, tokenizer, data.src_lang, data.tgt_lang, cfg.batch_tokens, cfg.seed,
                                data.max_len)
    else:
        # the first process of each node tokenizes (nodes may not share a file system; where they
        # do, tokenize_corpus lets the first writer win), the others then read its files
        preparing = world.local_rank == 0
        if not preparing:
            barrier(world)
        # no worker processes once a process group exists: forking a process that holds gloo/NCCL
        # threads and sockets is unsafe (a child's exit can break the group's connections)
        workers = 1 if world.distributed else data.num_proc
        src_ids, tgt_ids = tokenize_corpus(train, tokenizer, data.src_lang, data.tgt_lang, workers)
        mixed = None
        if data.mix and data.mix_ratio > 0:
            table = load_pairs(data.mix, data.src_lang, data.tgt_lang, "train")
            mixed = tokenize_corpus(table, tokenizer, data.src_lang, data.tgt_lang, workers)
        if preparing:
            barrier(world)
        pairs = len(train)
        train = None  # the Arrow table is done with: training reads the tokenized files
        if mixed is None:
            batches = TrainingData(src_ids, tgt_ids, cfg.batch_tokens, cfg.seed, data.max_len)
        else:
            batches = _mixed_data(config, (src_ids, tgt_ids), mixed)
            pairs += len(mixed[0])
        if not len(batches):
            raise DataError(f"{data.train}: no pair is at most data.max_len={data.max_len} pieces long; "
                            f"raise data.max_len")
        if batches.dropped:
            logger.info(f"dropped {batches.dropped:,} of {pairs:,} training pairs longer than {data.max_len} pieces")
    dev_set = _dev_set(dev, tokenizer, cfg.batch_tokens, cfg.seed)
    extra_dev = _extra_dev_sets(config, tokenizer) if world.main else []
    lexicon = None
    if world.main:  # only rank 0 validates and saves; a resumed run goes on with its own
        lexicon = None if payload is None else Lexicon.of_checkpoint(payload)
        if lexicon is None:
            started = time.monotonic()
            encoded = None if data.streaming else (batches.src, batches.tgt)
            if isinstance(batches, MixedData):  # what the run trains on: the new pairs and a mixed sample
                first = batches.epoch_pairs(0)
                encoded = (batches.src.only(first), batches.tgt.only(first))
            lexicon = fit_lexicon(config, tokenizer, train, encoded)
            seconds = time.monotonic() - started
            logger.info(f"fitted the lexicon of decoding shortlists (IBM Model 1) in {seconds:.0f} s")
    return Corpora(tokenizer, batches, dev_set, lexicon, extra_dev)


def _mixed_data(config: Config, new: tuple, mixed: tuple) -> MixedData:
    """The batches of mixed fine-tuning (``data.mix``), and a line on what each epoch draws."""
    data, cfg = config.data, config.train
    batches = MixedData(new, mixed, data.mix_ratio, cfg.batch_tokens, cfg.seed, data.max_len)
    logger.info(f"mixing {batches.per_epoch:,} of the {len(batches.mixed_kept):,} pairs of {shown_path(data.mix)} "
                f"into each epoch (data.mix_ratio={data.mix_ratio:g}: their tokens per new token), "
                f"a new random sample each epoch")
    return batches


def _dev_set(dev: Parallel, tokenizer: Tokenizer, batch_tokens: int, seed: int, name: str = "dev") -> DevSet:
    """Pairs for the dev loss; text decoded as `translate eval` decodes."""
    batches = TrainingData(Encoded(tokenizer.encode_src(dev.src)), Encoded(tokenizer.encode_tgt(dev.tgt)),
                           batch_tokens, seed)
    return DevSet(batches, dev.src, dev.tgt, name)


def _extra_dev_sets(config: Config, tokenizer: Tokenizer) -> list[DevSet]:
    """``data.extra_dev``, each named by its file (``-2``, ``-3``… after a name already taken)."""
    data, sets, names = config.data, [], set()
    for spec in data.extra_dev:
        name = base = corpus_name(spec, data.src_lang, data.tgt_lang)
        count = 1
        while name in names:
            count += 1
            name = f"{base}-{count}"
        names.add(name)
        dev = read_parallel(spec, data.src_lang, data.tgt_lang, "dev")
        sets.append(_dev_set(dev, tokenizer, config.train.batch_tokens, config.train.seed, name))
    return sets


def fit_lexicon(config: Config, tokenizer: Tokenizer, train=None, encoded=None) -> Lexicon:
    """IBM Model 1 for decoding shortlists (``shortlist.py``) on a run's training pairs: ``encoded``
    (source and target ``EncodedCorpus``), else ``train`` (or ``config.data.train``, read as
    training reads it) tokenized, cached as for training; a stream's first
    ``tokenizer.max_sentences`` pairs."""
    data = config.data
    if encoded is None:
        if train is None:
            train = load_pairs(data.train, data.src_lang, data.tgt_lang, "train", streaming=data.streaming)
        if data.streaming:
            src, tgt = first_sentences(train, data.src_lang, data.tgt_lang, config.tokenizer.max_sentences)
            encoded = Encoded(tokenizer.encode_src(src)), Encoded(tokenizer.encode_tgt(tgt))
        else:
            encoded = tokenize_corpus(train, tokenizer, data.src_lang, data.tgt_lang, data.num_proc)
    sp = tokenizer.src
    word_starts = np.array([sp.id_to_piece(i).startswith(WORD_START) for i in range(sp.get_piece_size())])
    lexicon = build_lexicon(*encoded, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, seed=config.train.seed,
                            word_starts=word_starts)
    return dataclasses.replace(lexicon, accented=accented_pieces(tokenizer, encoded[0],
                                                                 most=config.tokenizer.max_sentences))


def _main_tokenizer(config: Config, train) -> Tokenizer:
    """``tokenizer.model`` when given, else a SentencePiece model trained on a sample of the corpus
    (and of ``data.mix``, its share of the characters as of the tokens it trains with)."""
    tok, data = config.tokenizer, config.data
    if tok.model:
        return Tokenizer.load(tok.model)
    seed, mixed = config.train.seed, ""
    if data.streaming:
        sample_src, sample_tgt = first_sentences(train, data.src_lang, data.tgt_lang, tok.max_sentences)
    else:
        sample_src = sample_sentences(train, data.src_lang, tok.max_sentences, seed)
        sample_tgt = sample_sentences(train, data.tgt_lang, tok.max_sentences, seed + 1)
        if data.mix and data.mix_ratio > 0:
            mixed_src, mixed_tgt = mixed_sample(config, sum(map(len, sample_src)) + sum(map(len, sample_tgt)))
            sample_src, sample_tgt = sample_src + mixed_src, sample_tgt + mixed_tgt
            mixed = f" and {len(mixed_src):,} of the mixed corpus"
    logger.info(f"training a SentencePiece {tok.type} tokenizer ({'joint' if tok.joint else 'separate'} "
                f"vocabulary of {tok.vocab_size}) on "
                f"{'the first pairs of the stream' if data.streaming else f'{len(train):,} pairs'}{mixed}")
    return Tokenizer.train(sample_src, sample_tgt, tok.vocab_size, tok.type, tok.joint, tok.character_coverage,
                           tok.max_sentences, seed)


def mixed_sample(config: Config, characters: int) -> tuple[list[str], list[str]]:
    """Pairs of ``data.mix`` in a seeded random order, until they hold ``data.mix_ratio`` times
    ``characters`` (or all of them): what a tokenizer of a mixed run sees of that corpus."""
    data = config.data
    table = load_pairs(data.mix, data.src_lang, data.tgt_lang, "train")
    src = sample_sentences(table, data.src_lang, config.tokenizer.max_sentences, config.train.seed + 2)
    tgt = sample_sentences(table, data.tgt_lang, config.tokenizer.max_sentences, config.train.seed + 2)
    order = list(range(len(src)))
    random.Random(config.train.seed).shuffle(order)
    budget, taken = data.mix_ratio * characters, []
    for i in order:
        if budget <= 0:
            break
        taken.append(i)
        budget -= len(src[i]) + len(tgt[i])
    return [src[i] for i in taken], [tgt[i] for i in taken]


def make_adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel where this torch has one for the device (CPU since torch 2.4):
    one pass over all parameters instead of a dozen elementwise operations each."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)
