"""Image–text pairs: easy-VQA captions from answers, the Twemoji split, JSONL errors, batches."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from vlmoe.data import DataError, load_easyvqa
from vlmoe.data.dataset import VQASplit
from vlmoe.data.pairs import (
    EASYVQA_CAPTIONS,
    EASYVQA_COLORS,
    EASYVQA_SHAPES,
    build_pair_tokenizer,
    concat_pairs,
    easyvqa_captions,
    image_attributes,
    iterate_pair_batches,
    load_pairs_jsonl,
    pixel_attributes,
    twemoji_index,
    twemoji_pairs,
)


def _split(questions, answers, n_images=1, images=None):
    rows = [0] * len(questions) if n_images == 1 else list(range(len(questions)))
    imgs = images if images is not None else torch.zeros(n_images, 3, 8, 8, dtype=torch.uint8)
    return VQASplit(
        imgs, torch.tensor(rows), list(questions), list(answers), ["other"] * len(questions),
        "test", [str(i) for i in range(n_images)],
    )  # fmt: skip


def test_attributes_from_hand_made_questions():
    # negated yes/no questions flip; wh-questions name the attribute in the question too
    s = _split(
        ["is there not a red shape?", "what color is the circle?", "is there a blue shape?"],
        ["no", "red", "no"],
    )
    assert image_attributes(s) == [("red", "circle")]
    s = _split(
        ["does the image not contain a triangle?", "is no circle present?",
         "what is the color of the shape?"],
        ["yes", "yes", "teal"],
    )  # fmt: skip
    assert image_attributes(s) == [("teal", "rectangle")]  # shape by elimination


def test_contradictory_questions_raise():
    s = _split(["is there a red shape?", "is there not a red shape?"], ["yes", "yes"])
    with pytest.raises(DataError, match="easy-vqa image 0"):
        image_attributes(s)


def test_pixels_decide_when_questions_leave_candidates():
    # a green triangle drawn on white; the only question rules out red
    img = torch.full((3, 32, 32), 250, dtype=torch.uint8)
    for y in range(8, 28):
        half = (y - 8) // 2
        img[:, y, 16 - half : 16 + half + 1] = torch.tensor([40, 253, 40])[:, None]
    assert pixel_attributes(img) == ({"green"}, {"triangle"})
    s = _split(["is there a red shape?"], ["no"], images=img[None])
    assert image_attributes(s) == [("green", "triangle")]


def test_easyvqa_captions_agree_with_every_direct_answer():
    caps = easyvqa_captions("test")
    vqa = load_easyvqa("test")
    assert len(caps) == 1000 == vqa.images.shape[0]
    assert set(caps.texts) == set(EASYVQA_CAPTIONS) and len(EASYVQA_CAPTIONS) == 24
    assert [EASYVQA_CAPTIONS[i] for i in caps.labels.tolist()] == caps.texts
    checked = 0
    for q, a, row in zip(vqa.questions, vqa.answers, vqa.image_index.tolist(), strict=True):
        if a in EASYVQA_COLORS or a in EASYVQA_SHAPES:
            assert a in caps.texts[row].split(), (q, a, caps.texts[row])
            for w in re.findall(r"[a-z]+", q):  # "what color is the triangle?"
                if w in EASYVQA_COLORS or w in EASYVQA_SHAPES:
                    assert w in caps.texts[row].split()
            checked += 1
    assert checked > 2000  # 2,537 colour/shape answers


def test_twemoji_split_is_by_emoji_and_deterministic():
    train, test = twemoji_pairs("train", 32), twemoji_pairs("test", 32)
    assert not set(train.names) & set(test.names)
    assert len(train) + len(test) == len(twemoji_index()) > 1000
    assert abs(len(test) / len(twemoji_index()) - 0.2) < 0.01
    assert twemoji_pairs("test", 32, limit=5).names == test.names[:5]
    # a known emoji: U+1F600, its Unicode name lowercased; transparency composited on white
    sample = twemoji_pairs("all", 32)
    i = sample.names.index("1f600")
    assert sample.texts[i] == "grinning face"
    assert sample.images.shape[1:] == (3, 32, 32)
    assert sample.images[i, :, 0, 0].tolist() == [255, 255, 255]
    with pytest.raises(DataError, match="unknown split"):
        twemoji_pairs("dev")


def _write(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    return path


def test_pairs_jsonl_loads(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.png")
    f = _write(tmp_path / "p.jsonl", [{"image": "red.png", "text": "a red box", "x": 1}, ""])
    p = load_pairs_jsonl(f, 16)
    assert p.texts == ["a red box"] and p.images.shape == (1, 3, 16, 16)
    assert p.images[0, :, 0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"p.jsonl:2: invalid JSON"),
        ('["a"]', r"p.jsonl:2: expected a JSON object, got list"),
        ('{"image": "red.png"}', r"p.jsonl:2: missing field 'text'"),
        ('{"image": "red.png", "text": 3}', r"p.jsonl:2: field 'text' must be a string, got int"),
        ('{"image": "red.png", "text": " "}', r"p.jsonl:2: field 'text' is empty"),
        ('{"image": "gone.png", "text": "x"}', r"p.jsonl:2: .*gone.png: image file not found"),
    ],
)
def test_pairs_jsonl_errors_name_the_line(tmp_path, line, message):
    Image.new("RGB", (4, 4)).save(tmp_path / "red.png")
    f = _write(tmp_path / "p.jsonl", [{"image": "red.png", "text": "ok"}, line])
    with pytest.raises(DataError, match=message) as e:
        load_pairs_jsonl(f, 8)
    assert "\n" not in str(e.value)


def test_pairs_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_pairs_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no pairs"):
        load_pairs_jsonl(_write(tmp_path / "e.jsonl", ["", " "]))


def test_batches_deterministic_sharded_resumable():
    p = concat_pairs(
        easyvqa_captions("val", 32).subset(range(40)), twemoji_pairs("test", 32, limit=20)
    )
    assert p.labels[:40].min() >= 0 and (p.labels[40:] == -1).all()
    tok = build_pair_tokenizer(p)
    kw = dict(shuffle=True, seed=3, epoch=1, drop_last=True)
    full = list(iterate_pair_batches(p, tok, 16, **kw))
    again = list(iterate_pair_batches(p, tok, 16, **kw))
    assert len(full) == 3 and all(
        torch.equal(a.index, b.index) for a, b in zip(full, again, strict=True)
    )
    assert not torch.equal(full[0].index, next(iterate_pair_batches(p, tok, 16, shuffle=True, seed=3, epoch=2)).index)  # fmt: skip
    shards = [list(iterate_pair_batches(p, tok, 8, rank=r, world_size=2, **kw)) for r in (0, 1)]
    for j, b in enumerate(full):
        assert torch.equal(torch.cat([shards[0][j].index, shards[1][j].index]), b.index)
    resumed = list(iterate_pair_batches(p, tok, 16, start_batch=2, **kw))
    assert len(resumed) == 1 and torch.equal(resumed[0].index, full[2].index)
    b = full[0]
    assert b.images.dtype == torch.float32 and -1 <= b.images.min() and b.images.max() <= 1
    assert (b.input_ids[:, 0] == tok.cls_id).all()
    assert b.attention_mask.sum(1).tolist() == [len(tok.encode(p.texts[i])) for i in b.index]
    moved = b.to("cpu")
    assert isinstance(moved, type(b)) and torch.equal(moved.index, b.index)


def test_contrastive_splits_of_the_tiny_preset():
    from vlmoe.data.pairs import contrastive_splits
    from vlmoe.limoe.config import limoe_tiny

    cfg = limoe_tiny()
    s = contrastive_splits(cfg.pairs, cfg.model.image_size)
    assert set(s) == {"train", "val_zero_shot", "test_zero_shot", "val_retrieval", "test_retrieval"}
    assert len(s["train"]) == 256 + 64 and len(s["test_zero_shot"]) == 1000
    assert (s["train"].labels[:256] >= 0).all() and (s["train"].labels[256:] == -1).all()
    emoji_train = set(s["train"].names[256:])
    assert not emoji_train & set(s["test_retrieval"].names)
    assert not emoji_train & set(s["val_retrieval"].names)
    assert s["train"].images.shape[-1] == 32
