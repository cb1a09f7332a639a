"""The auxiliary scene head (`model.scene_loss`, `train.scene_extra`): its labels are what the
pictures show, its extra pictures are a pure function of (seed, step) on their own stream, its
loss reaches the stem, and options it cannot honour are refused in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmoe.checkpoint import load_checkpoint
from vlmoe.config import ConfigError, get_preset
from vlmoe.data.render import COLORS, SHAPES
from vlmoe.models import build_model
from vlmoe.train import VQATask, train
from vlmoe.train.task import complete_config


def _task(scene_loss: float = 1.0, extra: int = 8, preset: str = "tiny", **train_kw) -> VQATask:
    cfg = get_preset(preset)
    cfg.model = dataclasses.replace(cfg.model, scene_loss=scene_loss)
    cfg.train = dataclasses.replace(cfg.train, scene_extra=extra, **train_kw)
    return VQATask(cfg)


def _first_batch(task: VQATask):
    return next(task.train_batches(task.cfg.train.batch_size, 0, 0, rank=0, world_size=1))


def test_each_row_is_labelled_with_the_colour_and_shape_its_question_states():
    task = _task()
    batch = _first_batch(task)
    assert task.cfg.model.scene_classes == (len(COLORS), len(SHAPES))
    split, checked = task.train_split, 0
    for row, q in enumerate(batch.question_index.tolist()):
        answer = split.answers[q]
        color, shape = batch.scenes[row].tolist()
        if answer in COLORS:
            assert list(COLORS)[color] == answer
            checked += 1
        elif answer in SHAPES:
            assert SHAPES[shape] == answer
            checked += 1
    assert checked >= 3  # a tiny batch still holds several colour and shape questions


def _shape_color(img: torch.Tensor) -> str:
    """The palette colour whose blend with the background best explains the pixel of img
    [3, S, S] (0..255) most unlike the corner's (a shape a few pixels wide has few pure ones)."""
    bg = img[:, 0, 0]
    far = img.flatten(1)[:, (img - bg[:, None, None]).norm(dim=0).flatten().argmax()] - bg
    v = torch.tensor(list(COLORS.values()), dtype=torch.float) - bg  # [8, 3]
    a = (v @ far / (v * v).sum(1)).clamp(0.3, 1.0)  # the shape's share of the pixel
    return list(COLORS)[int((far - a[:, None] * v).norm(dim=1).argmin())]


def test_extra_pictures_show_their_labelled_colour_and_follow_the_step():
    task = _task(extra=64, preset="default", train_subset=2000)  # 64 px: small shapes legible
    x, scenes = task.extra_pictures(step=3, rank=0, world=1)
    assert x.shape[0] == 64 and scenes.shape == (64, 2)
    # shrunk to a few pixels and moved, never recoloured (labels of other pictures would
    # agree for about 1 in 8: 11 of 64)
    colors = [_shape_color(img) for img in (x + 1) * 127.5]
    assert colors == [list(COLORS)[c] for c in scenes[:, 0].tolist()]
    again, _ = task.extra_pictures(step=3, rank=0, world=1)
    other, _ = task.extra_pictures(step=4, rank=0, world=1)
    assert torch.equal(x, again) and not torch.equal(x, other)
    halves = [task.extra_pictures(step=3, rank=r, world=2) for r in (0, 1)]
    # any process count draws the same pictures (up to float rounding: batch-size-dependent
    # kernels in the resampling moved 18 of 64 by at most 0.0009 of the [-1, 1] range)
    assert torch.equal(torch.cat([h[1] for h in halves]), scenes)
    assert torch.allclose(torch.cat([h[0] for h in halves]), x, atol=4e-3)


def test_the_batches_themselves_do_not_change_with_the_scene_head():
    aug = dataclasses.replace(get_preset("default").train.augment, start_epoch=0)
    plain = _first_batch(_task(scene_loss=0.0, extra=0, augment=aug))
    with_head = _first_batch(_task(augment=aug))
    assert plain.scenes is None and with_head.extra_images is not None
    assert torch.equal(plain.images, with_head.images)


def test_the_scene_loss_reaches_the_stem_and_only_in_training():
    task = _task()
    batch = _first_batch(task)
    torch.manual_seed(0)
    model = build_model(task.cfg.model)
    with_scene = model(batch)
    plain = model(dataclasses.replace(batch, scenes=None, extra_images=None, extra_scenes=None))
    # untrained, the scene loss is about log 8 + log 3
    assert float(with_scene.loss.detach()) > float(plain.loss.detach()) + 0.5
    assert torch.equal(with_scene.logits, plain.logits)  # answers never read the head
    scene_only = with_scene.loss - plain.loss
    scene_only.backward()
    assert model.vision.stem[0].weight.grad.abs().sum() > 0
    assert model.head.mlp[1].weight.grad is None or model.head.mlp[1].weight.grad.abs().sum() == 0


def test_a_trained_checkpoint_with_a_scene_head_loads_with_its_head(tmp_path):
    cfg = _task().cfg
    train(cfg, tmp_path / "ck", progress=False, stop_after=3)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.config.model.scene_classes == (8, 3) and ck.model.scene_head is not None


@pytest.mark.parametrize(
    ("model_kw", "train_kw", "data", "needle"),
    [
        ({"scene_loss": 1.0}, {}, "x.jsonl", "model.scene_loss: the scene head learns"),
        ({}, {"scene_extra": 4}, "easy-vqa", "train.scene_extra: the extra pictures train"),
        ({"scene_loss": -1.0}, {}, "easy-vqa", "model.scene_loss"),
    ],
)
def test_options_the_scene_head_cannot_honour_are_refused(model_kw, train_kw, data, needle):
    cfg = get_preset("tiny")
    with pytest.raises(ConfigError, match=needle):
        cfg.model = dataclasses.replace(cfg.model, **model_kw)
        cfg.train = dataclasses.replace(cfg.train, **train_kw)
        complete_config(dataclasses.replace(cfg, data=data), _task(0.0, 0).tokenizer, ["a"])


def test_the_scene_head_counts_in_the_total_but_not_as_active():
    torch.manual_seed(0)
    with_head = build_model(_task().cfg.model)
    without = build_model(_task(0.0, 0).cfg.model)
    head = sum(p.numel() for p in with_head.scene_head.parameters())
    assert head > 0 and without.scene_head is None
    assert with_head.param_counts() == (without.param_counts()[0] + head, without.param_counts()[1])
