"""What the trainer needs from a model family and its data — and the VQA task of VL-MoE.

The trainer (``vlmoe.train.loop``) knows no model family. It talks to a ``Task``: build the
model of a stage, yield this process's training batches, evaluate a split, describe itself in
``config.json`` and write its assets (tokenizer, answer list) into a checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from vlmoe.config import ConfigError, RunConfig, StageConfig
from vlmoe.data import Batch, VQASplit, WordTokenizer, iterate_batches, load_data, num_batches
from vlmoe.data.augment import AugmentConfig, augment_generator, augment_images
from vlmoe.data.batching import model_pixels
from vlmoe.data.render import COLORS, SHAPES, easyvqa_scenes
from vlmoe.evaluate import EvalResult, evaluate
from vlmoe.models import build_model
from vlmoe.validate import check_batch_fits


class Task(Protocol):
    """A model family with its data, as the trainer sees it."""

    cfg: RunConfig  #: the run's config, complete (vocabulary size, answer count filled in)
    kind: str  #: written to config.json ("vqa", "contrastive", "generative")

    def build_model(self, stage: StageConfig) -> nn.Module:
        """A fresh model for ``stage`` (its ``forward(batch)`` returns a ``ModelOutput``)."""
        ...

    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Initialise ``model`` from another checkpoint's (or stage's) weights."""
        ...

    def batches_per_epoch(self, batch_size: int) -> int:
        """Optimiser steps in one epoch at global batch ``batch_size``."""
        ...

    def train_batches(
        self, batch_size: int, epoch: int, start: int, rank: int, world_size: int
    ) -> Iterator[Any]:
        """This process's share of the global training batches of ``epoch``, from ``start``."""
        ...

    def evaluate(self, model: nn.Module, split: str, device: str) -> EvalResult | None:
        """Score ``split`` ("val" or "test"; None when the data has no such split)."""
        ...

    def meta(self) -> dict[str, Any]:
        """Extra fields of config.json that loading the checkpoint needs."""
        ...

    def write_assets(self, folder: Path) -> None:
        """Write the files besides the weights that loading needs (e.g. the tokenizer)."""
        ...


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy the entries of ``state`` whose name and shape match a parameter or buffer of
    ``model``; returns how many did. None matching raises ConfigError (a wrong init_from)."""
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise ConfigError("train.stages.init_from: no weight of that checkpoint fits this model")
    model.load_state_dict(take, strict=False)
    return len(take)


class VQATask:
    """VL-MoE on a VQA split (easy-VQA or JSONL): answer classification."""

    kind = "vqa"

    def __init__(
        self,
        cfg: RunConfig,
        tokenizer: WordTokenizer | None = None,
        answers: list[str] | None = None,
    ) -> None:
        self.train_split, self.val_split = prepare_splits(cfg)
        self.tokenizer = tokenizer or WordTokenizer.build(self.train_split.questions)
        self.answers = answers if answers is not None else sorted(set(self.train_split.answers))
        self.cfg = complete_config(cfg, self.tokenizer, self.answers)
        #: long [N pictures of train, 2]: each picture's colour and shape (scene head labels)
        self.scenes = scene_labels(self.train_split) if self.cfg.model.scene_classes else None

    @classmethod
    def resuming(cls, cfg: RunConfig, out: Path, meta: dict[str, Any]) -> VQATask:
        """The task of a run resumed from checkpoint ``out``: its tokenizer and answers."""
        from vlmoe.checkpoint import resolve_checkpoint_dir

        tok = WordTokenizer.load(resolve_checkpoint_dir(out) / "tokenizer.json")
        return cls(cfg, tok, [str(a) for a in meta["answers"]])

    def build_model(self, stage: StageConfig) -> nn.Module:
        return build_model(self.cfg.model)

    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_matching(model, state)

    def batches_per_epoch(self, batch_size: int) -> int:
        # a clear DataError naming the data, not zero steps per epoch (batches are global)
        check_batch_fits(len(self.train_split), batch_size, 1, self.train_split.source)
        return num_batches(len(self.train_split), batch_size, drop_last=True)

    def train_batches(
        self, batch_size: int, epoch: int, start: int, rank: int, world_size: int
    ) -> Iterator[Batch]:
        t = self.cfg.train
        batches = iterate_batches(
            self.train_split, self.tokenizer, self.answers, batch_size // world_size,
            shuffle=True, seed=t.seed, epoch=epoch, drop_last=True,
            max_len=self.cfg.model.max_text_len, start_batch=start, rank=rank,
            world_size=world_size, per_image=t.questions_per_image,
        )  # fmt: skip
        per_epoch = self.batches_per_epoch(batch_size)
        # rows of one picture take the draws of its first row (so stay one image) when
        # questions come grouped by picture; otherwise each row draws its own
        shared = t.questions_per_image > 1
        for i, batch in enumerate(batches, start):
            draw = batch.first_row if shared else None
            if t.hflip:
                batch.images = hflip(batch.images, (t.seed, epoch, i), rank, world_size, draw)
            # answer-preserving, never hue; a function of (seed, step)
            augment = t.augment.active(epoch + i / per_epoch)
            if augment:
                gen = augment_generator(t.seed, epoch * per_epoch + i)
                batch.images = augment_images(
                    batch.images, t.augment, gen, world_size, rank, draw_rows=draw
                )
            if (t.hflip or augment) and not shared:
                batch.first_row = None  # rows of one picture drew apart: no longer one image
            if self.scenes is not None:
                batch.scenes = self.scenes[self.train_split.image_index[batch.question_index]]
                if t.scene_extra:
                    batch.extra_images, batch.extra_scenes = self.extra_pictures(
                        epoch * per_epoch + i, rank, world_size
                    )
            yield batch

    def extra_pictures(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of step `step`'s `train.scene_extra` extra pictures for the scene
        head: (images float [E, 3, S, S] in [-1, 1], scenes long [E, 2]). Training pictures
        drawn at random and rescaled by `SCENE_EXTRA_AUGMENT`; a pure function of (seed, step),
        on a stream of its own (the batches and their augmentation draw as without it)."""
        t, images = self.cfg.train, self.train_split.images
        per_rank = -(-t.scene_extra // world)
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + step + 0xE7A)
        pick = torch.randint(0, images.shape[0], (per_rank * world,), generator=g)
        mine = pick[rank * per_rank : (rank + 1) * per_rank]
        x = model_pixels(images[mine])
        gen = augment_generator(t.seed + 0xE7A, step)
        return augment_images(x, SCENE_EXTRA_AUGMENT, gen, world, rank), self.scenes[mine]

    def evaluate(self, model: nn.Module, split: str, device: str) -> EvalResult | None:
        t = self.cfg.train
        if split == "val":
            data = self.val_split
        elif self.cfg.data == "easy-vqa":
            data = load_data(
                "easy-vqa", "test", self.cfg.model.image_size, t.val_fraction, t.data_seed
            )
            n = t.subset("test")
            data = data.subset(range(min(n, len(data)))) if n else data
        else:
            return None
        return evaluate(model, data, self.tokenizer, self.answers, batch_size=t.eval_batch_size,
                        device=device, warn_unknown=split == "test")  # fmt: skip

    def meta(self) -> dict[str, Any]:
        return {"answers": list(self.answers)}

    def write_assets(self, folder: Path) -> None:
        self.tokenizer.save(folder / "tokenizer.json")


