"""Dev figures of a training run at one of its steps: the teacher-forced loss and perplexity, and
BLEU/chrF of the dev set decoded through a ``Translator`` as ``translate eval`` decodes (Sockeye's
``CheckpointDecoder``). ``training.Trainer`` asks a ``Validator`` at every validation and only
decides what the figures mean (the best step, patience, the plateau schedule)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch
import torch.nn.functional as F

from .data import TrainingData
from .evaluate import evaluate
from .model import Seq2Seq
from .runtime import autocast_for
from .shortlist import Lexicon
from .tokenizer import PAD, Tokenizer
from .translator import DecodeOptions, Translator


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over real target tokens, the loss of training and of the dev set.
    logits: (batch, len, vocab); target: (batch, len)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), target.reshape(-1), ignore_index=PAD,
                           label_smoothing=label_smoothing, reduction="sum")


@dataclass(frozen=True)
class DevSet:
    """A run's dev pairs: token batches for the loss, and the text that is decoded and scored."""

    batches: TrainingData
    sources: list[str]
    references: list[str]
    name: str = "dev"  # an extra dev set's key in metrics.jsonl (its file's name)


class DevScores(TypedDict):
    """One validation's figures, under the names ``metrics.jsonl`` gives them."""

    dev_loss: float  # mean cross-entropy per target token, teacher forced, no label smoothing
    dev_ppl: float
    dev_bleu: float
    dev_chrf: float
    example: str  # the first dev sentence's translation, for the log
    extra: dict[str, float]  # the extra dev sets' figures: "NAME/loss", "NAME/bleu", "NAME/chrf"


def metric_score(scores: DevScores, metric: str) -> float:
    """The figure ``train.eval_metric`` names, oriented so that higher is better (loss negated)."""
    return {"bleu": scores["dev_bleu"], "chrf": scores["dev_chrf"], "loss": -scores["dev_loss"]}[metric]


class Validator:
    """Scores a model on the dev set each time it is asked, with the weights it has then (training
    changes them in place between validations)."""

    def __init__(self, model: Seq2Seq, tokenizer: Tokenizer, dev: DevSet, *, beam: int, amp: str | bool,
                 device: torch.device, amp_dtype: torch.dtype | None, lexicon: Lexicon | None = None,
                 extra: Sequence[DevSet] = (), stand_in_names: bool = True):
        self.model, self.tokenizer, self.dev, self.lexicon = model, tokenizer, dev, lexicon
        self.extra = list(extra)  # more dev sets, scored as the dev set is (data.extra_dev)
        self.beam, self.amp = beam, amp  # the run's train.eval_beam and train.amp
        self.device, self.amp_dtype = device, amp_dtype  # where and in what type training computes
        self.stand_in_names = stand_in_names  # as the checkpoint will decode (translator.stand_ins_for)

    def translator(self) -> Translator:
        """Decodes as `translate eval` decodes by default (in its precision: on a CPU, a
        ``CPU_PRECISION`` copy of this step's weights), so the two figures agree; one batch at a
        time, since two at once would add a second batch's memory to training's peak."""
        return Translator(self.model, self.tokenizer, DecodeOptions(beam=self.beam, inter_threads=1),
                          precision="auto", amp=self.amp, lexicon=self.lexicon,
                          stand_in_names=self.stand_in_names)

    @torch.no_grad()
    def loss(self, dev: DevSet | None = None) -> float:
        """Mean cross-entropy per target token of the dev set (or ``dev``), teacher forced, without smoothing."""
        self.model.eval()
        total, tokens = 0.0, 0
        for _, batch in (dev or self.dev).batches.batches(0):
            batch = batch.to(self.device)
            with autocast_for(self.device, self.amp_dtype):
                logits = self.model(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in)  # (batch, len, vocab)
            total += float(sequence_loss(logits, batch.tgt_out))
            tokens += int((batch.tgt_out != PAD).sum())
        return total / max(tokens, 1)

    @torch.no_grad()
    def validate(self) -> DevScores:
        """Dev loss and perplexity, then dev BLEU and chrF of the decoded dev set; the same of each
        extra dev set (loss, BLEU, chrF), decoded by the same translator."""
        loss = self.loss()
        translator = self.translator()
        scores, hyps = evaluate(translator, self.dev.sources, self.dev.references)
        extra = {}
        for dev in self.extra:
            extra[f"{dev.name}/loss"] = round(self.loss(dev), 4)
            figures, _ = evaluate(translator, dev.sources, dev.references)
            extra[f"{dev.name}/bleu"], extra[f"{dev.name}/chrf"] = figures["bleu"], figures["chrf"]
        return {"dev_loss": round(loss, 4), "dev_ppl": round(math.exp(min(loss, 50)), 2),
                "dev_bleu": scores["bleu"], "dev_chrf": scores["chrf"], "example": hyps[0] if hyps else "",
                "extra": extra}
