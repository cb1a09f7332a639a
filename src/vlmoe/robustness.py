"""Accuracy under controlled shifts: easy-VQA's test questions on re-rendered images.

Every easy-VQA test image shows one (colour, shape) (`easyvqa_scenes`). vlmoe's renderer
draws that scene again — once as easy-VQA's generator would (the reference), then with one
property moved at a time (background shade, shape size, anti-aliasing, triangle orientation,
image size, brightness, blur, noise, JPEG) at up to three severities, and once with several
moved together (another program's drawing). The test questions and answers stay as they are,
so each row is the test set's accuracy on images the model has never seen the like of, in the
spirit of ImageNet-C (Hendrycks & Dietterich 2019).

    ck = load_checkpoint("checkpoints/default")
    rows = run_shifts(vqa_evaluator(ck), ck.config.model.image_size)
    print(markdown_table(rows))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmoe.checkpoint import Checkpoint
from vlmoe.data import VQASplit, load_easyvqa
from vlmoe.data.images import fit_image
from vlmoe.data.render import RenderSpec, easyvqa_scenes, render_many
from vlmoe.evaluate import evaluate

SEVERITIES = ("none", "mild", "moderate", "severe")


@dataclass(frozen=True)
class Shift:
    """One row of the table: `spec` = how the test scenes are drawn (None: the original
    easy-VQA test images); `setting` says in words what moved."""

    name: str
    severity: str
    setting: str
    spec: RenderSpec | None


def _row(name: str, severity: str, setting: str, **changes: Any) -> Shift:
    return Shift(name, severity, setting, dataclasses.replace(RenderSpec(), **changes))


def default_shifts() -> list[Shift]:
    """The table's rows. easy-VQA's own ranges: background channels 230–255, shape 1/8–1/2
    of the side, anti-aliased, triangles apex up, 64 px, lossless."""
    m, mo, s = "mild", "moderate", "severe"
    return [
        Shift("easy-VQA test images", "none", "the data set's own 1,000 test images", None),
        _row("re-rendered", "none", "vlmoe's renderer, easy-VQA's settings"),
        _row("background shade", m, "channels 215–255", background=(215, 255)),
        _row("background shade", mo, "channels 190–255", background=(190, 255)),
        _row("background shade", s, "channels 160–255", background=(160, 255)),
        _row("small shapes", m, "0.10–0.20 of the side", shape_size=(0.10, 0.20)),
        _row("small shapes", mo, "0.07–0.12 of the side", shape_size=(0.07, 0.12)),
        _row("small shapes", s, "0.05–0.08 of the side", shape_size=(0.05, 0.08)),
        _row("large shapes", m, "0.40–0.60 of the side", shape_size=(0.40, 0.60)),
        _row("large shapes", mo, "0.50–0.75 of the side", shape_size=(0.50, 0.75)),
        _row("large shapes", s, "0.70–0.95 of the side", shape_size=(0.70, 0.95)),
        _row("no anti-aliasing", mo, "hard edges", antialias=False),
        _row("triangle orientation", m, "rotated ±15°", triangle_angle=(-15.0, 15.0)),
        _row("triangle orientation", mo, "apex down", triangle_angle=(60.0, 60.0)),
        _row("triangle orientation", s, "any rotation", triangle_angle=(0.0, 120.0)),
        _row("image size", m, "drawn at 128 px", image_size=128),
        _row("image size", m, "drawn at 200 px", image_size=200),
        _row("image size", mo, "drawn at 32 px", image_size=32),
        _row("brightness", m, "×0.9–1.1", brightness=(0.9, 1.1)),
        _row("brightness", mo, "×0.8–1.2", brightness=(0.8, 1.2)),
        _row("blur", m, "Gaussian radius 0.5 px", blur=0.5),
        _row("blur", mo, "Gaussian radius 1 px", blur=1.0),
        _row("blur", s, "Gaussian radius 1.5 px", blur=1.5),
        _row("noise", m, "σ = 4 / 255", noise=4.0),
        _row("noise", mo, "σ = 8 / 255", noise=8.0),
        _row("noise", s, "σ = 16 / 255", noise=16.0),
        _row("JPEG", m, "quality 75", jpeg_quality=75),
        _row("JPEG", mo, "quality 40", jpeg_quality=40),
        _row("JPEG", s, "quality 15", jpeg_quality=15),
        _row(
            "another program",
            mo,
            "background 200–255, size 0.10–0.60, hard edges, apex down",
            background=(200, 255),
            shape_size=(0.10, 0.60),
            antialias=False,
            triangle_angle=(60.0, 60.0),
        ),
    ]


def draw_images(
    scenes: list[tuple[str, str]], spec: RenderSpec, seed: int, size: int
) -> torch.Tensor:
    """uint8 [N, 3, size, size]: each (colour, shape) scene drawn by `spec` (`render_many`),
    then brought to `size` the way a user's file is (`fit_image`: bilinear resize)."""
    pics = render_many(scenes, spec, seed)
    images = torch.stack([torch.from_numpy(fit_image(p, size)).permute(2, 0, 1) for p in pics])
    return images.contiguous()


