"""Training augmentations that keep every easy-VQA answer true.

An easy-VQA answer is the shape's colour class (one of 8 exact RGB colours), its kind
(rectangle, circle, triangle), or a yes/no about either. So the shape may move, grow, shrink,
lose its anti-aliasing, be resampled, blurred, compressed, noised, lit a little brighter or
darker, and the background may take another light shade — but the shape's hue never changes,
and the shape stays whole in view. Nothing here jitters hue: colour stays exactly learnable.

Shapes: B local batch rows, N = B · world_size global rows, S image side. Images are the
model's input, normalised floats [B, 3, S, S] in [-1, 1] ((uint8 / 255 − 0.5) / 0.5).

Determinism: every random number comes from the `torch.Generator` passed in, drawn for the
whole global batch of N rows; rank r keeps rows r·B … (r+1)·B − 1. Each row is then processed
on its own, so a row's result does not depend on which other rows share its process: one
process and two give the same images (the hflip rule, `Dist.rank_slice`).
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlmoe.data.batching import group_rows


@dataclass
class AugmentConfig:
    """Which answer-preserving augmentations to apply in training; 0 switches one off."""

    background: float = 0.0  #: darken each background channel by up to this (0..255 units)
    brightness: float = 0.0  #: multiply the image by a factor in [1 − b, 1 + b] (b ≤ 0.2)
    zoom: float = 0.0  #: rescale the shape by [1/(1+z), 1+z] and move it, kept whole in view
    rotate: float = 0.0  #: rotate the shape by up to ± this many degrees (kept whole in view)
    #: probability of an upside-down flip (with rotate ≥ 30 it gives triangles every
    #: orientation: apex up ± 30° and apex down ± 30° cover their 120° period)
    vflip: float = 0.0
    #: flip upside down with probability `vflip` every row, also those `prob` leaves
    #: unaugmented (False: only augmented rows, so an upside-down picture is always also
    #: retouched, and a model may tell upside-down shapes only on retouched pictures)
    vflip_all: bool = False
    resample: float = 0.0  #: probability of a down-and-up resample through a side in [S/2, S)
    blur: float = 0.0  #: Gaussian blur with sigma uniform in [0, blur] pixels
    noise: float = 0.0  #: Gaussian noise with std uniform in [0, noise] (0..255 units)
    jpeg: float = 0.0  #: probability of a JPEG round trip at quality 20..90
    #: probability that an augmented row is also retouched (background, brightness,
    #: resampling, blur, noise, JPEG); the others are only moved, scaled, turned and flipped,
    #: so a shape at a new size or angle is also seen on an untouched picture (1: every row)
    retouch: float = 1.0
    #: probability that a row is augmented at all; the others stay the data set's own images,
    #: so the clean distribution keeps its share of every batch
    prob: float = 1.0
    #: probability that an augmented row's shape is rescaled to a small size, its box's longer
    #: side log-uniform in `SMALL_SIDE` of the image side, instead of by `zoom` (easy-VQA draws
    #: few shapes under an eighth of the side, and `zoom` rarely makes one)
    small: float = 0.0
    #: probability that an augmented row's shape is redrawn with hard edges: every pixel
    #: takes the shape's colour or the background's, whichever covers more of it, as a
    #: program that draws without anti-aliasing gives it
    hard: float = 0.0
    #: the epoch from which augmentation applies (e.g. 2: the first two epochs see clean
    #: images, so shapes are learned before they are shown upside down and rescaled)
    start_epoch: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(
                    f"train.augment.{f.name}: expected >= 0, got {getattr(self, f.name)}"
                )
        # brighter or darker by more than a fifth starts to move colours across classes
        # (red × 0.65 is nearer brown than red): refuse it rather than teach wrong answers
        if self.brightness > 0.2:
            raise ValueError(f"train.augment.brightness: expected <= 0.2, got {self.brightness}")
        probs = (self.resample, self.jpeg, self.vflip, self.prob, self.retouch, self.small,
                 self.hard)  # fmt: skip
        if max(probs) > 1:
            raise ValueError(
                "train.augment.resample, .jpeg, .vflip, .retouch, .small, .hard, .prob are"
                " probabilities: expected <= 1"
            )

    @property
    def enabled(self) -> bool:
        """True when some augmentation is switched on (and `prob` lets rows through)."""
        if self.vflip_all and self.vflip > 0:
            return True
        return self.prob > 0 and any(
            getattr(self, f.name) > 0 for f in fields(self) if f.name not in _SCHEDULE
        )

    def active(self, epoch: float) -> bool:
        """Whether augmentation applies at fractional `epoch` (0 = the first step)."""
        return self.enabled and epoch >= self.start_epoch


#: AugmentConfig fields that say when, how often and to which rows, not what
_SCHEDULE = ("prob", "start_epoch", "vflip_all", "retouch")

#: the range of a `small` row's shape size: its box's longer side over the image side (at
#: 64 px, 4 to 10 pixels; shrinking blurs the rim, so the shape then measures 3 to 9, the
#: robustness table's small shapes, 0.05 to 0.12, as drawn)
SMALL_SIDE = (0.06, 0.16)


def augment_generator(seed: int, step: int) -> torch.Generator:
    """The generator for optimiser step `step` of a run seeded `seed`: a pure function of
    both, so a resumed run draws what the uninterrupted one did."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 0x5EED)


