import pytest

from translate.errors import TokenizerError
from translate.tokenizer import BOS, EOS, PAD, UNK, Tokenizer

from .conftest import make_pairs


def test_round_trip(tokenizer):
    sentences = ["El gato come pan.", "El niño lee y mira el sol."]
    assert tokenizer.src.decode(tokenizer.encode_src(sentences)) == sentences
    targets = ["The big dog drinks water."]
    assert tokenizer.decode_tgt(tokenizer.encode_tgt(targets)) == targets


def test_special_ids(tokenizer):
    sp = tokenizer.src
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD, UNK, BOS, EOS)
    assert tokenizer.decode_tgt([[BOS, *tokenizer.encode_tgt(["The cat."])[0], EOS, PAD]]) == ["The cat."]


def test_an_unknown_piece_stays_visible(tokenizer):
    cat = tokenizer.encode_tgt(["The cat."])[0]
    text = tokenizer.decode_tgt([[*cat[:-1], UNK, cat[-1]]])[0]
    assert "\u2047" in text and text.startswith("The cat")


def test_separate_vocabularies():
    pairs = make_pairs(300, seed=5)
    tok = Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=60, joint=False,
                          model_type="bpe")
    assert not tok.joint and tok.src_proto != tok.tgt_proto
    assert tok.decode_tgt(tok.encode_tgt(["The cat eats."])) == ["The cat eats."]


def test_save_load_and_fingerprint(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint == tokenizer.fingerprint
    assert Tokenizer.load(tmp_path / "src.model").fingerprint == tokenizer.fingerprint


def test_unseen_script_and_emoji_do_not_crash(tokenizer):
    ids = tokenizer.encode_src(["猫が 🐈 食べる", ""])
    assert all(isinstance(i, int) for i in ids[0]) and ids[1] == []


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="empty"):
        Tokenizer.train([], [], vocab_size=10)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "bad.model")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path / "missing.model")


def test_unknown_words_are_found_whole_as_written(tokenizer):
    line = "El gatoΩ come 日本 y  Ærø, pan."
    spans = tokenizer.src_unknown(line)
    assert [text for _, _, text in spans] == ["gatoΩ", "日本", "Ærø,"]  # this vocabulary never saw a comma
    ids = tokenizer.encode_src([line])[0]
    assert all(UNK in ids[first: last + 1] for first, last, _ in spans)
    assert all(UNK not in ids[:first] for first, _, _ in spans[:1])
    assert tokenizer.src_unknown("El gato come pan.") == [] and tokenizer.src_unknown("") == []
