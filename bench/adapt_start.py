"""Where fine-tuning with ``--adapt-vocab`` starts: a base model moved onto a new tokenizer
(``vocabulary.adapt_weights``) scored on held-out pairs before any step, teacher forced, without
label smoothing. A new piece's rows start from the old pieces its text splits into: their mean
(what ``adapt_weights`` does), the first's or the last's, per side; and the base with its own
tokenizer, per sentence, for what the move costs or gains.

    python bench/adapt_start.py --base /work/domain/base-s1/best.pt \\
        --tokenizer-of /work/domain/r2ft/finetune-adapt-lr0.005-3853steps-s6/step-2500.pt \\
        --pairs /work/domain/r2ft/bible-heldout.tsv --json bench/results/adapt_start.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json

from translate.checkpoint import load_checkpoint, restore_tokenizer
from translate.config import ModelConfig
from translate.corpus import read_parallel
from translate.data import collate
from translate.model import build_model
from translate.tokenizer import PAD, Tokenizer
from translate.validation import sequence_loss
from translate.vocabulary import SRC_ROWS, TGT_ROWS, carried_rows

PICKS = {"mean": lambda rows: rows.mean(0), "first": lambda rows: rows[0], "last": lambda rows: rows[-1]}
STARTS = (("mean", "mean"), ("first", "mean"), ("mean", "first"), ("first", "first"), ("last", "last"))


def moved(weights: dict, old: Tokenizer, new: Tokenizer, src_pick: str, tgt_pick: str) -> dict:
    """``weights`` under ``new``, each new piece's rows picked from its old pieces' rows."""
    plans = {"src": carried_rows(old.src, new.src)}  # as vocabulary.adapt_weights plans them
    plans["tgt"] = plans["src"] if old.joint and new.joint else carried_rows(old.tgt, new.tgt)
    out = dict(weights)
    for side, names, pick in (("src", SRC_ROWS, src_pick), ("tgt", TGT_ROWS, tgt_pick)):
        for name in names:
            table = weights[name]  # (old vocab, ...)
            out[name] = torch.stack([PICKS[pick](table[ids]) for ids in plans[side]])  # (new vocab, ...)
    return out


@torch.no_grad()
def loss(config: ModelConfig, weights: dict, tokenizer: Tokenizer, src: list[str], tgt: list[str]) -> dict:
    """Summed cross-entropy of the pairs, per target piece and per sentence, and pieces per sentence."""
    model = build_model(config, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    model.load_state_dict(weights)
    model.eval()
    src_ids = [np.array(ids, dtype=np.int64) for ids in tokenizer.encode_src(src)]
    tgt_ids = [np.array(ids, dtype=np.int64) for ids in tokenizer.encode_tgt(tgt)]
    total, pieces = 0.0, 0
    for start in range(0, len(src_ids), 32):
        batch = collate(src_ids, tgt_ids, range(start, min(start + 32, len(src_ids))))
        logits = model(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in)  # (batch, len, vocab)
        total += float(sequence_loss(logits, batch.tgt_out))
        pieces += int((batch.tgt_out != PAD).sum())
    return {"per_piece": round(total / pieces, 3), "per_sentence": round(total / len(src_ids), 1),
            "pieces_per_sentence": round(pieces / len(src_ids), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the base checkpoint")
    parser.add_argument("--tokenizer-of", required=True, help="a checkpoint of the run whose tokenizer it moves to")
    parser.add_argument("--pairs", required=True, help="held-out pairs (TSV with spa and eng columns)")
    parser.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    args = parser.parse_args()
    base = load_checkpoint(args.base)
    old, new = restore_tokenizer(base), restore_tokenizer(load_checkpoint(args.tokenizer_of))
    config = ModelConfig(**base["config"]["model"])
    pairs = read_parallel(args.pairs, "spa", "eng", split="dev")
    figures = {"base, its own tokenizer": loss(config, base["model"], old, pairs.src, pairs.tgt)}
    for src_pick, tgt_pick in STARTS:
        weights = moved(base["model"], old, new, src_pick, tgt_pick)
        figures[f"moved, source {src_pick}, target {tgt_pick}"] = loss(config, weights, new, pairs.src, pairs.tgt)
    for name, figure in figures.items():
        print(f"{name:36} {figure['per_piece']:.3f} a piece, {figure['per_sentence']:.1f} a sentence "
              f"({figure['pieces_per_sentence']:.1f} pieces)", flush=True)
    if args.json_path:
        write_json(args.json_path, {"base": args.base, "tokenizer_of": args.tokenizer_of, "pairs": args.pairs,
                                    "sentences": len(pairs.src), "loss": figures})


if __name__ == "__main__":
    main()
