"""Batches from a real easy-VQA split: shapes, labels, order, sharding, resume."""

import pytest
import torch

from vlmoe.data import (
    Batch,
    WordTokenizer,
    easyvqa_answers,
    iterate_batches,
    load_easyvqa,
    num_batches,
)


@pytest.fixture(scope="module")
def split():
    return load_easyvqa("test").subset(range(203))  # 203: batches do not divide it evenly


@pytest.fixture(scope="module")
def tok(split):
    return WordTokenizer.build(split.questions)


def _batches(split, tok, answers=None, bs=16, **kw):
    return list(iterate_batches(split, tok, answers or easyvqa_answers(), bs, **kw))


def _cat(batches, name):
    return torch.cat([getattr(b, name) for b in batches])


def test_subset_keeps_only_used_images(split):
    assert len(split) == 203 and split.images.shape[0] == int(split.image_index.max()) + 1
    assert split.subset([5, 0]).questions == [split.questions[5], split.questions[0]]


def test_shapes_range_and_labels(split, tok):
    answers = easyvqa_answers()
    batches = _batches(split, tok, shuffle=False, max_len=32)
    assert len(batches) == num_batches(203, 16, False) == 13 and len(batches[-1]) == 203 - 192
    b = batches[0]
    assert b.images.shape == (16, 3, 64, 64) and b.images.dtype == torch.float32
    assert -1.0 <= b.images.min() < 0 < b.images.max() <= 1.0
    row = split.image_index[b.question_index[3]]
    assert torch.allclose(b.images[3], (split.images[row].float() / 255 - 0.5) / 0.5)
    assert b.input_ids.shape == b.attention_mask.shape and b.attention_mask.dtype == torch.bool
    assert b.attention_mask.sum(1).max() == b.input_ids.shape[1]  # L = longest in batch
    assert (b.input_ids[:, 0] == tok.cls_id).all()
    assert [answers[i] for i in b.labels] == [split.answers[i] for i in b.question_index]
    assert _cat(batches, "question_index").tolist() == list(range(203))
    short = _batches(split, tok, shuffle=False, max_len=4)[0]
    assert short.input_ids.shape[1] == 4
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.labels, b.labels)


def test_unknown_answers_get_minus_100(split, tok):
    labels = _cat(_batches(split, tok, answers=["yes", "no"], shuffle=False), "labels")
    expected = [{"yes": 0, "no": 1}.get(a, -100) for a in split.answers]
    assert labels.tolist() == expected


def test_shuffle_is_deterministic_per_seed_and_epoch(split, tok):
    def order(**kw):
        return _cat(_batches(split, tok, shuffle=True, **kw), "question_index").tolist()

    a = order(seed=1, epoch=0)
    assert a == order(seed=1, epoch=0) and sorted(a) == list(range(203))
    assert a != list(range(203)) and a != order(seed=1, epoch=1) and a != order(seed=2, epoch=0)
    dropped = _batches(split, tok, shuffle=True, seed=1, drop_last=True)
    assert len(dropped) == 12 and all(len(b) == 16 for b in dropped)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_together_equal_one_rank_with_bigger_batch(split, tok, drop_last):
    kw = dict(shuffle=True, seed=7, epoch=2, drop_last=drop_last)
    world = _batches(split, tok, bs=32, **kw)
    shards = [_batches(split, tok, bs=16, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(world) == num_batches(203, 16, drop_last, 2)
    for whole, b0, b1 in zip(world, *shards, strict=True):
        assert torch.equal(torch.cat([b0.question_index, b1.question_index]), whole.question_index)
        assert torch.equal(torch.cat([b0.images, b1.images]), whole.images)
        assert torch.equal(torch.cat([b0.labels, b1.labels]), whole.labels)
    assert len(shards[0][-1]) - len(shards[1][-1]) in (0, 1)


def test_start_batch_resumes_mid_epoch(split, tok):
    full = _batches(split, tok, shuffle=True, seed=3, epoch=1)
    rest = _batches(split, tok, shuffle=True, seed=3, epoch=1, start_batch=5)
    assert len(rest) == len(full) - 5
    for a, b in zip(full[5:], rest, strict=True):
        assert torch.equal(a.question_index, b.question_index)
        assert torch.equal(a.input_ids, b.input_ids)
    assert _batches(split, tok, shuffle=True, start_batch=99) == []


def test_bad_arguments_raise_at_call(split, tok):
    with pytest.raises(ValueError, match="rank"):
        iterate_batches(split, tok, ["yes"], 4, shuffle=False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(split, tok, ["yes"], 0, shuffle=False)


def test_questions_of_a_picture_come_in_runs(split, tok):
    kw = dict(shuffle=True, seed=4, epoch=1)
    runs = _batches(split, tok, per_image=2, **kw)
    order = _cat(runs, "question_index")
    assert sorted(order.tolist()) == list(range(203))  # still every question once
    assert (
        order.tolist() == _cat(_batches(split, tok, per_image=2, **kw), "question_index").tolist()
    )
    assert order.tolist() != _cat(_batches(split, tok, **kw), "question_index").tolist()
    pictures = split.image_index[order]
    # a picture's questions are dealt in runs of at most 2: many neighbours share a picture,
    # three in a row only where two runs of one picture happen to meet
    same_as_prev = (pictures[1:] == pictures[:-1]).long()
    assert int(same_as_prev.sum()) > 203 // 4
    assert int((same_as_prev[1:] & same_as_prev[:-1]).sum()) < 203 // 20
    distinct = [int(split.image_index[b.question_index].unique().numel()) for b in runs]
    one_by_one = [
        int(split.image_index[b.question_index].unique().numel())
        for b in _batches(split, tok, **kw)
    ]
    assert sum(distinct) < 0.75 * sum(one_by_one)  # fewer pictures per batch: cheaper stem


@pytest.mark.parametrize("per_image", [1, 2])
def test_first_row_names_the_first_row_of_the_global_batch_with_that_picture(split, tok, per_image):
    kw = dict(shuffle=True, seed=7, epoch=2, per_image=per_image, drop_last=True)
    world = _batches(split, tok, bs=32, **kw)
    shards = [_batches(split, tok, bs=16, rank=r, world_size=2, **kw) for r in range(2)]
    for whole, b0, b1 in zip(world, *shards, strict=True):
        pic = split.image_index[whole.question_index]
        first = whole.first_row
        assert torch.equal(pic[first], pic)  # the same picture …
        assert all(int(first[i]) == int((pic == pic[i]).nonzero()[0]) for i in range(32))  # … first
        assert torch.equal(torch.cat([b0.first_row, b1.first_row]), first)  # global rows
    assert sum(int((b.first_row != torch.arange(32)).sum()) for b in world) > (
        10 if per_image == 2 else -1
    )
    with pytest.raises(ValueError, match="per_image"):
        iterate_batches(split, tok, ["yes"], 4, shuffle=True, per_image=0)
