"""easy-VQA from the `easy-vqa` package: sizes, the by-image val split, question kinds."""

import easy_vqa
import pytest
import torch

from vlmoe.data import QUESTION_KINDS, DataError, easyvqa_answers, load_easyvqa, question_kind

YES_NO = {"yes", "no"}
COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
SHAPES = {"circle", "rectangle", "triangle"}


def test_sizes_and_val_is_carved_by_image():
    train, val, test = (load_easyvqa(s) for s in ("train", "val", "test"))
    assert len(test) == 9673 and test.images.shape == (1000, 3, 64, 64)
    assert test.images.dtype == torch.uint8 and test.source == "easy-vqa:test"
    assert len(train) + len(val) == 38575
    assert train.images.shape[0] + val.images.shape[0] == 4000
    assert val.images.shape[0] == 400  # round(0.1 * 4000)
    assert not set(train.image_names) & set(val.image_names)
    # every question still points at its own image: compare with a fresh decode by id
    paths = easy_vqa.get_train_image_paths()
    q, a, ids = easy_vqa.get_train_questions()
    by_question = {(qq, aa, i) for qq, aa, i in zip(q, a, ids, strict=True)}
    for split in (train, val):
        for k in (0, len(split) // 2, len(split) - 1):
            name = split.image_names[int(split.image_index[k])]
            assert (split.questions[k], split.answers[k], int(name)) in by_question
    from vlmoe.data import load_image

    row = int(val.image_index[0])
    assert torch.equal(val.images[row], load_image(paths[int(val.image_names[row])], 64))


def test_val_split_is_deterministic_and_seeded():
    a, b = load_easyvqa("val", seed=3), load_easyvqa("val", seed=3)
    assert a.image_names == b.image_names and a.questions == b.questions
    assert set(load_easyvqa("val", seed=4).image_names) != set(a.image_names)
    assert len(load_easyvqa("train", val_fraction=0.0)) == 38575


def test_bad_split_and_fraction():
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_easyvqa("dev")
    with pytest.raises(DataError, match="val_fraction"):
        load_easyvqa("val", val_fraction=1.0)


def test_image_size_resizes():
    small = load_easyvqa("test", image_size=32)
    assert small.images.shape == (1000, 3, 32, 32)


def _expected_kind(answer):
    if answer in YES_NO:
        return "yes/no"
    if answer in COLORS:
        return "color"
    assert answer in SHAPES, answer
    return "shape"


@pytest.mark.parametrize("which", ["train", "test"])
def test_question_kind_matches_answer_on_every_question(which):
    questions, answers, _ = getattr(easy_vqa, f"get_{which}_questions")()
    assert set(answers) <= set(easyvqa_answers())
    wrong = [
        (q, a)
        for q, a in zip(questions, answers, strict=True)
        if question_kind(q) != _expected_kind(a)  # from the text alone, as at ask time
    ]
    assert not wrong, wrong[:5]


def test_question_kind_general_text():
    assert question_kind("Are there two dogs?") == "yes/no"
    assert question_kind("What colour is the car?") == "color"
    assert question_kind("Which shape is red?") == "shape"
    assert question_kind("How many cats are there?") == "other"
    assert question_kind("is it a circle or a triangle?") == "other"
    assert question_kind("is it a circle or a triangle?", "circle") == "shape"
    assert question_kind("name it", "teal") == "color"
    assert all(question_kind(q) in QUESTION_KINDS for q in ["", "?", "what"])
