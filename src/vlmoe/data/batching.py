"""Batches: a deterministic, shardable, resumable iteration over a `VQASplit`.

Shapes: B batch, L tokens (longest question in the batch, at most max_len), S image side,
Q questions in the split. Questions are tokenised once per (split, tokenizer, max_len) and
answers mapped once per (split, answer list); a batch is then a few index operations
(about 1 ms for 128 easy-VQA questions on one CPU core).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch

from vlmoe.data.dataset import VQASplit
from vlmoe.data.tokenizer import WordTokenizer

IGNORE_INDEX = -100  # label of an answer outside the answer list; `cross_entropy` skips it


@dataclass
class Batch:
    """images float32 [B, 3, S, S] in [-1, 1] ((x/255 - 0.5) / 0.5); input_ids long [B, L];
    attention_mask bool [B, L], True on real tokens; labels long [B], index into the answer
    list or -100 (IGNORE_INDEX) for an answer not in it; question_index long [B], the row of
    each question in the split (for reports and per-kind accuracy).

    first_row long [B] or None: for each row, the first row of the *global* batch (all ranks'
    rows in rank order) that shows the same picture. Rows with equal first_row show identical
    images, so the model runs its vision stem once per picture; training draws a row's random
    flips and augmentations from its first_row, which keeps that true (and the same at any
    process count). None: no row is known to repeat another's image.

    scenes long [B, G] or None: what each row's picture shows (easy-VQA: colour, shape index),
    the scene head's labels in training (`ModelConfig.scene_loss`). extra_images float
    [E, 3, S, S] and extra_scenes long [E, G], or None: pictures only the stem and the scene
    head see (`TrainConfig.scene_extra`)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None  # None when answering (no targets)
    question_index: torch.Tensor
    first_row: torch.Tensor | None = None
    scenes: torch.Tensor | None = None
    extra_images: torch.Tensor | None = None
    extra_scenes: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.question_index.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""
        return Batch(
            **{
                f.name: None
                if (t := getattr(self, f.name)) is None
                else t.to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )


def num_batches(n_questions: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """How many batches each rank gets from `iterate_batches` over n_questions (the number
    of global batches of batch_size · world_size)."""
    global_batch = batch_size * world_size
    if drop_last:
        return n_questions // global_batch
    return math.ceil(n_questions / global_batch)


def answer_labels(split: VQASplit, answers: Sequence[str]) -> torch.Tensor:
    """long [Q]: the index of each question's answer in `answers`, -100 where absent."""
    key = ("labels", tuple(answers))
    if key not in split._cache:
        if len(set(answers)) != len(answers):
            raise ValueError("answers: the answer list has duplicates")
        index = {a: i for i, a in enumerate(answers)}
        labels = [index.get(a, IGNORE_INDEX) for a in split.answers]
        split._cache[key] = torch.tensor(labels, dtype=torch.long)
    return split._cache[key]


def encoded_questions(
    split: VQASplit, tokenizer: WordTokenizer, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids long [Q, L_max], lengths long [Q]) for the whole split, computed once."""
    key = ("ids", tokenizer.fingerprint, max_len)
    if key not in split._cache:
        ids_QL, mask_QL = tokenizer.encode_batch(split.questions, max_len)
        split._cache[key] = (ids_QL, mask_QL.sum(dim=1))
    return split._cache[key]


def iterate_batches(
    split: VQASplit,
    tokenizer: WordTokenizer,
    answers: Sequence[str],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    max_len: int = 32,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    per_image: int = 1,
) -> Iterator[Batch]:
    """Yield this rank's batches of one epoch.

    Order: with `shuffle`, a permutation drawn from a torch.Generator seeded by (seed,
    epoch) — the same on every rank and every run; without, split order. `per_image` > 1
    (with `shuffle`): the questions of each picture are dealt out in runs of up to
    `per_image` consecutive questions (the runs in random order), so a batch holds fewer
    pictures, each with several questions, and the vision stem runs once per picture
    (`Batch.first_row`).
    Sharding: the order is cut into global batches of batch_size · world_size questions;
    rank r takes the r-th contiguous block of batch_size of each. So the ranks' shards,
    concatenated in rank order, are exactly the batches one rank would get with batch_size ·
    world_size, and every rank yields `num_batches(...)` batches. A last, short global
    batch (drop_last=False) is split as evenly as possible (sizes differ by at most one;
    a rank may get an empty batch if fewer questions than ranks remain) — weight losses by
    the global count, or use drop_last=True for training with world_size > 1.
    Resume: `start_batch` skips that many batches of this epoch before any image or token
    is touched.
    Argument errors raise ValueError now, not at the first `next()`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    ids_QL, lengths_Q = encoded_questions(split, tokenizer, max_len)
    labels_Q = answer_labels(split, answers)
    n = len(split)
    if shuffle:
        # Mix seed and epoch into one 63-bit seed; distinct (seed, epoch) pairs for any
        # practical epoch count (< 1,000,003) give distinct streams.
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
        order_Q = torch.randperm(n, generator=gen)
        if per_image > 1:
            order_Q = _runs_by_image(order_Q, split.image_index, per_image, gen)
    else:
        order_Q = torch.arange(n)
    return _batches(
        split, ids_QL, lengths_Q, labels_Q, order_Q, batch_size, drop_last, rank, world_size,
        start_batch,
    )  # fmt: skip


def _runs_by_image(
    order_Q: torch.Tensor, image_Q: torch.Tensor, per_image: int, gen: torch.Generator
) -> torch.Tensor:
    """`order_Q` regrouped: each picture's questions (in their `order_Q` order) cut into runs
    of up to `per_image`, the runs in a random order from `gen`. long [Q], a permutation."""
    n = order_Q.numel()
    by_image = order_Q[torch.sort(image_Q[order_Q], stable=True).indices]
    pic = image_Q[by_image]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = pic[1:] != pic[:-1]  # first question of each picture
    first_of_pic = torch.cummax(torch.where(starts, torch.arange(n), 0), 0).values
    pos = torch.arange(n) - first_of_pic  # position within its picture
    run_start = starts | (pos % per_image == 0)
    run_id = torch.cumsum(run_start.long(), 0) - 1
    run_rank = torch.argsort(torch.randperm(int(run_id[-1]) + 1, generator=gen))
    # runs in the shuffled order, questions inside a run in their order
    return by_image[torch.argsort(run_rank[run_id] * per_image + pos % per_image)]


def group_rows(keys_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by equal key: (first long [U], the first row of each of the U distinct
    keys in key order; inverse long [B], each row's group), so ``keys_B[first][inverse]``
    equals ``keys_B``."""
    keys, inverse = torch.unique(keys_B, return_inverse=True)
    first = torch.full((keys.numel(),), keys_B.numel(), dtype=torch.long, device=keys_B.device)
    first.scatter_reduce_(0, inverse, torch.arange(keys_B.numel(), device=keys_B.device), "amin")
    return first, inverse


def _first_rows(image_G: torch.Tensor) -> torch.Tensor:
    """long [G]: for each row of a global batch, the first row showing the same picture."""
    first, inverse = group_rows(image_G)
    return first[inverse]


def _batches(
    split: VQASplit,
    ids_QL: torch.Tensor,
    lengths_Q: torch.Tensor,
    labels_Q: torch.Tensor,
    order_Q: torch.Tensor,
    batch_size: int,
    drop_last: bool,
    rank: int,
    world_size: int,
    start_batch: int,
) -> Iterator[Batch]:
    global_batch = batch_size * world_size
    for j in range(start_batch, num_batches(len(order_Q), batch_size, drop_last, world_size)):
        chunk = order_Q[j * global_batch : (j + 1) * global_batch]
        rows = torch.arange(len(chunk))
        if len(chunk) == global_batch:
            rows_B = rows[rank * batch_size : (rank + 1) * batch_size]
        else:
            rows_B = torch.tensor_split(rows, world_size)[rank]
        batch = _make_batch(split, ids_QL, lengths_Q, labels_Q, chunk[rows_B])
        batch.first_row = _first_rows(split.image_index[chunk])[rows_B]
        yield batch


def model_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pictures [..., 3, S, S] → float32 in [-1, 1], the range `Batch.images` holds:
    (x/255 − 0.5)/0.5 == x/127.5 − 1, in place on the fresh float copy."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def _make_batch(
    split: VQASplit,
    ids_QL: torch.Tensor,
    lengths_Q: torch.Tensor,
    labels_Q: torch.Tensor,
    idx_B: torch.Tensor,
) -> Batch:
    lengths_B = lengths_Q[idx_B]
    length = int(lengths_B.max()) if len(idx_B) else 0
    images_B3SS = model_pixels(split.images[split.image_index[idx_B]])
    return Batch(
        images=images_B3SS,
        input_ids=ids_QL[idx_B, :length],
        attention_mask=torch.arange(length) < lengths_B[:, None],
        labels=labels_Q[idx_B],
        question_index=idx_B.clone(),
    )
