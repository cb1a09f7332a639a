"""Answer-preserving augmentations: colour class kept, shape kept whole, seeded, rank-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmoe.config import ConfigError, RunConfig, TrainConfig
from vlmoe.data import load_easyvqa
from vlmoe.data.augment import AugmentConfig, augment_generator, augment_images
from vlmoe.data.render import COLORS, SHAPES, RenderSpec, render, render_many

ALL = AugmentConfig(
    background=60, brightness=0.1, zoom=0.5, rotate=30, vflip=0.5, resample=0.5, blur=1.0,
    noise=8, jpeg=0.5,
)  # fmt: skip
PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """64 easy-VQA test images as the model receives them: floats in [-1, 1]."""
    images = load_easyvqa("test").images[:64]
    return (images.float() / 255 - 0.5) / 0.5


def _shape_colour(x: torch.Tensor) -> torch.Tensor:
    """[B]: the palette index nearest to each image's median shape pixel."""
    u = (x + 1) / 2
    out = []
    for img in u:
        shape = img.amin(0) < 0.5  # background channels stay ≥ (230 − 60) / 255 · 0.9
        if not shape.any():  # a light colour (yellow, green): take the darkest third
            shape = img.amin(0) <= img.amin(0).quantile(0.3)
        med = img[:, shape].median(1).values
        out.append(((PALETTE - med) ** 2).sum(1).argmin())
    return torch.stack(out)


def test_augmentation_keeps_every_colour_class():
    # large shapes (so that the interior, not the blurred rim, decides), every colour × shape
    scenes = [(c, s) for c in COLORS for s in SHAPES] * 2
    pics = render_many(scenes, RenderSpec(shape_size=(0.35, 0.5)), seed=0)
    x = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pics])
    x = (x.float() / 255 - 0.5) / 0.5
    want = torch.tensor([list(COLORS).index(c) for c, _ in scenes])
    assert torch.equal(_shape_colour(x), want)
    for step in range(3):
        out = augment_images(x, ALL, augment_generator(0, step))
        assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
        assert torch.equal(_shape_colour(out), want)


def test_zoom_and_rotation_keep_the_shape_whole(batch):
    cfg = AugmentConfig(zoom=0.6, rotate=30, vflip=0.5)
    out = (augment_images(batch, cfg, augment_generator(1, 0)) + 1) / 2
    border = torch.cat([out[..., 0, :], out[..., -1, :], out[..., :, 0], out[..., :, -1]], -1)
    assert border.amin(1).min() > 0.85  # nothing but background on the border
    moved = ((out - (batch + 1) / 2).abs().amax((1, 2, 3)) > 0.5).float().mean()
    assert moved > 0.9  # and the shapes did move


