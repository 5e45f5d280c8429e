"""Vocabulary adaptation (vocabulary.py): rows carried over against a plain reference, identity
under the same tokenizer, and an encoder that reads shared pieces as before."""

import pytest
import torch

from translate.config import ModelConfig
from translate.model import build_model
from translate.tokenizer import SPECIAL, WORD_START, Tokenizer
from translate.vocabulary import adapt_weights, carried_rows, shared_pieces

from .conftest import make_pairs


@pytest.fixture(scope="module")
def tokenizers():
    old_pairs, new_pairs = make_pairs(400, seed=1), make_pairs(400, seed=7)
    old = Tokenizer.train([s for s, _ in old_pairs], [t for _, t in old_pairs], vocab_size=90)
    # another domain: the same words run together, so many of its pieces are new
    new = Tokenizer.train([s.replace(" ", "") + " " + s for s, _ in new_pairs],
                          [t.replace(" ", "") + " " + t for _, t in new_pairs], vocab_size=120)
    return old, new


def reference_rows(old: Tokenizer, new: Tokenizer) -> list[list[int]]:
    """The plan written plainly: by piece text, through the old tokenizer's string pieces."""
    old_pieces = {old.src.id_to_piece(i): i for i in range(old.src_vocab_size)}
    plan = []
    for i in range(new.src_vocab_size):
        piece = new.src.id_to_piece(i)
        if i < SPECIAL:
            plan.append([i])
        elif piece in old_pieces:
            plan.append([old_pieces[piece]])
        else:
            parts = [p for p in old.src.encode(piece.replace(WORD_START, " "), out_type=str) if p != WORD_START]
            plan.append([old_pieces.get(p, 1) for p in parts] or [1])
    return plan


def test_carried_rows_match_the_plain_reference(tokenizers):
    old, new = tokenizers
    rows = carried_rows(old.src, new.src)
    assert rows == reference_rows(old, new)
    shared, total = shared_pieces(old, new)
    held = {old.tgt.id_to_piece(i) for i in range(SPECIAL, old.tgt_vocab_size)}
    assert shared == sum(new.tgt.id_to_piece(i) in held for i in range(SPECIAL, new.tgt_vocab_size))
    assert 0 < shared < total == new.tgt_vocab_size - SPECIAL  # some pieces carried, some new


def test_adapted_weights_take_each_row_from_its_plan_and_leave_the_rest(tokenizers):
    old, new = tokenizers
    model = build_model(ModelConfig(embed_dim=8, hidden_dim=12, tie_embeddings=True), old.src_vocab_size,
                        old.tgt_vocab_size)
    weights = model.state_dict()
    adapted = adapt_weights(weights, old, new)
    plan = reference_rows(old, new)
    for name in ("encoder.embed.weight", "decoder.embed.weight", "decoder.output.weight", "decoder.output.bias"):
        assert adapted[name].shape[0] == new.src_vocab_size
        for i, ids in enumerate(plan):
            assert torch.allclose(adapted[name][i], sum(weights[name][j] for j in ids) / len(ids), atol=1e-6)
    assert all(torch.equal(adapted[k], weights[k]) for k in weights if "embed" not in k and "output" not in k)
    rebuilt = build_model(ModelConfig(embed_dim=8, hidden_dim=12, tie_embeddings=True), new.src_vocab_size,
                          new.tgt_vocab_size)
    rebuilt.load_state_dict(adapted)  # fits the model of the new vocabulary, ties included
    assert torch.equal(rebuilt.decoder.output.weight, adapted["decoder.output.weight"])


def test_the_same_tokenizer_changes_nothing(tokenizers):
    old, _ = tokenizers
    weights = build_model(ModelConfig(embed_dim=8, hidden_dim=12), old.src_vocab_size,
                          old.tgt_vocab_size).state_dict()
    adapted = adapt_weights(weights, old, old)
    assert all(torch.equal(adapted[k], weights[k]) for k in weights)


def test_a_sentence_of_shared_pieces_is_encoded_as_before(tokenizers):
    old, new = tokenizers
    config = ModelConfig(embed_dim=8, hidden_dim=12, dropout=0.0)
    model = build_model(config, old.src_vocab_size, old.tgt_vocab_size).eval()
    adapted = build_model(config, new.src_vocab_size, new.tgt_vocab_size).eval()
    adapted.load_state_dict(adapt_weights(model.state_dict(), old, new))
    words = sorted({w for s, _ in make_pairs(200, seed=3) for w in s.split()})
    alike = [w for w in words if old.src_pieces(w) == new.src_pieces(w)]
    assert len(alike) >= 4, "too few words that both tokenizers split alike"
    sentences = [" ".join(alike[i: i + 4]) for i in range(0, len(alike) - 3, 4)]
    for sentence in sentences[:5]:
        assert old.src_pieces(sentence) == new.src_pieces(sentence)
        before = torch.tensor([old.encode_src([sentence])[0]])  # (1, S)
        after = torch.tensor([new.encode_src([sentence])[0]])  # (1, S)
        lengths, mask = torch.tensor([before.shape[1]]), torch.ones_like(before, dtype=torch.bool)
        with torch.no_grad():
            memory_before, _ = model.encode(before, lengths, mask)
            memory_after, _ = adapted.encode(after, lengths, mask)  # (the same pieces under other ids)
        assert torch.allclose(memory_before.values, memory_after.values, atol=1e-6)
