"""Where does a trained VL-MoE lose small shapes? Linear shape probes layer by layer.

    python bench/layer_probe.py --checkpoint checkpoints/default [--size 0.07 0.12]

For a `vlmoe train` checkpoint: the vision tokens after the conv stem and after each block,
max- and mean-pooled over the patches, and the text token the answer head reads (the first,
for the question "what shape is in the image?"), each fed to a linear probe for circle /
rectangle / triangle. The probe is fitted (Adam, 500 steps, features standardised) on the first
3,000 easy-VQA *training* scenes drawn by vlmoe's renderer with the shape `--size` of the side
at the model's image size, and scored on the first 1,000 *test* scenes drawn the same way. The model is frozen: the probe
says what its features hold, not what more training would teach.

If the stem's probe is already low, the shapes are lost in the stem (what it learned), not
between the stem and the answer. Seeded: the same numbers on a given machine and threads.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from vlmoe.checkpoint import CheckpointError, load_checkpoint
from vlmoe.data import load_easyvqa
from vlmoe.data.render import SHAPES, RenderSpec, easyvqa_scenes
from vlmoe.models.vlmo import VLMoE
from vlmoe.robustness import draw_images

QUESTION = "what shape is in the image?"


def drawn(
    split: str, n: int, size: tuple[float, float], seed: int, side: int
) -> tuple[torch.Tensor, ...]:
    """(images [n, 3, side, side] in [-1, 1], shape labels [n]) of a split's first n scenes."""
    scenes = easyvqa_scenes(load_easyvqa(split, side))[:n]
    x = draw_images(scenes, RenderSpec(shape_size=size), seed, side).float() / 127.5 - 1
    return x, torch.tensor([SHAPES.index(s) for _, s in scenes])


@torch.no_grad()
def layer_features(model: VLMoE, tokenizer, images: torch.Tensor) -> dict:
    """{layer name: features [N, F]}: pooled vision tokens per layer, the answer's text token.

    The model's own `encode` runs; hooks keep the stem's and each block's vision tokens."""
    ids, mask = tokenizer.encode_batch([QUESTION] * len(images), model.cfg.max_text_len)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, first: bool):  # a block returns (vision, text, aux, records)
        return lambda _m, _inp, out: seen.__setitem__(name, out[0] if first else out)

    hooks = [model.vision.register_forward_hook(keep("stem", False))]
    hooks += [b.register_forward_hook(keep(f"block {j}", True)) for j, b in enumerate(model.blocks)]
    out: dict[str, list[torch.Tensor]] = {}
    try:
        for i in range(0, len(images), 250):
            _, x_t, _, _ = model.encode(images[i : i + 250], ids[i : i + 250], mask[i : i + 250])
            for name, t in [*seen.items(), ("answer token", x_t[:, :1])]:
                out.setdefault(name, []).append(torch.cat([t.amax(1), t.mean(1)], 1))
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(v) for name, v in out.items()}


def probe(a: torch.Tensor, y: torch.Tensor, b: torch.Tensor, y_b: torch.Tensor) -> tuple:
    """Fit a linear probe on (a [N, F], y) and return (train accuracy, test accuracy on b)."""
    mu, sd = a.mean(0), a.std(0) + 1e-5
    a, b = (a - mu) / sd, (b - mu) / sd
    w = torch.zeros(a.shape[1], len(SHAPES), requires_grad=True)
    bias = torch.zeros(len(SHAPES), requires_grad=True)
    opt = torch.optim.Adam([w, bias], 0.01)
    for _ in range(500):
        loss = F.cross_entropy(a @ w + bias, y) + 1e-3 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = [
            float(((t @ w + bias).argmax(1) == lab).float().mean()) for t, lab in ((a, y), (b, y_b))
        ]
    return acc[0], acc[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--size", type=float, nargs=2, default=(0.07, 0.12), metavar=("LO", "HI"))
    ap.add_argument("--train-scenes", type=int, default=3000, help="probe-fitting scenes")
    ap.add_argument("--test-scenes", type=int, default=1000, help="probe-scoring scenes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        ck = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"vlmoe: error: {e}", file=sys.stderr)
        return 1
    if not isinstance(ck.model, VLMoE):
        print(f"vlmoe: error: {args.checkpoint}: expected a VL-MoE checkpoint (`vlmoe train`),"
              f" got {type(ck.model).__name__}", file=sys.stderr)  # fmt: skip
        return 1
    model = ck.model.eval()
    size = (args.size[0], args.size[1])
    side = model.cfg.image_size
    x_tr, y_tr = drawn("train", args.train_scenes, size, 1, side)
    x_te, y_te = drawn("test", args.test_scenes, size, 0, side)
    f_tr = layer_features(model, ck.tokenizer, x_tr)
    f_te = layer_features(model, ck.tokenizer, x_te)
    print(f"{args.checkpoint}: linear shape probes, shapes {size[0]:g}–{size[1]:g} of the side")
    print("| features | probe train | probe test |\n|---|---:|---:|")
    for name in f_tr:
        tr, te = probe(f_tr[name], y_tr, f_te[name], y_te)
        print(f"| {name} | {tr:.1%} | {te:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
