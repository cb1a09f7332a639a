"""easy-VQA (Zhou 2020) from the `easy-vqa` pip package: no download at run time.

38,575 train and 9,673 test questions about 4,000 / 1,000 64×64 images of one coloured
shape; 13 answers. There is no official validation split: "val" is carved from train by
image, so test stays for final numbers only.
"""

from __future__ import annotations

import functools

import torch

from vlmoe.data.dataset import VQASplit, question_kind, split_by_image
from vlmoe.data.errors import DataError
from vlmoe.data.images import load_images

SPLITS = ("train", "val", "test")


def easyvqa_answers() -> list[str]:
    """The 13 easy-VQA answers in the package's order."""
    import easy_vqa

    return list(easy_vqa.get_answers())


@functools.lru_cache(maxsize=4)
def _load_full(which: str, image_size: int) -> VQASplit:
    """The package's whole train or test split, decoded once per process and size."""
    import easy_vqa

    if which == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    ids = sorted(paths)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    return VQASplit(
        images=load_images([paths[i] for i in ids], image_size),
        image_index=torch.tensor([row_of[i] for i in image_ids], dtype=torch.long),
        questions=list(questions),
        answers=list(answers),
        kinds=[question_kind(q, a) for q, a in zip(questions, answers, strict=True)],
        source=f"easy-vqa:{which}",
        image_names=[str(i) for i in ids],
    )


def load_easyvqa(
    split: str, image_size: int = 64, val_fraction: float = 0.1, seed: int = 0
) -> VQASplit:
    """Load an easy-VQA split: "train", "val" or "test".

    "train" and "val" partition the package's train questions by image (no image in both):
    round(val_fraction · 4000) images and their questions go to val, chosen by `seed`.
    val_fraction=0 gives the full train set and an empty val. Images are decoded once per
    process (about a second) and shared by the splits; treat them as read-only.
    """
    if split not in SPLITS:
        raise DataError(f"easy-vqa: unknown split {split!r}, expected one of {', '.join(SPLITS)}")
    if split == "test":
        return _load_full("test", image_size).subset(slice(None))
    train, val = split_by_image(_load_full("train", image_size), val_fraction, seed)
    out = train if split == "train" else val
    out.source = f"easy-vqa:{split}"
    return out
