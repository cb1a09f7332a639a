"""vlmoe's easy-VQA-like renderer and the recovery of each easy-VQA test image's scene."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from vlmoe.data import load_easyvqa
from vlmoe.data.render import COLORS, SHAPES, RenderSpec, easyvqa_scenes, render, render_many


def _mask(img) -> np.ndarray:
    """Shape pixels: smallest channel under 200 (background channels are ≥ 230, and no
    easy-VQA colour has its smallest channel above 128)."""
    return np.asarray(img).min(-1) < 200


@pytest.mark.parametrize("color", list(COLORS))
def test_the_shape_is_drawn_in_the_exact_easyvqa_colour(color):
    img = render(color, "rectangle", RenderSpec(), np.random.default_rng(0))
    arr = np.asarray(img).reshape(-1, 3)
    # the interior holds the exact RGB; the background never does
    inside = arr[_mask(img).reshape(-1)]
    values, counts = np.unique(inside, axis=0, return_counts=True)
    assert tuple(values[counts.argmax()]) == COLORS[color]
    assert (arr.min(-1) >= 200).mean() > 0.5  # mostly background


@pytest.mark.parametrize(
    ("shape", "ratio"), [("rectangle", 1.0), ("circle", math.pi / 4), ("triangle", 0.5)]
)
def test_shape_area_over_bounding_box_names_the_shape(shape, ratio):
    spec = RenderSpec(shape_size=(0.4, 0.5), antialias=False)
    for img in render_many([("blue", shape)] * 5, spec, seed=1):
        m = _mask(img)
        ys, xs = np.nonzero(m)
        box = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
        assert m.sum() / box == pytest.approx(ratio, abs=0.06)


def test_triangle_orientation():
    def top_heavy(angle: float) -> bool:
        spec = RenderSpec(shape_size=(0.5, 0.5), triangle_angle=(angle, angle))
        m = _mask(render("red", "triangle", spec, np.random.default_rng(3)))
        rows = m.sum(1)[m.any(1)]
        return rows[: len(rows) // 3].sum() > rows[-len(rows) // 3 :].sum()

    assert not top_heavy(0.0)  # easy-VQA: apex up, base at the bottom
    assert top_heavy(60.0)  # apex down


def test_spec_fields_take_effect_and_rendering_is_seeded():
    a = render_many([("red", "circle"), ("teal", "triangle")], RenderSpec(), seed=5)
    b = render_many([("red", "circle"), ("teal", "triangle")], RenderSpec(), seed=5)
    assert [np.asarray(x).tobytes() for x in a] == [np.asarray(x).tobytes() for x in b]
    assert render("red", "circle", RenderSpec(image_size=200), np.random.default_rng(0)).size == (
        200,
        200,
    )
    hard = render("red", "circle", RenderSpec(antialias=False), np.random.default_rng(0))
    # no anti-aliasing: every pixel is background-ish or exactly the colour
    arr = np.asarray(hard).reshape(-1, 3)
    assert ((arr.min(-1) >= 230) | (arr == COLORS["red"]).all(-1)).all()
    dark = render("red", "circle", RenderSpec(background=(160, 170)), np.random.default_rng(0))
    assert np.asarray(dark)[0, 0].max() <= 170
    noisy = render("red", "circle", RenderSpec(noise=16, jpeg_quality=20), np.random.default_rng(0))
    assert len(np.unique(np.asarray(noisy).reshape(-1, 3), axis=0)) > 100
    with pytest.raises(ValueError, match="shape"):
        render("red", "star", RenderSpec(), np.random.default_rng(0))


def _answer(question: str, scene: tuple[str, str]) -> str:
    """What easy-VQA's question templates answer about a (colour, shape) scene."""
    color, shape = scene
    words = question.rstrip("?").split()
    if question.startswith("what") and "color" in words:
        return color
    if question.startswith("what"):
        return shape
    named = next(w for w in words if w in COLORS or w in SHAPES)
    present = named in (color, shape)
    negated = " not " in question or question.startswith("is no ")
    return "yes" if present != negated else "no"


def test_recovered_scenes_answer_every_test_question_as_easyvqa_does():
    test = load_easyvqa("test")
    scenes = easyvqa_scenes(test)
    assert len(scenes) == 1000 and set(scenes) == {(c, s) for c in COLORS for s in SHAPES}
    rows = test.image_index.tolist()
    wrong = [
        q
        for q, a, r in zip(test.questions, test.answers, rows, strict=True)
        if _answer(q, scenes[r]) != a
    ]
    assert wrong == []
    # and the colour is the one the original image's pixels hold
    for r in range(0, 1000, 50):
        arr = test.images[r].permute(1, 2, 0).numpy().reshape(-1, 3)
        assert (arr == COLORS[scenes[r][0]]).all(-1).sum() > 0


def test_rendered_scenes_keep_their_spec_immutable():
    spec = RenderSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.image_size = 32  # type: ignore[misc]