def hflip(
    images: torch.Tensor,
    key: tuple[int, int, int],
    rank: int,
    world: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mirror a random half of a batch's images [B, 3, S, S] (easy-VQA answers — colour, shape,
    yes/no — do not change under a mirror). The coin flips are drawn for the whole global
    batch from a generator keyed by (seed, epoch, batch), and each rank keeps its rows: the same
    images flip at any process count, and a resumed run flips exactly as an uninterrupted one.
    `rows` (long [B], rows of the global batch): take those rows' coins instead of this
    rank's own (`Batch.first_row`: rows of one picture flip together).
    """
    seed, epoch, i = key
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + i) % 2**63)
    coins = torch.rand(images.shape[0] * world, generator=g) < 0.5
    flip = coins.chunk(world)[rank] if rows is None else coins[rows]
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def prepare_splits(cfg: RunConfig) -> tuple[VQASplit, VQASplit]:
    """The training and validation splits of ``cfg.data`` (with the configured subsets)."""
    t = cfg.train
    train_split = load_data(cfg.data, "train", cfg.model.image_size, t.val_fraction, t.data_seed)
    val_split = load_data(cfg.data, "val", cfg.model.image_size, t.val_fraction, t.data_seed)
    if t.train_subset:
        # a seeded random subset: easy-VQA lists ~10 questions per image, so the first N
        # questions would cover only ~N/10 images
        g = torch.Generator().manual_seed(t.data_seed)
        keep = torch.randperm(len(train_split), generator=g)[: t.train_subset].sort().values
        train_split = train_split.subset(keep)
    if t.eval_subset:
        val_split = val_split.subset(range(min(t.eval_subset, len(val_split))))
    return train_split, val_split


#: how `train.scene_extra` pictures are drawn: each shape shrunk to 0.06–0.16 of the side
#: (3–9 pixels) and moved — the sizes easy-VQA rarely draws and where the answers alone left
#: the stem weakest (README, Robustness, item 8). Nothing else: the default's retouching on
#: top (JPEG, blur, shade) took 4× as long to draw (40 against 11 ms for 32 pictures, busy
#: machine) for no gain measured. zoom > 0 only switches the rescaling on; `small` replaces
#: its draw in every row.
SCENE_EXTRA_AUGMENT = AugmentConfig(small=1.0, zoom=0.01)


def scene_labels(split: VQASplit) -> torch.Tensor:
    """long [N, 2]: the colour (index into `COLORS`) and shape (into `SHAPES`) of each of an
    easy-VQA training split's N pictures, as all of the package's questions about it state
    them, at its own 64 px (a subset's few questions, or a resized picture's pixels, can leave
    them open)."""
    full = load_data("easy-vqa", "train", 64, 0.0, 0)
    by_name = dict(zip(full.image_names, easyvqa_scenes(full), strict=True))
    colors = list(COLORS)
    return torch.tensor(
        [
            [colors.index(c), SHAPES.index(s)]
            for c, s in map(by_name.__getitem__, split.image_names)
        ],
        dtype=torch.long,
    )


def complete_config(cfg: RunConfig, tokenizer: WordTokenizer, answers: list[str]) -> RunConfig:
    """``cfg`` with the model's vocabulary size and answer count taken from the data, and the
    scene head's classes (8 colours, 3 shapes) where ``model.scene_loss`` asks for one."""
    m, t = cfg.model, cfg.train
    if m.scene_loss > 0 and cfg.data != "easy-vqa":
        raise ConfigError(
            "model.scene_loss: the scene head learns each picture's colour and shape, which"
            f" only easy-VQA's answers give: expected 0 with data {cfg.data!r}, got {m.scene_loss}"
        )
    if t.scene_extra and m.scene_loss <= 0:
        raise ConfigError(
            "train.scene_extra: the extra pictures train the scene head: expected 0 with"
            f" model.scene_loss 0, got {t.scene_extra}"
        )
    scene = (len(COLORS), len(SHAPES)) if m.scene_loss > 0 else ()
    model = dataclasses.replace(
        m, vocab_size=tokenizer.vocab_size, num_answers=len(answers), scene_classes=scene
    )
    return dataclasses.replace(cfg, model=model)


def prepare_data(
    cfg: RunConfig, tokenizer: WordTokenizer | None = None
) -> tuple[VQASplit, VQASplit, WordTokenizer, list[str]]:
    """Train and validation splits, the tokenizer and the answer list built from train."""
    train_split, val_split = prepare_splits(cfg)
    tokenizer = tokenizer or WordTokenizer.build(train_split.questions)
    return train_split, val_split, tokenizer, sorted(set(train_split.answers))