@dataclass
class _Params:
    """Per-row random draws, [N] each (N rows of the global batch)."""

    bg_shift: torch.Tensor  # [N, 3] in [0, 1]
    bright: torch.Tensor
    zoom_u: torch.Tensor  # uniform [0, 1): log-scale position in the allowed range
    angle_u: torch.Tensor
    vflip_u: torch.Tensor
    pos: torch.Tensor  # [N, 2] uniform [0, 1): where the shape goes in its free room
    resample_p: torch.Tensor
    resample_u: torch.Tensor
    blur_u: torch.Tensor
    noise_u: torch.Tensor
    noise_seed: torch.Tensor
    jpeg_p: torch.Tensor
    jpeg_u: torch.Tensor
    apply_u: torch.Tensor  # row augmented at all when below AugmentConfig.prob
    retouch_u: torch.Tensor  # augmented row retouched when below AugmentConfig.retouch
    small_u: torch.Tensor  # augmented row's shape made small when below AugmentConfig.small
    small_side_u: torch.Tensor  # log-scale position of that size in SMALL_SIDE
    hard_u: torch.Tensor  # augmented row's edges made hard when below AugmentConfig.hard

    def rows(self, sl: slice | torch.Tensor) -> _Params:
        return _Params(**{f.name: getattr(self, f.name)[sl] for f in fields(self)})


def _draw(n: int, gen: torch.Generator) -> _Params:
    # always the same draws in the same order, whichever augmentations are on
    def u(*shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=gen)

    return _Params(
        bg_shift=u(3),
        bright=u(),
        zoom_u=u(),
        angle_u=u(),
        vflip_u=u(),
        pos=u(2),
        resample_p=u(),
        resample_u=u(),
        blur_u=u(),
        noise_u=u(),
        noise_seed=torch.randint(0, 2**62, (n,), generator=gen),
        jpeg_p=u(),
        jpeg_u=u(),
        apply_u=u(),  # drawn after the others: theirs stay those of runs made before it
        retouch_u=u(),  # likewise after apply_u
        small_u=u(),  # and these after retouch_u
        small_side_u=u(),
        hard_u=u(),  # last: every earlier draw stays that of runs made before it
    )