def test_deterministic_per_seed_and_step_and_pure(batch):
    before = batch.clone()
    a = augment_images(batch, ALL, augment_generator(0, 7))
    b = augment_images(batch, ALL, augment_generator(0, 7))
    c = augment_images(batch, ALL, augment_generator(0, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(batch, before)  # the input is left alone


@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_two_processes_get_exactly_the_rows_of_one(batch, prob):
    cfg = AugmentConfig(**{**ALL.__dict__, "prob": prob})
    whole = augment_images(batch, cfg, augment_generator(3, 11))
    halves = [
        augment_images(batch[r * 32 : (r + 1) * 32], cfg, augment_generator(3, 11), 2, r)
        for r in range(2)
    ]
    assert torch.equal(torch.cat(halves), whole)


def test_off_by_default_and_validated():
    assert not AugmentConfig().enabled and ALL.enabled
    with pytest.raises(ValueError, match="brightness"):
        AugmentConfig(brightness=0.3)
    with pytest.raises(ValueError, match="jpeg"):
        AugmentConfig(jpeg=1.5)
    # config.json round trip, and a bad field named
    cfg = RunConfig(train=TrainConfig(augment=ALL))
    assert RunConfig.from_dict(cfg.to_dict()).train.augment == ALL
    with pytest.raises(ConfigError, match="train.augment"):
        RunConfig.from_dict({"train": {"augment": {"hue": 0.1}}})


def test_training_applies_the_augmentation_deterministically(tmp_path):
    from vlmoe.checkpoint import load_checkpoint
    from vlmoe.config import get_preset
    from vlmoe.train import train

    def weights(name: str, augment: AugmentConfig) -> dict[str, torch.Tensor]:
        cfg = get_preset("tiny")
        cfg.train.augment = augment
        train(cfg, tmp_path / name, stop_after=4, progress=False, log=lambda s: None)
        ck = load_checkpoint(tmp_path / name)
        assert ck.config.train.augment == augment  # recorded in config.json
        return ck.model.state_dict()

    a, b, plain = weights("a", ALL), weights("b", ALL), weights("plain", AugmentConfig())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_prob_augments_that_share_of_rows_as_the_whole_batch_would(batch):
    half = AugmentConfig(**{**ALL.__dict__, "prob": 0.5})
    every = augment_images(batch, ALL, augment_generator(5, 2))
    some = augment_images(batch, half, augment_generator(5, 2))
    kept = (some == batch).flatten(1).all(1)
    assert 16 < int(kept.sum()) < 48  # about half the 64 rows left as they were
    # the picked rows are exactly what they are when every row is augmented
    assert torch.equal(some[~kept], every[~kept])
    off = AugmentConfig(**{**ALL.__dict__, "prob": 0.0})
    assert not off.enabled and torch.equal(
        augment_images(batch, off, augment_generator(5, 2)), batch
    )
    with pytest.raises(ValueError, match="prob"):
        AugmentConfig(prob=1.5)


def test_start_epoch_leaves_the_first_epochs_clean(tmp_path):
    from vlmoe.checkpoint import load_checkpoint
    from vlmoe.config import get_preset
    from vlmoe.train import train

    def weights(name: str, augment: AugmentConfig, epochs: float) -> dict[str, torch.Tensor]:
        cfg = get_preset("tiny")
        cfg.train.epochs, cfg.train.augment = epochs, augment
        train(cfg, tmp_path / name, stop_after=4, progress=False, log=lambda s: None)
        return load_checkpoint(tmp_path / name).model.state_dict()

    # tiny has more than 4 steps an epoch: with start_epoch 1 its first 4 steps see clean images
    late = AugmentConfig(**{**ALL.__dict__, "start_epoch": 1.0})
    assert late.active(1.0) and not late.active(0.99)
    plain, delayed = weights("plain", AugmentConfig(), 2), weights("late", late, 2)
    now = weights("now", ALL, 2)
    assert all(torch.equal(plain[k], delayed[k]) for k in plain)
    assert any(not torch.equal(plain[k], now[k]) for k in plain)


@pytest.mark.parametrize("world", [1, 2])
def test_rows_drawing_from_one_row_come_out_as_one_image(batch, world):
    # rows 2i and 2i+1 show one picture (as Batch.first_row says when questions come in runs)
    pictures = batch[:16].repeat_interleave(2, 0)  # [32, ...]
    draw = torch.arange(32) // 2 * 2
    whole = augment_images(pictures, ALL, augment_generator(1, 3), draw_rows=draw)
    assert torch.equal(whole[0::2], whole[1::2])
    # each picture got its first row's draws: what the plain call gives that row
    plain = augment_images(pictures, ALL, augment_generator(1, 3))
    assert torch.equal(whole[0::2], plain[0::2]) and not torch.equal(whole[1::2], plain[1::2])
    shards = [
        augment_images(
            pictures[r * 32 // world : (r + 1) * 32 // world], ALL, augment_generator(1, 3),
            world, r, draw_rows=draw[r * 32 // world : (r + 1) * 32 // world],
        )
        for r in range(world)
    ]  # fmt: skip
    assert torch.equal(torch.cat(shards), whole)


@pytest.mark.parametrize("per_image", [1, 2])
def test_training_batches_keep_a_pictures_rows_one_image(per_image):
    from vlmoe.config import get_preset
    from vlmoe.train.task import VQATask

    cfg = get_preset("tiny")
    cfg.train.augment = ALL  # with hflip (on in tiny): every row's image is drawn anew
    cfg.train.questions_per_image = per_image
    task = VQATask(cfg)
    seen = 0
    for batch in task.train_batches(32, 0, 0, 0, 1):
        if per_image == 1:
            assert batch.first_row is None  # rows drew apart: none repeats another's image
            continue
        first = batch.first_row
        assert torch.equal(batch.images[first], batch.images)  # one picture, one image
        seen += int((first != torch.arange(len(first))).sum())
    assert seen > (50 if per_image == 2 else -1)
    with pytest.raises(ConfigError, match="questions_per_image"):
        RunConfig.from_dict({"train": {"questions_per_image": 0}})


def test_vflip_all_turns_the_unaugmented_rows_too(batch):
    every = AugmentConfig(vflip=1.0, vflip_all=True, prob=0.0)
    assert every.enabled
    assert torch.equal(augment_images(batch, every, augment_generator(2, 4)), batch.flip(-2))
    # augmented rows are flipped once (then retouched), not flipped back
    half = AugmentConfig(vflip=1.0, vflip_all=True, brightness=0.05, prob=0.5)
    out = augment_images(batch, half, augment_generator(2, 4))
    plain = (out == batch.flip(-2)).flatten(1).all(1)  # rows left unaugmented
    assert 16 < int(plain.sum()) < 48
    to_flipped = (out - batch.flip(-2)).abs().flatten(1).mean(1)
    to_upright = (out - batch).abs().flatten(1).mean(1)
    assert bool((to_flipped[~plain] < to_upright[~plain]).all())
    # off without vflip_all: unaugmented rows stay upright
    gated = AugmentConfig(vflip=1.0, brightness=0.05, prob=0.5)
    kept = (augment_images(batch, gated, augment_generator(2, 4)) == batch).flatten(1).all(1)
    assert torch.equal(kept, plain)


def test_retouch_leaves_some_augmented_rows_only_moved(batch):
    full = AugmentConfig(**{**ALL.__dict__, "noise": 8.0})
    never = AugmentConfig(**{**full.__dict__, "retouch": 0.0})
    moved_only = AugmentConfig(zoom=ALL.zoom, rotate=ALL.rotate, vflip=ALL.vflip)
    assert torch.equal(
        augment_images(batch, never, augment_generator(6, 1)),
        augment_images(batch, moved_only, augment_generator(6, 1)),
    )
    # a batch whose rows all draw a blur too faint to apply (here: none retouched)
    assert augment_images(batch[:1], never, augment_generator(6, 1)).shape == (1, 3, 64, 64)
    half = AugmentConfig(**{**full.__dict__, "retouch": 0.5})
    a = augment_images(batch, half, augment_generator(6, 1))
    retouched = (a == augment_images(batch, full, augment_generator(6, 1))).flatten(1).all(1)
    moved = (a == augment_images(batch, never, augment_generator(6, 1))).flatten(1).all(1)
    assert bool((retouched ^ moved).all()) and 16 < int(moved.sum()) < 48
    with pytest.raises(ValueError, match="retouch"):
        AugmentConfig(retouch=1.5)


def test_training_with_two_questions_per_picture_is_deterministic(tmp_path):
    from vlmoe.checkpoint import load_checkpoint
    from vlmoe.config import get_preset
    from vlmoe.train import train

    def weights(name: str) -> dict[str, torch.Tensor]:
        cfg = get_preset("tiny")
        cfg.train.augment, cfg.train.questions_per_image = ALL, 2
        train(cfg, tmp_path / name, stop_after=6, progress=False, log=lambda s: None)
        return load_checkpoint(tmp_path / name).model.state_dict()

    # the shared stem pass sums a picture's rows in a fixed order (index_select's backward);
    # with advanced indexing two runs of the default preset drifted apart within 80 steps
    # (not reproduced at this size: this guards the tiny path, the README's repeated timed
    # runs the default)
    a, b = weights("a"), weights("b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_small_shrinks_that_share_of_rows_and_leaves_the_others(batch):
    from vlmoe.data.augment import SMALL_SIDE, _background_weight, _shape_box

    base = AugmentConfig(zoom=3.0, rotate=15, vflip=0.5)
    plain = augment_images(batch, base, augment_generator(3, 2))
    half = augment_images(
        batch, AugmentConfig(**{**base.__dict__, "small": 0.5}), augment_generator(3, 2)
    )
    same = (half == plain).flatten(1).all(1)
    assert 16 < int(same.sum()) < 48  # the rows not drawn small are untouched by the option
    ok, _, _, w, h = _shape_box(_background_weight((half + 1) / 2))
    side = torch.maximum(w, h) / batch.shape[-1]
    assert bool(ok.all())  # every shape still found: none shrunk out of existence
    # shrinking blurs the rim, so a small shape measures up to ~2 pixels under its target
    lo, hi = SMALL_SIDE[0] - 2 / batch.shape[-1], SMALL_SIDE[1] + 1 / batch.shape[-1]
    assert bool(((side >= lo) & (side <= hi))[~same].all())
    assert float(side[same].median()) > 2 * SMALL_SIDE[1]  # the others keep their sizes
    with pytest.raises(ValueError, match="small"):
        AugmentConfig(small=1.5)


def _rim_share(u: torch.Tensor, fill: tuple[int, int, int]) -> float:
    """Share of a shape's pixels [3, S, S] in [0, 1] that are neither background nor fill."""
    from vlmoe.data.augment import _background_weight

    core = (u - torch.tensor(fill, dtype=torch.float32)[:, None, None] / 255).abs().amax(0) < 0.06
    shape = _background_weight(u[None])[0, 0] <= 0.99
    return float((shape & ~core).sum()) / max(1.0, float(shape.sum()))


def test_small_shapes_get_soft_edges_as_drawn_ones_do():
    # a 5-pixel shape point-sampled from a large one has jagged, mostly pure pixels (rim share
    # ~0.3); drawn at that size with anti-aliasing ~0.6; `small` supersamples to get near it
    rng, fill = np.random.default_rng(0), COLORS["blue"]

    def as_tensor(pics: list) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pics]) / 255

    for shape in SHAPES:
        big = as_tensor([render("blue", shape, RenderSpec(), rng) for _ in range(16)])
        small = [render("blue", shape, RenderSpec(shape_size=(0.05, 0.12)), rng) for _ in range(16)]
        drawn = np.mean([_rim_share(u, fill) for u in as_tensor(small)])
        out = (
            augment_images(big * 2 - 1, AugmentConfig(small=1.0), augment_generator(0, 0)) + 1
        ) / 2
        shrunk = np.mean([_rim_share(u, fill) for u in out])
        assert drawn - 0.15 < shrunk < drawn + 0.05, (shape, shrunk, drawn)


def test_supersampled_window_is_that_crop_of_the_whole_supersampled_image(batch):
    import torch.nn.functional as F

    from vlmoe.data.augment import _supersampled

    x, s, f = batch[:4], batch.shape[-1], 4
    g = torch.Generator().manual_seed(0)
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]) * 2.5 + 0.3 * torch.randn(4, 2, 3, generator=g)
    grid = F.affine_grid(theta, [4, 3, s * f, s * f], align_corners=False)
    whole = F.avg_pool2d(F.grid_sample(x, grid, align_corners=False), f)
    x0, y0 = torch.tensor([0, 5, 17, 40]), torch.tensor([3, 0, 22, 40])
    win = _supersampled(x, theta, x0, y0, 24, f)
    for i in range(4):
        want = whole[i, :, y0[i] : y0[i] + 24, x0[i] : x0[i] + 24]
        assert torch.allclose(win[i], want, atol=1e-5)


def test_hard_edges_leave_two_colours_the_shapes_own_and_its_area():
    rng = np.random.default_rng(0)
    scenes = [(c, s) for c in COLORS for s in SHAPES]
    pics = [render(c, s, RenderSpec(shape_size=(0.2, 0.5)), rng) for c, s in scenes]
    x = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pics]) / 127.5 - 1
    out = augment_images(x, AugmentConfig(hard=0.5), augment_generator(0, 0))
    same = (out == x).flatten(1).all(1)
    assert 4 <= int(same.sum()) <= 20  # about half the rows drawn hard, the others untouched
    for i in torch.nonzero(~same).flatten().tolist():
        u, fill = (out[i] + 1) / 2, torch.tensor(COLORS[scenes[i][0]]) / 255
        bg = ((x[i] + 1) / 2)[:, 0, 0]  # easy-VQA-like backgrounds are one flat colour
        is_fill = (u - fill[:, None, None]).abs().amax(0) < 1.5 / 255
        is_bg = (u - bg[:, None, None]).abs().amax(0) < 1.5 / 255
        assert bool((is_fill | is_bg).all()), scenes[i]  # no rim: the two colours only
        # about as many shape pixels as the soft picture's coverage adds up to (measured
        # 86–106 %: each rim pixel rounds one way; the area is kept, not the rim dropped)
        d = fill - bg
        cover = (((x[i] + 1) / 2 - bg[:, None, None]) * d[:, None, None]).sum(0) / d.pow(2).sum()
        assert 0.82 < float(is_fill.sum()) / float(cover.sum()) < 1.1, scenes[i]
    with pytest.raises(ValueError, match="hard"):
        AugmentConfig(hard=2.0)
