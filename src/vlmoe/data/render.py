"""vlmoe's own easy-VQA-like renderer, and the (colour, shape) each easy-VQA image shows.

easy-VQA (Zhou 2020, `gen_data/images.py` in the data set's repository) draws one filled shape
of 8 colours × 3 kinds on a light background: each background channel uniform in 230..255,
shape extent 1/8..1/2 of the side, drawn at 2× and downsampled bilinearly (its anti-aliasing),
triangles equilateral with a horizontal base and the apex up. `RenderSpec()` reproduces that;
every field can be moved away from it to measure how an answer holds under a controlled shift
(`vlmoe.robustness`). A user's own picture of a red circle will not come from that generator.

Randomness is a `numpy.random.Generator` per image, so a rendering is a function of
(colour, shape, spec, seed) only.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlmoe.data.dataset import VQASplit
from vlmoe.data.errors import DataError

# The 8 colours of easy-VQA's `color.py`, exact RGB (its images hold these values inside shapes).
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
SHAPES = ("rectangle", "circle", "triangle")


@dataclass(frozen=True)
class RenderSpec:
    """How to draw one image. Defaults = easy-VQA's generator at 64 px.

    Ranges are (low, high), sampled uniformly per image.
    """

    image_size: int = 64  #: side of the drawn image in pixels
    background: tuple[int, int] = (230, 255)  #: each background channel in this 0..255 range
    shape_size: tuple[float, float] = (0.125, 0.5)  #: shape extent as a fraction of the side
    antialias: bool = True  #: draw at 2× and downsample bilinearly (easy-VQA); False: hard edges
    #: triangle rotation in degrees (0 = easy-VQA's apex up; 60 = apex down)
    triangle_angle: tuple[float, float] = (0.0, 0.0)
    brightness: tuple[float, float] = (1.0, 1.0)  #: every pixel multiplied by this factor
    blur: float = 0.0  #: Gaussian blur radius in pixels of the drawn image (0 = none)
    noise: float = 0.0  #: std of additive Gaussian noise per channel, 0..255 units (0 = none)
    jpeg_quality: int = 0  #: JPEG round trip at this quality 1..95 (0 = none, lossless)


def render(color: str, shape: str, spec: RenderSpec, rng: np.random.Generator) -> Image.Image:
    """Draw one image: a `color` `shape` on a light background, RGB, spec.image_size².

    The shape lies wholly inside the image. `color` is one of `COLORS`, `shape` one of
    `SHAPES` (KeyError / ValueError otherwise).
    """
    fill = COLORS[color]
    scale = 2 if spec.antialias else 1
    side = spec.image_size * scale
    bg = tuple(int(v) for v in rng.integers(spec.background[0], spec.background[1] + 1, size=3))
    im = Image.new("RGB", (side, side), bg)
    ImageDraw.Draw(im).polygon(_outline(shape, spec, rng, side), fill=fill)
    if scale > 1:
        im = im.resize((spec.image_size,) * 2, resample=Image.Resampling.BILINEAR)
    return _degrade(im, spec, rng)


def _outline(
    shape: str, spec: RenderSpec, rng: np.random.Generator, side: int
) -> list[tuple[float, float]]:
    """The shape's polygon in pixel coordinates, placed uniformly where it stays whole."""
    lo, hi = spec.shape_size
    if shape == "rectangle":
        w, h = rng.uniform(lo, hi, size=2) * side
        pts = np.array([(0, 0), (w, 0), (w, h), (0, h)], dtype=np.float64)
    elif shape == "circle":
        d = rng.uniform(lo, hi) * side
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * d / 2
    elif shape == "triangle":
        s = rng.uniform(lo, hi) * side
        a = math.radians(rng.uniform(*spec.triangle_angle))
        # easy-VQA: (0, 0), (s, 0), (s/2, −s·√3/2): base at the bottom, apex up (y grows down)
        base = np.array([(0, 0), (s, 0), (s / 2, -s * math.sqrt(3) / 2)])
        base -= base.mean(0)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = base @ rot.T
    else:
        raise ValueError(f"shape: expected one of {', '.join(SHAPES)}, got {shape!r}")
    pts = pts - pts.min(0)
    room = np.maximum(side - 1 - pts.max(0), 0)
    pts = pts + rng.uniform(0, 1, size=2) * room
    return [(float(x), float(y)) for x, y in pts]


