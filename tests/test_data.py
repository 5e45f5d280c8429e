"""Batches (data.py): token-budget batches with length bucketing, padding and masks, and the
grouping of batches into optimiser steps, for corpora in memory, on disk or streamed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from translate.build import train
from translate.checkpoint import load_checkpoint
from translate.cli import main
from translate.corpus import load_pairs
from translate.data import StreamingData, TrainingData, collate, padding_fraction, token_batches
from translate.encoded import Encoded
from translate.tokenizer import BOS, EOS, PAD

from .conftest import make_pairs, tiny


def test_token_batches_cover_all_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=1000)
    batches = token_batches(lengths, 200, np.random.default_rng(1))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[batch]) * len(batch) <= 200
    assert padding_fraction(lengths, batches) < 0.1
    again = token_batches(lengths, 200, np.random.default_rng(1))
    assert [b.tolist() for b in batches] == [b.tolist() for b in again]


def reference_batches(lengths, budget, rng, pool_batches=50):
    """Sentence-by-sentence greedy packing, written plainly: what token_batches must equal."""
    order = rng.permutation(len(lengths))
    pool = max(1, int(pool_batches * budget / max(1.0, float(lengths.mean()))))
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start: start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batch, longest = [], 0
        for i in chunk.tolist():
            if batch and max(longest, lengths[i]) * (len(batch) + 1) > budget:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, lengths[i])
        if batch:
            batches.append(batch)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


@pytest.mark.parametrize("budget", [1, 37, 200, 5000])
def test_token_batches_equal_plain_greedy_packing(budget):
    lengths = np.random.default_rng(budget).integers(1, 90, size=3000).astype(np.uint16)
    fast = token_batches(lengths, budget, np.random.default_rng(5))
    plain = reference_batches(lengths.astype(np.int64), budget, np.random.default_rng(5))
    assert [b.tolist() for b in fast] == plain


def test_token_batches_leave_out_zero_lengths():
    lengths = np.array([3, 0, 4, 0, 5], dtype=np.uint16)
    batches = token_batches(lengths, 100, np.random.default_rng(0))
    assert sorted(i for b in batches for i in b.tolist()) == [0, 2, 4]


def test_collate_pads_and_masks():
    src = Encoded([[5, 6, 7], [8]])
    tgt = Encoded([[9], [10, 11]])
    batch = collate(src, tgt, [0, 1])
    assert batch.src.tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert batch.src_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.src_lengths.tolist() == [4, 2]
    assert batch.tgt_in.tolist() == [[BOS, 9, PAD], [BOS, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, EOS, PAD], [10, 11, EOS]]


# ---------------------------------------------------------------- optimiser steps

def step_tuples(steps) -> list[tuple[int, list[list[int]], int]]:
    return [(position, [b.indices for b in batches], tokens) for position, batches, tokens in steps]


def reference_training_steps(data: TrainingData, epoch: int, start: int, group: int, mine: slice):
    """Steps of ``group`` consecutive batches from batch ``start`` on, an incomplete last group
    filled up with the epoch's first batches, written plainly: what ``TrainingData.steps`` must equal."""
    batches = [b.tolist() for b in data.epoch_batches(epoch)]
    padded = batches + batches * group  # enough to fill any last group
    steps = []
    position = start
    while position < len(batches):
        step = padded[position: position + group]
        tokens = sum(len(b) + int(data.tgt.lengths[b].sum()) for b in step)
        steps.append((position + group, step[mine], tokens))
        position += group
    return steps


def random_corpus(n: int, seed: int) -> tuple[Encoded, Encoded]:
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, 50, size=rng.integers(1, 30)).tolist() for _ in range(n)]
    tgt = [rng.integers(4, 50, size=rng.integers(1, 30)).tolist() for _ in range(n)]
    return Encoded(src), Encoded(tgt)


# (start, group, mine); the streamed corpus below has two pools, of 69 and 17 batches (with one process)
STEPS = [(0, 1, slice(0, 1)), (0, 2, slice(0, 2)), (5, 3, slice(1, 3)), (7, 4, slice(2, 4)), (3, 2, slice(1, 2)),
         (66, 4, slice(1, 3)), (70, 3, slice(2, 3)), (84, 8, slice(3, 5)), (10_000, 2, slice(0, 1))]


@pytest.mark.parametrize("start,group,mine", STEPS)
def test_training_steps_equal_a_plain_loop(start, group, mine):
    data = TrainingData(*random_corpus(700, seed=group), batch_tokens=300, seed=4)
    steps = list(data.steps(2, start, group, mine))
    assert step_tuples(steps) == reference_training_steps(data, 2, start, group, mine)
    for position, batches, _ in steps[:3]:  # collated as collate collates the step's share
        indices = data.epoch_batches(2)[position - group: position][mine]
        assert all(torch.equal(b.tgt_out, collate(data.src, data.tgt, i).tgt_out) for b, i in zip(batches, indices))


