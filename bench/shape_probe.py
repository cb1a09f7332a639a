"""Can the default's conv stem tell small shapes apart, and from which training pictures?

    python bench/shape_probe.py [--train shrunk|point-sampled|augmented|drawn] [--steps 1000]

A probe, not the VQA model: the `default` preset's conv stem (per-channel norm, one
full-resolution layer), its patch tokens max-pooled, an MLP to circle / rectangle / triangle;
AdamW at a fixed lr, batch 128. Tested on easy-VQA's first 1,000 test scenes *drawn* by vlmoe's
renderer with the shape 0.07–0.12 of the side (the robustness table's "small shapes, moderate").
Trained on either

- ``shrunk``: easy-VQA training pictures with every shape shrunk and moved by the training
  augmentation's `small` option (`vlmoe.data.augment`: 0.06–0.16 of the side, supersampled, so
  edges come out soft as a drawing program's do) — what the VQA model can be shown;
- ``point-sampled``: the same pictures shrunk to 0.07–0.12 of the side by the augmentation's
  `zoom` (one bilinear sample per pixel: jagged edges);
- ``augmented``: easy-VQA training pictures through the `default` preset's augmentation
  (`DEFAULT_AUGMENT`, from step 0) — what the VQA model is shown;
- ``drawn``: shapes drawn at that size by the renderer — the test's own generator, which
  training never uses (a ceiling, not a recipe).

Prints test accuracy every 250 steps. Seeded: the same numbers on a given machine and threads.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmoe.config import DEFAULT_AUGMENT
from vlmoe.data import augment as A
from vlmoe.data import load_easyvqa
from vlmoe.data.render import COLORS, RenderSpec, easyvqa_scenes
from vlmoe.models.vision import ConvStem
from vlmoe.robustness import draw_images

SHAPES = ["circle", "rectangle", "triangle"]
SMALL = RenderSpec(shape_size=(0.07, 0.12))
ZOOM = 10.0  # the zoom range ×1/11–×11: room to bring any easy-VQA shape to the target size


def drawn(scenes: list[tuple[str, str]], seed: int) -> torch.Tensor:
    """[N, 3, 64, 64] in [-1, 1]: the scenes drawn small by the renderer."""
    return draw_images(scenes, SMALL, seed, 64).float() / 127.5 - 1


def shrunk(images: torch.Tensor, step: int) -> torch.Tensor:
    """uint8 pictures [N, 3, 64, 64] → [-1, 1], every shape shrunk by the `small` option."""
    cfg = A.AugmentConfig(small=1.0, zoom=0.01)  # zoom's draw is replaced in every row
    return A.augment_images(images.float() / 127.5 - 1, cfg, A.augment_generator(1, step))


def point_sampled(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 pictures [N, 3, 64, 64] → [-1, 1] with each shape's longer side drawn uniform in
    0.07–0.12 of the side and moved, through the augmentation's zoom."""
    u = images.float() / 255
    _, _, _, w, h = A._shape_box(A._background_weight(u))
    target = 0.07 + 0.05 * torch.rand(len(u), generator=gen)
    p = A._draw(len(u), gen)
    # _zoom's scale is exp((2·zoom_u − 1)·log(1 + ZOOM)): solve it for target / current size
    p.zoom_u = (torch.log(target * 64 / torch.maximum(w, h)) / math.log1p(ZOOM) + 1) / 2
    return A._zoom(u, ZOOM, 0.0, p).mul(2).sub(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    kinds = ("shrunk", "point-sampled", "augmented", "drawn")
    ap.add_argument("--train", choices=kinds, default="shrunk")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_split = load_easyvqa("train", 64)
    labels = torch.tensor([SHAPES.index(s) for _, s in easyvqa_scenes(train_split)])
    test_scenes = easyvqa_scenes(load_easyvqa("test", 64))[:1000]
    x_test = drawn(test_scenes, 0)
    y_test = torch.tensor([SHAPES.index(s) for _, s in test_scenes])

    torch.manual_seed(0)
    stem = ConvStem(64, 16, 16, 128, norm="channel", full_res=8)
    head = nn.Sequential(nn.LayerNorm(128), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 3))
    opt = torch.optim.AdamW([*stem.parameters(), *head.parameters()], args.lr)
    gen, rng, start = torch.Generator().manual_seed(0), random.Random(0), time.time()
    print(f"train={args.train} lr={args.lr:g} batch=128; test: 1,000 scenes drawn at 0.07–0.12")
    for step in range(1, args.steps + 1):
        if args.train == "drawn":
            scenes = [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(128)]
            x, y = drawn(scenes, 1000 + step), torch.tensor([SHAPES.index(s) for _, s in scenes])
        else:
            idx = torch.randint(0, len(labels), (128,), generator=gen)
            x, y = train_split.images[idx], labels[idx]
            if args.train == "shrunk":
                x = shrunk(x, step)
            elif args.train == "point-sampled":
                x = point_sampled(x, gen)
            else:
                x = A.augment_images(
                    x.float() / 127.5 - 1, DEFAULT_AUGMENT, A.augment_generator(0, step)
                )
        loss = F.cross_entropy(head(stem(x).amax(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            with torch.no_grad():
                acc = (head(stem(x_test).amax(1)).argmax(1) == y_test).float().mean().item()
            print(f"step {step:>5}  test accuracy {acc:.1%}  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