def augment_images(
    images_BCHW: torch.Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
    world_size: int = 1,
    rank: int = 0,
    draw_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Augment this rank's rows of a global batch; returns a new tensor [B, 3, S, S].

    Pure: the input is not modified; the output depends only on the input rows, `cfg` and the
    generator's state (which advances). See the module docstring for what is preserved.
    `draw_rows` (long [B], rows of the global batch): each row takes that row's draws instead
    of its own (`Batch.first_row`); rows that show one picture and take one row's draws come
    out as one image, augmented once.
    """
    b = images_BCHW.shape[0]
    params = _draw(b * world_size, gen)
    if draw_rows is None:
        return _augment(images_BCHW, cfg, params.rows(slice(rank * b, (rank + 1) * b)))
    # augment one row per distinct draw row, then hand each row its picture's result
    first, inverse = group_rows(draw_rows)
    once = _augment(images_BCHW[first.to(images_BCHW.device)], cfg, params.rows(draw_rows[first]))
    return once[inverse.to(once.device)]


def _augment(images_BCHW: torch.Tensor, cfg: AugmentConfig, p: _Params) -> torch.Tensor:
    """augment_images on rows whose draws `p` are already chosen."""
    b = images_BCHW.shape[0]
    out = images_BCHW.clone()  # the result; the caller's batch is never written
    if cfg.vflip_all and cfg.vflip > 0:
        flip = torch.nonzero(p.vflip_u < cfg.vflip).flatten().to(out.device)
        out[flip] = out[flip].flip(-2)
        cfg = dataclasses.replace(cfg, vflip=0.0)  # done: the augmented rows flip no more
    pick = torch.nonzero(p.apply_u < cfg.prob).flatten()
    if pick.numel() == 0:
        return out
    # Many small per-row ops: on one thread they cost ~1/20 of what they do across two
    # threads on a busy CPU (each parallel region waits for a descheduled worker).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if pick.numel() == b:  # every row (prob 1): no gather and scatter copies
            return _augment_rows(out, cfg, p)
        # every step below treats a row on its own: the picked rows come out as they would
        # in the whole batch
        out[pick] = _augment_rows(out[pick], cfg, p.rows(pick))
        return out
    finally:
        torch.set_num_threads(threads)


def _augment_rows(images_BCHW: torch.Tensor, cfg: AugmentConfig, p: _Params) -> torch.Tensor:
    dev = images_BCHW.device
    # one working copy in [0, 1], then in-place steps: fresh 6 MB tensors per op cost more
    # than the arithmetic on a busy CPU
    u = images_BCHW.detach().to("cpu", torch.float32, copy=True).add_(1).mul_(0.5)
    if cfg.vflip > 0:
        flip = p.vflip_u < cfg.vflip
        u[flip] = u[flip].flip(-2)
    if cfg.zoom > 0 or cfg.rotate > 0 or cfg.small > 0:
        u = _zoom(u, cfg.zoom, cfg.rotate, p, cfg.small)
    if cfg.hard > 0:
        _harden_(u, p.hard_u < cfg.hard)
    if cfg.retouch < 1:
        p = _untouched(p, p.retouch_u >= cfg.retouch)
    if cfg.background > 0:
        shift = p.bg_shift * (cfg.background / 255)
        u.sub_(_background_weight(u) * shift[:, :, None, None])
    if cfg.brightness > 0:
        u.mul_((1 + cfg.brightness * (2 * p.bright - 1))[:, None, None, None])
    u.clamp_(0, 1)
    if cfg.resample > 0:
        _resample_(u, cfg.resample, p)
    if cfg.blur > 0:
        _blur_(u, p.blur_u * cfg.blur)
    if cfg.noise > 0:
        _noise_(u, p.noise_u * (cfg.noise / 255), p.noise_seed)
    if cfg.jpeg > 0:
        _jpeg_(u, cfg.jpeg, p)
    return u.clamp_(0, 1).mul_(2).sub_(1).to(dev, images_BCHW.dtype)


def _untouched(p: _Params, rows: torch.Tensor) -> _Params:
    """`p` with the retouching draws of `rows` (bool [B]) set to no-ops: no background shift,
    brightness ×1, no resampling, blur, noise or JPEG."""
    none = {"bg_shift": 0.0, "bright": 0.5, "resample_p": 2.0, "blur_u": 0.0, "noise_u": 0.0,
            "jpeg_p": 2.0}  # fmt: skip
    # copy only the draws that change; the others are shared with `p`
    return dataclasses.replace(
        p, **{name: getattr(p, name).masked_fill(_bcast(rows, getattr(p, name)), value)
              for name, value in none.items()}
    )  # fmt: skip


def _bcast(rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """bool [B] → shaped to broadcast over t [B, ...]."""
    return rows.view(-1, *([1] * (t.dim() - 1)))


def _background_weight(u: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] in [0, 1]: 1 on the light background, 0 on the shape.

    The background has every channel ≥ 230/255; no easy-VQA colour has its smallest channel
    above 128/255 (gray), so the smallest channel tells them apart, with a ramp for the
    anti-aliased rim.
    """
    lo, hi = 150 / 255, 215 / 255
    return ((u.amin(1, keepdim=True) - lo) / (hi - lo)).clamp(0, 1)


def _background_colour(u: torch.Tensor, w_bg: torch.Tensor) -> torch.Tensor:
    """[B, 3]: each image's background colour, the mean of u [B, 3, S, S] weighted by its
    `_background_weight` w_bg [B, 1, S, S]."""
    return (u * w_bg).sum((2, 3)) / w_bg.sum((2, 3)).clamp_min(1e-6)


def _shape_box(w_bg: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(found [B] bool, centre x, centre y, width, height [B]) of the non-background pixels."""
    s = w_bg.shape[-1]
    mask = w_bg[:, 0] < 0.75
    ys, xs = mask.any(2), mask.any(1)  # [B, S]: rows / columns the shape touches
    idx = torch.arange(s, dtype=torch.float32)
    x0, x1 = torch.where(xs, idx, s).amin(1), torch.where(xs, idx, -1).amax(1)
    y0, y1 = torch.where(ys, idx, s).amin(1), torch.where(ys, idx, -1).amax(1)
    ok = (x1 >= x0) & (y1 >= y0)
    return ok, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0 + 1).clamp_min(1), (y1 - y0 + 1).clamp_min(1)


def _zoom(
    u: torch.Tensor, zoom: float, rotate: float, p: _Params, small: float = 0.0
) -> torch.Tensor:
    """Rotate and rescale each image about its shape, and move the shape to a random place.

    The shape's bounding box (pixels that are not background) sets how far it may grow: the
    scale is log-uniform in [1/(1+zoom), 1+zoom], capped so that the rotated box still fits
    with a pixel to spare. Rows drawn `small` instead take the scale that brings the rotated
    box's longer side to a size log-uniform in `SMALL_SIDE` of the image side. Uncovered area
    is filled with the image's own background colour.
    """
    n, _, s, _ = u.shape
    w_bg = _background_weight(u)
    bg = _background_colour(u, w_bg)
    ok, cx, cy, w, h = _shape_box(w_bg)
    ang = torch.deg2rad((2 * p.angle_u - 1) * rotate)
    cos, sin = torch.cos(ang), torch.sin(ang)
    rw, rh = w * cos.abs() + h * sin.abs(), w * sin.abs() + h * cos.abs()
    fit = ((s - 2) / (torch.maximum(rw, rh) + 2)).clamp_min(1e-3)
    scale = torch.exp((2 * p.zoom_u - 1) * math.log1p(zoom))
    tiny = (p.small_u < small) & ok
    if small > 0:
        lo, hi = SMALL_SIDE
        side = lo * torch.exp(p.small_side_u * math.log(hi / lo)) * s  # pixels
        scale = torch.where(tiny, side / torch.maximum(rw, rh), scale)
    scale = scale.minimum(fit)
    # where the box's centre goes: anywhere that keeps the scaled, rotated box inside
    lo_x, lo_y = 1 + scale * rw / 2, 1 + scale * rh / 2
    ox = lo_x + p.pos[:, 0] * (s - 1 - 2 * lo_x + 1).clamp_min(0)
    oy = lo_y + p.pos[:, 1] * (s - 1 - 2 * lo_y + 1).clamp_min(0)
    # output pixel q shows input pixel A (q − o) + c, A = R(−angle) / scale; in grid_sample's
    # [-1, 1] coordinates (align_corners=False): x_in = A x_out + t, t = (A·(S−1)𝟙 + 2b + 𝟙)/S − 𝟙
    a = (
        torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
        / scale[:, None, None]
    )
    b = torch.stack([cx, cy], 1) - (a @ torch.stack([ox, oy], 1)[:, :, None])[:, :, 0]
    t = ((a.sum(2) * (s - 1)) + 2 * b + 1) / s - 1
    theta = torch.cat([a, t[:, :, None]], 2)
    theta[~ok] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])  # no shape found: leave the image
    grid = _affine_grid(theta, s, s)
    centred = u.sub_(bg[:, :, None, None])  # u is the caller's working copy
    out = F.grid_sample(centred, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if tiny.any():
        half = scale * torch.maximum(rw, rh) / 2  # the placed box's half side, pixels
        _redo_small_(out, centred, theta, torch.nonzero(tiny).flatten(), ox, oy, half)
    return out.add_(bg[:, :, None, None])


def _redo_small_(
    out: torch.Tensor,
    centred: torch.Tensor,
    theta: torch.Tensor,
    rows: torch.Tensor,
    ox: torch.Tensor,
    oy: torch.Tensor,
    half: torch.Tensor,
) -> None:
    """In place: `out`'s pixels around each small shape of `rows`, sampled again supersampled
    (`_supersampled`) — only a window of the box and a 2-pixel margin, as the rest is
    background. ox, oy, half [B]: where each shape's box is centred and its half side."""
    s, half = out.shape[-1], half[rows]
    w = min(s, int(2 * half.max().ceil()) + 4)
    x0 = (ox[rows] - half - 2).floor().clamp(0, s - w).long()
    y0 = (oy[rows] - half - 2).floor().clamp(0, s - w).long()
    win = _supersampled(centred[rows], theta[rows], x0, y0, w)
    for i, r in enumerate(rows.tolist()):
        out[r, :, y0[i] : y0[i] + w, x0[i] : x0[i] + w] = win[i]


def _supersampled(
    x: torch.Tensor,
    theta: torch.Tensor,
    x0: torch.Tensor,
    y0: torch.Tensor,
    w: int,
    factor: int = 4,
) -> torch.Tensor:
    """The w × w output pixels from (x0, y0) [K] of grid_sample(x [K, 3, S, S], theta [K, 2, 3]),
    sampled at `factor`× the resolution and averaged back down: [K, 3, w, w].

    A shape shrunk to a few pixels so gets soft, area-weighted edges, as a drawing program that
    anti-aliases gives it, rather than the jagged ones one sample per pixel leaves (on which a
    5-pixel circle and square differ by a pixel or two, unlike drawn ones)."""
    s = x.shape[-1]
    # the window's [-1, 1] coordinates map into the whole output's by a scale w / S and a
    # shift to its centre; composed with theta, affine_grid lays the sub-pixels out
    a = w / s
    centre = torch.stack([(2 * x0 + w) / s - 1, (2 * y0 + w) / s - 1], 1).float()  # [K, 2]
    m = theta[:, :, :2]
    t = (m @ centre[:, :, None])[:, :, 0] + theta[:, :, 2]
    theta_win = torch.cat([m * a, t[:, :, None]], 2)
    grid = _affine_grid(theta_win, w * factor, w * factor)
    big = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(big, factor)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`F.affine_grid(theta [N, 2, 3], [N, C, h, w], align_corners=False)` → [N, h, w, 2]
    (equal to ~1e-6; a strided view).

    Why not torch's: it lays the grid out as a matmul with an inner size of 3, which on one
    thread takes ~10× as long as these three broadcast multiply-adds (3.6 against 0.3 ms for
    64 images of 64×64), and `grid_sample` reads this layout no slower."""
    xs = (torch.arange(w, dtype=theta.dtype) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(h, dtype=theta.dtype) * 2 + 1) / h - 1
    t = theta[:, :, :, None, None]  # [N, 2, 3, 1, 1]
    return (t[:, :, 0] * xs + t[:, :, 1] * ys[:, None] + t[:, :, 2]).permute(0, 2, 3, 1)


def _harden_(u: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: the shapes of `rows` (bool [B]) with hard edges. Each pixel of a row is
    background + c · (shape − background) for a coverage c; it becomes the shape's colour
    where c ≥ 1/2, else the background's. The background colour is the mean over the light
    pixels (`_background_weight`); the shape's, the mean over its core: the dark pixels within
    5 % of the one farthest from the background (a mean over the rim would pale it). A row
    whose core has under 4 pixels (a shape of a few pixels) is left as it is."""
    idx = torch.nonzero(rows).flatten()
    if idx.numel() == 0:
        return
    x = u[idx]
    w_bg = _background_weight(x)  # [K, 1, S, S]
    bg = _background_colour(x, w_bg)[:, :, None, None]
    diff = x - bg
    # not diff.norm(dim=1): over a 3-long strided dim it took ~9 of the ~58 ms a default
    # augmented batch took (README, Robustness, items 10–11)
    dist = diff.pow(2).sum(1, keepdim=True).sqrt_()
    far = dist.amax((2, 3), keepdim=True)
    core = ((dist >= 0.95 * far) & (w_bg == 0)).to(x.dtype)
    n_core = core.sum((2, 3), keepdim=True)  # [K, 1, 1, 1]
    shape = (x * core).sum((2, 3), keepdim=True) / n_core.clamp_min(1)
    d = shape - bg
    c = (diff * d).sum(1, keepdim=True) / d.pow(2).sum(1, keepdim=True).clamp_min(1e-6)
    hard = torch.where(c >= 0.5, shape, bg)
    u[idx] = torch.where(n_core >= 4, hard, x)


def _resample_(u: torch.Tensor, prob: float, p: _Params) -> None:
    """In place, with probability `prob` per row: down to a side in [S/2, S), then back up."""
    s = u.shape[-1]
    for i in torch.nonzero(p.resample_p < prob).flatten().tolist():
        side = s // 2 + int(p.resample_u[i] * (s - s // 2))
        small = F.interpolate(u[i : i + 1], size=side, mode="bilinear", antialias=True)
        u[i] = F.interpolate(small, size=s, mode="bilinear", align_corners=False)[0]


def _blur_(u: torch.Tensor, sigma: torch.Tensor) -> None:
    """In place: separable Gaussian blur, one sigma per row (7 taps, edges replicated).

    A grouped convolution with one kernel per (row, channel): each row is blurred by its own
    kernel alone, so its result does not depend on the other rows."""
    r, (b, c, s, _) = 3, u.shape
    taps = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(taps[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B·3, 7]
    rows = torch.nonzero(sigma >= 0.3).flatten()  # below 0.3 px the kernel is ~a delta: skip
    if rows.numel() == 0:  # (a grouped conv over zero channels is an error, not a no-op)
        return
    k, m = k.view(b, c, -1)[rows].reshape(-1, 2 * r + 1), rows.numel() * c
    x = u[rows].view(1, m, s, s)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(m, 1, -1, 1), groups=m)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(m, 1, 1, -1), groups=m)
    u[rows] = x.view(-1, c, s, s)


def _noise_(u: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor) -> None:
    """In place: additive Gaussian noise, one std per row, each row's from its own seed."""
    for i in range(u.shape[0]):
        g = torch.Generator().manual_seed(int(seeds[i]))
        u[i].add_(torch.randn(u.shape[1:], generator=g).mul_(float(std[i])))


def _jpeg_(u: torch.Tensor, prob: float, p: _Params) -> None:
    """In place, with probability `prob` per row: a JPEG round trip at quality 20..90."""
    for i in torch.nonzero(p.jpeg_p < prob).flatten().tolist():
        arr = (u[i].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=20 + int(p.jpeg_u[i] * 71))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32)
        u[i] = torch.from_numpy(dec).permute(2, 0, 1) / 255