def rerender(
    split: VQASplit, scenes: list[tuple[str, str]], spec: RenderSpec, seed: int
) -> VQASplit:
    """`split` with every image drawn again from its scene by `spec` (`draw_images` at the
    split's image size)."""
    images = draw_images(scenes, spec, seed, split.image_size)
    # the memo holds token ids and labels only, which re-rendering leaves as they are
    return dataclasses.replace(split, images=images, _cache=split._cache)


#: (split, the (colour, shape) its images show) → {"accuracy": fraction, "per_kind": {kind:
#: fraction}, "n": examples}; a family's `robustness_evaluator(checkpoint)` returns one with
#: the image size its model reads
Evaluator = Callable[[VQASplit, list[tuple[str, str]]], dict[str, Any]]


def vqa_evaluator(ck: Checkpoint, batch_size: int = 512) -> Evaluator:
    """A VL-MoE checkpoint's test accuracy over the split's questions, per question kind."""

    def run(split: VQASplit, scenes: list[tuple[str, str]]) -> dict[str, Any]:
        res = evaluate(ck.model, split, ck.tokenizer, ck.answers, batch_size=batch_size)
        per_kind = {k: v["accuracy"] for k, v in res.per_kind.items()}
        return {"accuracy": res.accuracy, "per_kind": per_kind, "n": res.n}

    return run


def run_shifts(
    evaluator: Evaluator,
    image_size: int,
    shifts: list[Shift] | None = None,
    *,
    max_images: int = 0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One dict per shift: name, severity, setting, accuracy, per_kind {kind: accuracy}, n.

    evaluator: what a row measures (`vqa_evaluator`, or a family's); image_size: the side
    its model reads. max_images: only the questions about the first N test images (0 = all
    1,000). seed: seeds the renderer (image i of a row uses the generator seeded by (seed, i)).
    """
    test = load_easyvqa("test", image_size)
    if max_images:
        keep = torch.nonzero(test.image_index < max_images).flatten()
        test = test.subset(keep)
    scenes = easyvqa_scenes(test)
    rows = []
    for sh in shifts if shifts is not None else default_shifts():
        split = test if sh.spec is None else rerender(test, scenes, sh.spec, seed)
        res = evaluator(split, scenes)
        rows.append({"shift": sh.name, "severity": sh.severity, "setting": sh.setting, **res})
        if log:
            log(f"{sh.name} ({sh.severity}, {sh.setting}): {res['accuracy']:.2%}")
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """mean accuracy over the shifted rows (severity ≠ none), the worst row, and the lowest
    accuracy among mild and moderate rows."""
    shifted = [r for r in rows if r["severity"] != "none"]
    if not shifted:
        return {}
    worst = min(shifted, key=lambda r: r["accuracy"])
    upto_moderate = [r["accuracy"] for r in shifted if r["severity"] in ("mild", "moderate")]
    return {
        "mean_shifted": sum(r["accuracy"] for r in shifted) / len(shifted),
        "worst": {k: worst[k] for k in ("shift", "severity", "setting", "accuracy")},
        "min_mild_moderate": min(upto_moderate) if upto_moderate else None,
    }


def markdown_table(rows: list[dict[str, Any]], baseline: list[dict[str, Any]] | None = None) -> str:
    """The rows as a markdown table (accuracy overall and per question kind, in %); with
    `baseline` (rows of another checkpoint, same shifts), a column with its accuracy too."""
    head = "| shift | severity | setting | accuracy | yes/no | colour | shape |"
    sep = "|---|---|---|---:|---:|---:|---:|"
    if baseline is not None:
        head, sep = head + " baseline |", sep + "---:|"
    lines = [head, sep]
    for i, r in enumerate(rows):
        k = r["per_kind"]
        cells = [r["shift"], r["severity"], r["setting"], f"{r['accuracy']:.2%}"]
        cells += [f"{k[x]:.2%}" if x in k else "—" for x in ("yes/no", "color", "shape")]
        if baseline is not None:
            cells.append(f"{baseline[i]['accuracy']:.2%}")
        lines.append("| " + " | ".join(cells) + " |")
    s = summarize(rows)
    if s:
        w = s["worst"]
        lines.append(
            f"\nmean over shifted rows {s['mean_shifted']:.2%}; lowest mild/moderate "
            f"{s['min_mild_moderate']:.2%}; worst: {w['shift']} ({w['severity']}, "
            f"{w['setting']}) {w['accuracy']:.2%}"
        )
    return "\n".join(lines)
