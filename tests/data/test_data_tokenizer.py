"""The word tokenizer: specials, unknown words, padding, and a standard tokenizer.json."""

import pytest
import torch
from tokenizers import Tokenizer

from vlmoe.data import DataError, WordTokenizer

QUESTIONS = ["What color is the shape?", "Is there a red circle?", "what shape is present?"]


def test_specials_unknown_and_cls():
    tok = WordTokenizer.build(QUESTIONS)
    assert (tok.pad_id, tok.unk_id, tok.cls_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + len({"what", "color", "is", "the", "shape", "?", "there", "a",
                                      "red", "circle", "present"})  # fmt: skip
    ids = tok.encode("WHAT colour is the shape?")
    assert ids[0] == tok.cls_id and ids[2] == tok.unk_id and len(ids) == 7
    assert tok.tokens("WHAT colour is the shape?") == ["what", "colour", "is", "the", "shape", "?"]
    assert tok.unknown_words("what zebra is the shape?!") == ["zebra", "!"]
    assert WordTokenizer.build(QUESTIONS).vocab() == tok.vocab()  # deterministic ids


def test_min_freq_drops_rare_words():
    tok = WordTokenizer.build(QUESTIONS, min_freq=2)
    assert tok.encode("red")[1] == tok.unk_id and tok.encode("shape")[1] != tok.unk_id


def test_encode_batch_pads_truncates_and_masks():
    tok = WordTokenizer.build(QUESTIONS)
    ids, mask = tok.encode_batch(["is the shape red?", "red"], max_len=32)
    assert (
        ids.shape == mask.shape == (2, 6) and ids.dtype == torch.long and mask.dtype == torch.bool
    )
    assert mask.sum(1).tolist() == [6, 2] and (ids[~mask] == tok.pad_id).all()
    ids, mask = tok.encode_batch(["is the shape red?", "red"], max_len=3)
    assert ids.shape == (2, 3) and ids[0].tolist() == tok.encode("is the shape red?")[:3]
    assert tok.encode_batch([], max_len=4)[0].shape == (0, 0)


def test_save_load_round_trip_and_standard_file(tmp_path):
    tok = WordTokenizer.build(QUESTIONS)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = WordTokenizer.load(path)
    q = "what is the blue shape?"
    assert again.encode(q) == tok.encode(q) and again.vocab() == tok.vocab()
    assert Tokenizer.from_file(str(path)).encode(q).ids == tok.encode(q)


def test_corrupt_or_missing_file(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        WordTokenizer.load(tmp_path / "none.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match=r"tokenizer\.json: not a valid tokenizer\.json") as e:
        WordTokenizer.load(bad)
    assert "\n" not in str(e.value)