def _degrade(im: Image.Image, spec: RenderSpec, rng: np.random.Generator) -> Image.Image:
    """Brightness, blur, noise and JPEG, in the order a camera and an encoder apply them."""
    b = rng.uniform(*spec.brightness)
    if b != 1.0:
        im = Image.fromarray(
            np.clip(np.asarray(im, np.float32) * b, 0, 255).round().astype(np.uint8)
        )
    if spec.blur > 0:
        im = im.filter(ImageFilter.GaussianBlur(spec.blur))
    if spec.noise > 0:
        arr = np.asarray(im, np.float32) + rng.normal(0, spec.noise, size=(*im.size[::-1], 3))
        im = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    if spec.jpeg_quality:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(spec.jpeg_quality))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im


def render_many(
    scenes: Sequence[tuple[str, str]], spec: RenderSpec, seed: int
) -> list[Image.Image]:
    """One image per (colour, shape); image i uses the generator seeded by (seed, i), so a
    scene's picture does not depend on which other scenes are drawn with it."""
    return [render(c, s, spec, np.random.default_rng([seed, i])) for i, (c, s) in enumerate(scenes)]


# ---------------------------------------------------------------- easy-VQA scenes
_NEGATED = (" not ", " no ")


def says_present(question: str, answer: str) -> bool:
    """Whether an easy-VQA yes/no question with this answer says that the colour or shape it
    names is in the picture ("is there a red shape?" yes, "is there not a circle?" no)."""
    negated = any(n in f" {question.lower()} " for n in _NEGATED)
    return (answer == "yes") != negated


def _constrain(question: str, answer: str, colors: set[str], shapes: set[str]) -> None:
    """Narrow an image's candidate colours and shapes by one of its easy-VQA questions.

    easy-VQA's templates: "what color is the {shape}?" → colour; "what is the {colour}
    shape?" → shape; "is there (not) a {colour|shape} …?", "is no … present?" → yes/no.
    """
    words = question.lower().rstrip("?").split()
    named_c = [w for w in words if w in COLORS]
    named_s = [w for w in words if w in SHAPES]
    if answer in COLORS or answer in SHAPES:
        # the answer, and any colour or shape the question names, belong to the image
        colors &= {answer} if answer in COLORS else set(named_c) or colors
        shapes &= {answer} if answer in SHAPES else set(named_s) or shapes
        return
    if answer not in ("yes", "no"):
        return
    present = says_present(question, answer)
    for named, cands in ((named_c, colors), (named_s, shapes)):
        for w in named:
            if present:
                cands &= {w}
            else:
                cands.discard(w)


def _pixel_scene(image_CHW: np.ndarray) -> tuple[str, float]:
    """(the palette colour most pixels hold exactly, the shape's area / bounding-box area)."""
    hwc = image_CHW.transpose(1, 2, 0).astype(np.int32)
    counts = {c: int((hwc == rgb).all(-1).sum()) for c, rgb in COLORS.items()}
    color = max(counts, key=lambda c: counts[c])
    border = np.concatenate([hwc[0], hwc[-1], hwc[:, 0], hwc[:, -1]])
    bg = np.median(border, axis=0)
    fill = np.array(COLORS[color])
    mask = ((hwc - fill) ** 2).sum(-1) < ((hwc - bg) ** 2).sum(-1)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return color, 0.0
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return color, float(mask.sum() / box)


def _shape_of_fill(fill_ratio: float) -> str:
    # a rectangle fills its bounding box, a circle π/4 of it, a triangle half; on the test
    # images whose questions fix the shape: rectangles 0.96–1, circles 0.75–0.91, triangles
    # 0.50–0.66 (small shapes fill more: the anti-aliased rim counts)
    return "rectangle" if fill_ratio > 0.94 else "circle" if fill_ratio > 0.70 else "triangle"


def easyvqa_scenes(split: VQASplit) -> list[tuple[str, str]]:
    """The (colour, shape) of each image row of an easy-VQA split.

    Read from the image's questions and answers; where those leave it open (about 8% of
    test images for colour, 5% for shape), the image's pixels decide among what the questions
    allow, so every question's answer stays true of the recovered scene.
    Raises DataError if the questions contradict each other or the split is not easy-VQA.
    """
    n = split.images.shape[0]
    colors = [set(COLORS) for _ in range(n)]
    shapes = [set(SHAPES) for _ in range(n)]
    for q, a, row in zip(split.questions, split.answers, split.image_index.tolist(), strict=True):
        _constrain(q, a, colors[row], shapes[row])
    out = []
    for row in range(n):
        c, s = colors[row], shapes[row]
        if len(c) != 1 or len(s) != 1:
            pix_c, ratio = _pixel_scene(split.images[row].numpy())
            c = c & {pix_c} or c
            s = s & {_shape_of_fill(ratio)} or s
        if not c or not s:
            raise DataError(
                f"{split.source}: image {split.image_names[row]}: its questions contradict "
                "each other (no easy-VQA colour and shape fits them all)"
            )
        out.append((min(c), min(s)))  # min: a deterministic pick when several fit
    return out
