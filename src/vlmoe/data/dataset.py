"""`VQASplit`: one split of a VQA data set held in memory, and question kinds.

Shapes: N images, Q questions, S image side. Many questions share one image (easy-VQA: ~10),
so images are stored once and each question points at its image row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmoe.data.errors import DataError

QUESTION_KINDS = ("yes/no", "color", "shape", "other")

# Auxiliary verbs that open a yes/no question ("is there …", "does the image …").
_YES_NO_OPENERS = frozenset(
    "is are am was were does do did can could has have had will would should shall may might "
    "isn't aren't wasn't weren't doesn't don't didn't can't couldn't hasn't haven't".split()
)
_WH_OPENERS = frozenset(["what", "which", "what's", "whats"])
_COLOR_WORD = re.compile(r"\bcolou?rs?\b")
_SHAPE_WORD = re.compile(r"\bshapes?\b")
_WORD = re.compile(r"[a-z']+")
# Only for the answer fallback; the question rules above do not depend on a word list.
_YES_NO_ANSWERS = frozenset(["yes", "no"])
_COLOR_ANSWERS = frozenset(
    "red green blue yellow black white gray grey brown teal orange purple pink".split()
)
_SHAPE_ANSWERS = frozenset("circle rectangle triangle square ellipse star".split())


def question_kind(question: str, answer: str | None = None) -> str:
    """The kind of a question, one of `QUESTION_KINDS`, read from its text.

    Rules, in order: opens with an auxiliary verb ("is", "does", "are", …) and offers no
    "… or …" choice → "yes/no"; mentions "color"/"colour" → "color"; a what/which question
    that mentions "shape" ("what shape is …", "what is the blue shape?") → "shape"; else
    "other". Works without an answer (at ask time); when the text says "other" and an
    answer is given, a yes/no, colour or shape answer decides instead.
    """
    text = question.lower().strip()
    words = _WORD.findall(text)
    if words and words[0] in _YES_NO_OPENERS and " or " not in f" {text} ":
        return "yes/no"
    if _COLOR_WORD.search(text):
        return "color"
    if words and words[0] in _WH_OPENERS and _SHAPE_WORD.search(text):
        return "shape"
    if answer is not None:
        a = answer.lower().strip()
        if a in _YES_NO_ANSWERS:
            return "yes/no"
        if a in _COLOR_ANSWERS:
            return "color"
        if a in _SHAPE_ANSWERS:
            return "shape"
    return "other"


@dataclass
class VQASplit:
    """One split in memory: images once, questions pointing at them.

    images: uint8 [N, 3, S, S] RGB. image_index: long [Q], the row of `images` for each
    question. questions / answers / kinds: Q strings each (kinds from `question_kind`).
    source: where it came from ("easy-vqa:train", or the JSONL path). image_names: N strings
    (easy-VQA image id, or the path as written in the JSONL) for reports.
    Treat the tensors as read-only: splits loaded from the same files may share them.
    """

    images: torch.Tensor
    image_index: torch.Tensor
    questions: list[str]
    answers: list[str]
    kinds: list[str]
    source: str
    image_names: list[str]
    # Per-split memo of derived tensors (token ids, labels) so that every epoch reuses them.
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        q = len(self.questions)
        if not (len(self.answers) == len(self.kinds) == self.image_index.shape[0] == q):
            raise ValueError(
                f"VQASplit: {q} questions, {len(self.answers)} answers, {len(self.kinds)} "
                f"kinds, {self.image_index.shape[0]} image indices; expected equal counts"
            )
        if len(self.image_names) != self.images.shape[0]:
            raise ValueError(
                f"VQASplit: {self.images.shape[0]} images but {len(self.image_names)} names"
            )

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def __repr__(self) -> str:
        return (
            f"VQASplit(source={self.source!r}, questions={len(self)}, "
            f"images={self.images.shape[0]}, image_size={self.image_size})"
        )

    def subset(self, indices: Sequence[int] | torch.Tensor | slice | range) -> VQASplit:
        """The questions at `indices` (in that order), keeping only the images they use."""
        if isinstance(indices, slice):
            indices = range(len(self))[indices]
        idx_Q = torch.as_tensor(list(indices) if isinstance(indices, range) else indices)
        idx_Q = idx_Q.to(torch.long).reshape(-1)
        rows = self.image_index[idx_Q]
        used_rows, new_index = torch.unique(rows, sorted=True, return_inverse=True)
        idx = idx_Q.tolist()
        return VQASplit(
            images=self.images[used_rows],
            image_index=new_index.reshape(-1),
            questions=[self.questions[i] for i in idx],
            answers=[self.answers[i] for i in idx],
            kinds=[self.kinds[i] for i in idx],
            source=self.source,
            image_names=[self.image_names[r] for r in used_rows.tolist()],
        )

    def answer_vocab(self) -> list[str]:
        """The distinct answers, sorted: a deterministic answer list for a classifier head."""
        return sorted(set(self.answers))


def split_by_image(split: VQASplit, val_fraction: float, seed: int) -> tuple[VQASplit, VQASplit]:
    """Carve (train, val) from `split` by image: a question goes where its image goes, so no
    image is in both. round(val_fraction · N) images go to val, chosen by a seeded
    permutation of the image rows (the same seed always gives the same split). Both keep
    `split.source`; callers rename them."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_images = split.images.shape[0]
    n_val = round(val_fraction * n_images)
    gen = torch.Generator().manual_seed(seed)
    is_val_N = torch.zeros(n_images, dtype=torch.bool)
    is_val_N[torch.randperm(n_images, generator=gen)[:n_val]] = True
    is_val_Q = is_val_N[split.image_index]
    train = split.subset(torch.nonzero(~is_val_Q).flatten())
    val = split.subset(torch.nonzero(is_val_Q).flatten())
    return train, val