def reference_stream_steps(pairs, data: StreamingData, epoch: int, start: int, group: int, mine: slice):
    """``StreamingData.steps`` written plainly: pools filled a thousand rows at a time, each
    bucketed with the epoch's generator, steps counted across pools, each pool's incomplete group
    carried into the next, the last one filled up with the first batches of its pool."""
    tokenizer = data.tokenizer
    pools, src, tgt = [], [], []
    for first in range(0, len(pairs), 1000):
        rows = pairs[first: first + 1000]
        for s, t in zip(tokenizer.encode_src([p[0] for p in rows]), tokenizer.encode_tgt([p[1] for p in rows])):
            if 0 < len(s) <= data.max_len and 0 < len(t) <= data.max_len:
                src.append(s)
                tgt.append(t)
        if len(src) >= data.pool:
            pools.append((src, tgt))
            src, tgt = [], []
    if src:
        pools.append((src, tgt))
    rng = np.random.default_rng([data.seed, epoch])
    steps, position, carried = [], 0, ([], [])
    for pool_src, pool_tgt in pools + [([], [])]:  # the last: what is left over, if anything
        src, tgt = carried[0] + pool_src, carried[1] + pool_tgt
        if not src:
            break
        lengths = TrainingData(Encoded(src), Encoded(tgt), data.batch_tokens, data.seed).lengths
        batches = [b.tolist() for b in token_batches(lengths, data.batch_tokens, rng)]
        last = not pool_src
        first = 0
        while first + group <= len(batches) or (last and first < len(batches)):
            step = [batches[(first + i) % len(batches)] for i in range(group)]
            position += group
            first += group
            if position > start:
                steps.append((position, step[mine], sum(len(b) + sum(len(tgt[i]) for i in b) for b in step)))
        left = [i for b in batches[first:] for i in b]  # a pool's incomplete group joins the next pool
        carried = ([src[i] for i in left], [tgt[i] for i in left])
    return steps


@pytest.mark.parametrize("start,group,mine", STEPS)
def test_streaming_steps_equal_a_plain_loop(tokenizer, start, group, mine):
    import datasets

    pairs = make_pairs(2500, seed=7)
    table = datasets.Dataset.from_dict({"spa": [s for s, _ in pairs], "eng": [t for _, t in pairs]})
    data = StreamingData(table, tokenizer, "spa", "eng", batch_tokens=200, seed=1, max_len=12)
    steps = step_tuples(data.steps(1, start, group, mine))
    expected = reference_stream_steps(pairs, data, 1, start, group, mine)
    assert data.pool == 1000 and steps == expected and data.dropped > 0  # some pairs too long


@pytest.mark.parametrize("ranks,accumulate", [(1, 1), (2, 1), (8, 1), (2, 3)])
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streamed"])
def test_every_pair_trains_each_epoch(tokenizer, ranks, accumulate, streaming):
    """Over an epoch the ranks' steps together hold every pair the corpus keeps (none lost to an
    incomplete last group), and repeat fewer batches than a step takes."""
    import collections

    import datasets

    pairs = make_pairs(2300, seed=11)
    src_ids, tgt_ids = tokenizer.encode_src([s for s, _ in pairs]), tokenizer.encode_tgt([t for _, t in pairs])
    if streaming:
        table = datasets.Dataset.from_dict({"spa": [s for s, _ in pairs], "eng": [t for _, t in pairs]})
        data = StreamingData(table, tokenizer, "spa", "eng", batch_tokens=200, seed=3, max_len=12)
    else:
        data = TrainingData(Encoded(src_ids), Encoded(tgt_ids), batch_tokens=200, seed=3, max_len=12)
    kept = collections.Counter((tuple(s), tuple(t)) for s, t in zip(src_ids, tgt_ids) if len(s) <= 12 >= len(t))
    group = ranks * accumulate
    seen, batches, positions = collections.Counter(), 0, set()
    for rank in range(ranks):
        for position, mine, _ in data.steps(1, 0, group, slice(rank * accumulate, (rank + 1) * accumulate)):
            assert len(mine) == accumulate
            positions.add(position)
            batches += len(mine)
            for batch in mine:
                for row in range(batch.size):
                    src = batch.src[row, : int(batch.src_lengths[row]) - 1].tolist()
                    tgt = batch.tgt_out[row][batch.tgt_out[row] != PAD][:-1].tolist()
                    seen[(tuple(src), tuple(tgt))] += 1
    assert not kept - seen  # every pair, as often as the corpus holds it
    assert batches == len(positions) * group
    largest = max(batch.size for _, mine, _ in data.steps(1, 0, 1, slice(0, 1)) for batch in mine)
    assert sum(seen.values()) - sum(kept.values()) <= (group - 1) * largest  # only the last step fills up
    if not streaming:
        assert len(positions) == -(-len(data.epoch_batches(1)) // group)


def test_streaming_batches_cover_the_corpus(corpus, tokenizer, hf_cache):
    table = load_pairs(str(corpus["train"]), "spa", "eng", streaming=True)
    data = StreamingData(table, tokenizer, "spa", "eng", batch_tokens=300, seed=1, max_len=80, pool_batches=2)
    assert data.pool == 1000
    seen, positions = 0, []
    for position, batches, tokens in data.steps(0, 0, 1, slice(0, 1)):
        positions.append(position)
        seen += batches[0].size
        assert tokens == int((batches[0].tgt_out != 0).sum())
    assert seen == 600 and positions == list(range(1, len(positions) + 1))
    resumed = [p for p, _, _ in data.steps(0, 3, 1, slice(0, 1))]
    assert resumed == positions[3:]


def test_streaming_training_through_the_cli_and_resume(corpus, tiny_tokenizer_file, tmp_path, hf_cache):
    import yaml

    config = tiny(corpus, tiny_tokenizer_file, **{"model.dropout": 0.0, "train.max_steps": 6, "train.eval_every": 3,
                                                   "train.lr_schedule": "constant",
                                                   "train.amp": False})
    whole = train(config.override({"data.streaming": True}), tmp_path / "whole")
    assert whole.progress.step == 6
    half = config.override({"data.streaming": True, "train.max_steps": 3})
    train(half, tmp_path / "split")
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    result = CliRunner().invoke(main, ["train", "--config", str(config_file), "--streaming", "--run-dir",
                                       str(tmp_path / "split"), "--resume", "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=1e-5, atol=1e-6, msg=name)
