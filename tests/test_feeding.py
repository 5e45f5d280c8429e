"""Scheduled teacher forcing: where predictions go, what is fed, and both ways of running it,
checked against plain decoding loops written here."""

import pytest
import torch
from sacrebleu.metrics import BLEU

from translate.config import load_config
from translate.data import collate
from translate.encoded import Encoded
from translate.errors import ConfigError
from translate.feeding import (
    confidence_choice,
    gold_mask,
    model_tokens,
    position_weight,
    scheduled_logits,
    sentence_oracle,
)
from translate.model import build_model
from translate.search import beam_search
from translate.tokenizer import PAD, SPECIAL

from .conftest import encode
from .test_model import DECODERS


def train_cfg(**values):
    return load_config(overrides={f"train.{k}": v for k, v in values.items()}).train


def tiny_batch(tokenizer):
    src = Encoded(tokenizer.encode_src(["El gato come pan.", "Y el perro.", "Ella lee un libro muy largo hoy."]))
    tgt = Encoded(tokenizer.encode_tgt(["The cat eats bread.", "And the dog.", "She reads a very long book today."]))
    return collate(src, tgt, [0, 1, 2])


def free_running(model, batch, steps=None):
    """Greedy decoding from the model's own outputs only, as long as the gold target."""
    memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    prev, out = batch.tgt_in[:, 0], []
    for _ in range(steps or batch.tgt_in.size(1)):
        logits, state, _ = model.decode_step(prev, memory, state)
        out.append(logits)
        prev = logits.argmax(-1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_ratio_one_is_teacher_forcing(tiny_model, tokenizer, mode):
    batch = tiny_batch(tokenizer)
    cfg = train_cfg(scheduled_sampling=mode)
    forced = tiny_model(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in)
    logits, counts = scheduled_logits(tiny_model, batch, 1.0, cfg)
    torch.testing.assert_close(logits, forced)
    assert counts.tolist() == [int((batch.tgt_in[:, 1:] != PAD).sum()), 0, 0]
    # ratio just under 1: every input is still gold with overwhelming probability, through the mixing path
    logits, counts = scheduled_logits(tiny_model, batch, 1.0 - 1e-9, cfg)
    torch.testing.assert_close(logits, forced, atol=1e-5, rtol=1e-4)
    assert counts[1:].tolist() == [0, 0]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_ratio_zero_feeds_only_predictions(tiny_model, tokenizer, mode):
    batch = tiny_batch(tokenizer)
    cfg = train_cfg(scheduled_sampling=mode, tf_floor=0.0)
    logits, counts = scheduled_logits(tiny_model, batch, 0.0, cfg)
    free = free_running(tiny_model, batch)
    positions = int((batch.tgt_in[:, 1:] != PAD).sum())
    assert counts[0] == positions and counts[1] == positions  # every real position got the model's choice
    if mode == "sequential":
        torch.testing.assert_close(logits, free, atol=1e-5, rtol=1e-4)
        fed = free[:, :-1].argmax(-1)
        real = batch.tgt_in[:, 1:] != PAD
        assert counts[2] == int((real & (fed != batch.tgt_in[:, 1:])).sum())
    else:  # two passes: the second sees the first pass's predictions, which match free-running at t = 1
        torch.testing.assert_close(logits[:, :2], free[:, :2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_each_refinement_pass_matches_free_running_one_position_further(tiny_model, tokenizer, passes):
    """Duckworth et al. (2019): with only predictions fed, pass k's inputs equal free-running
    decoding's up to position k, so the trained pass's logits match it up to position k + 1."""
    batch = tiny_batch(tokenizer)
    logits, _ = scheduled_logits(tiny_model, batch, 0.0, train_cfg(tf_floor=0.0, tf_passes=passes))
    free = free_running(tiny_model, batch)
    torch.testing.assert_close(logits[:, :passes + 1], free[:, :passes + 1], atol=1e-5, rtol=1e-4)
    if passes < 3:  # and no further: they part at the next position (these inputs differ there)
        assert not torch.allclose(logits[:, passes + 1:], free[:, passes + 1:], atol=1e-4)


def test_gold_mask_granularity():
    torch.manual_seed(0)
    token = gold_mask(train_cfg(), (400, 30), 0.7, torch.device("cpu"))
    assert token[:, 0].all() and abs(token[:, 1:].float().mean().item() - 0.7) < 0.02
    sentence = gold_mask(train_cfg(tf_granularity="sentence"), (400, 30), 0.7, torch.device("cpu"))
    rows = sentence[:, 1:]
    assert ((rows.all(1)) | (~rows).all(1)).all()  # one decision per sentence
    assert abs(rows[:, 0].float().mean().item() - 0.7) < 0.08


@pytest.mark.parametrize("shape,k", [("linear", 8.0), ("exponential", 0.8), ("inverse_sigmoid", 4.0)])
def test_the_position_schedules_give_later_positions_more_predictions(shape, k):
    cfg = train_cfg(tf_position=shape, tf_position_k=k)
    weight = position_weight(cfg, 60, torch.device("cpu"))
    assert weight[0] == pytest.approx(0.0, abs=1e-6) and weight[-1] == pytest.approx(1.0, abs=1e-2)
    assert (weight[1:] >= weight[:-1]).all() and (weight >= 0).all() and (weight <= 1 + 1e-6).all()
    torch.manual_seed(0)
    gold = gold_mask(cfg, (4000, 60), 0.6, torch.device("cpu"))  # (batch, len)
    predicted = (~gold).float().mean(0)  # share of predictions at each position
    torch.testing.assert_close(predicted, 0.4 * weight, atol=0.03, rtol=0)
    assert predicted[40:].mean() > predicted[1:5].mean() + 0.1


def test_without_a_position_schedule_every_position_has_the_same_chance():
    weight = position_weight(train_cfg(), 20, torch.device("cpu"))
    assert torch.equal(weight, torch.ones(20))


def test_a_sample_at_a_temperature_near_zero_is_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(50, 7, 30)
    assert torch.equal(model_tokens(logits, "sample", tau=1e-4), logits.argmax(-1))
    assert not torch.equal(model_tokens(logits, "sample", tau=1.0), logits.argmax(-1))


def test_a_sample_at_temperature_one_follows_the_models_distribution():
    torch.manual_seed(1)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = model_tokens(logits.expand(40000, 4), "sample", tau=1.0)
    share = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(share, logits.softmax(0), atol=0.01, rtol=0)
    hot = model_tokens(logits.expand(40000, 4), "sample", tau=2.0)  # flatter at a higher temperature
    torch.testing.assert_close(torch.bincount(hot, minlength=4).float() / hot.numel(), (logits / 2).softmax(0),
                               atol=0.01, rtol=0)


@pytest.mark.parametrize("feed", ["argmax", "sample"])
def test_nan_logits_give_tokens_not_an_error(feed):
    logits = torch.full((3, 5, 11), float("nan"))
    tokens = model_tokens(logits, feed)
    assert tokens.shape == (3, 5) and ((tokens >= 0) & (tokens < 11)).all()


def test_nan_logits_make_a_skipped_step_not_a_crash(corpus, tiny_tokenizer_file, tmp_path, monkeypatch):
    from translate.build import build_trainer

    from .conftest import tiny
    config = tiny(corpus, tiny_tokenizer_file, **{"train.max_steps": 3, "train.tf_warmup": 0,
                                                  "train.teacher_forcing": "constant", "train.tf_start": 0.5,
                                                  "train.tf_feed": "sample"})
    trainer = build_trainer(config, tmp_path / "run")
    real = trainer.model.decoder.forward

    def poisoned(*args, **kwargs):
        logits, state, weights = real(*args, **kwargs)
        return logits * float("nan"), state, weights

    monkeypatch.setattr(trainer.model.decoder, "forward", poisoned)
    batch = collate(trainer.data.src, trainer.data.tgt, trainer.data.epoch_batches(0)[0])
    trainer.progress.tf_ratio = 0.5
    _, tokens = trainer.train_step(batch)
    assert tokens == 0 and trainer.progress.nonfinite_steps == 1


def test_confidence_choice_follows_the_thresholds():
    # gold token 0 everywhere; its probabilities: low, confident, very confident
    gold_probs = torch.tensor([0.5, 0.92, 0.99])
    probs = torch.cat([gold_probs.unsqueeze(1), ((1 - gold_probs) / 9).unsqueeze(1).expand(3, 9)], 1)
    logits = probs.log().unsqueeze(0).expand(200, 3, 10)  # (batch, positions, vocab)
    gold = torch.zeros(200, 3, dtype=torch.long)
    predicted = torch.full((200, 3), 2)
    cfg = train_cfg(tf_select="confidence", tf_confidence=0.9, tf_noise=0.95)
    fed, chosen = confidence_choice(cfg, logits, gold, predicted)
    assert (fed[:, 0] == 0).all() and (fed[:, 1] == 2).all()  # unsure: gold; confident: the prediction
    assert chosen[:, 1:].all() and not chosen[:, 0].any()
    noise = fed[:, 2]
    assert ((noise >= SPECIAL) | (noise == 0)).all() and (noise != 2).any()  # very confident: random tokens
    fed, _ = confidence_choice(train_cfg(tf_select="confidence", tf_confidence=0.9), logits, gold, predicted)
    assert (fed[:, 2] == 2).all()  # tf_noise=1: never noise


def test_beam_search_can_be_held_to_one_length(search_model, tokenizer):
    memory, state, _ = encode(search_model, tokenizer, ["Hola.", "El perro come pan en la casa."])
    want = torch.tensor([7, 3])
    nbest = beam_search(search_model, memory, state, 3, want, n_best=3, min_lens=want)
    for hypotheses, n in zip(nbest, want.tolist()):
        assert len(hypotheses) == 3 and all(len(h.tokens) == n - 1 for h in hypotheses)


def test_the_sentence_oracle_is_the_best_candidate_by_sentence_bleu(tiny_model, tokenizer):
    batch = tiny_batch(tokenizer)
    memory, state = tiny_model.encode(batch.src, batch.src_lengths, batch.src_mask)
    oracle = sentence_oracle(tiny_model, batch, memory, state, 4)
    assert oracle.shape == batch.tgt_in[:, 1:].shape
    lengths = (batch.tgt_out != PAD).sum(1)
    nbest = beam_search(tiny_model, memory, state, 4, lengths, alpha=0.0, n_best=4, min_lens=lengths)
    bleu = BLEU(tokenize="none", effective_order=True)
    for row, hypotheses in enumerate(nbest):
        n = int(lengths[row]) - 1
        reference = " ".join(str(i) for i in batch.tgt_out[row, :n].tolist())
        scores = [bleu.sentence_score(" ".join(map(str, h.tokens)), [reference]).score for h in hypotheses]
        assert bleu.sentence_score(" ".join(str(i) for i in oracle[row, :n].tolist()), [reference]).score \
            == max(scores)
        assert (oracle[row, n:] == batch.tgt_in[row, n + 1:]).all()  # padding stays padding


@pytest.mark.parametrize("decoder", list(DECODERS))
@pytest.mark.parametrize("variant", [
    {"scheduled_sampling": "sequential", "tf_position": "linear", "tf_feed": "sample"},
    {"scheduled_sampling": "sequential", "tf_select": "confidence", "tf_confidence": 0.0, "tf_noise": 0.5},
    {"tf_position": "inverse_sigmoid", "tf_position_k": 2.0, "tf_passes": 2, "tf_feed": "sample", "tf_tau": 0.5},
    {"tf_select": "confidence", "tf_confidence": 0.0},
    {"tf_feed": "sentence", "tf_oracle_beam": 2},
])
def test_every_variant_trains_every_decoder(tokenizer, decoder, variant):
    kind, feeding_on = DECODERS[decoder]
    config = load_config(overrides={"model.embed_dim": 16, "model.hidden_dim": 32, "model.decoder": kind,
                                    "model.input_feeding": feeding_on,
                                    **{f"train.{k}": v for k, v in variant.items()}})
    torch.manual_seed(0)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).train()
    batch = tiny_batch(tokenizer)
    logits, counts = scheduled_logits(model, batch, 0.3, config.train)
    assert logits.shape == (*batch.tgt_in.shape, tokenizer.tgt_vocab_size) and torch.isfinite(logits).all()
    assert 0 < counts[1] <= counts[0] and counts[2] <= counts[0]
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.training  # the oracle's search put it back


@pytest.mark.parametrize("values,message", [
    ({"tf_feed": "sentence", "scheduled_sampling": "sequential"}, "needs train.scheduled_sampling=parallel"),
    ({"tf_tau": 0.0}, "tf_tau must be a positive"),
    ({"tf_position": "exponential", "tf_position_k": 2.0}, r"tf_position_k must be in \(0, 1\)"),
    ({"tf_confidence": 1.5}, "must be probabilities"),
    ({"tf_passes": 0}, "at least 1"),
])
def test_bad_feeding_settings_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        train_cfg(**values)

