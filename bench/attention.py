"""Attention on the CPU: torch's fused kernel against vlmoe's batched-matmul path.

    python bench/attention.py [--repeats 31] [--threads 2] [--batch-size 128]

The VL-MoE block's attention (`vlmoe.models.blocks.Attention`) runs on the CPU as
`attend_bmm` (baddbmm, softmax, bmm) instead of `F.scaled_dot_product_attention`. This
times both on the same q, k, v and key mask — forward + backward as in training, and forward
alone without autograd as in evaluation — for the default preset's shape (4 heads of 32,
16 patches + 11 words) and a longer one (128-px images: 64 patches + 11 words). The two ways
alternate, so machine noise hits both alike; the table gives median milliseconds per call
and the fused/bmm ratio (> 1: the bmm path is faster), and the largest output difference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmoe.models.blocks import attend_bmm


def inputs(b: int, h: int, s: int, dh: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [b, h, s, dh] leaves with grads, a key mask [b, s] (the last 7 keys of some
    rows padding, as short questions are), and an output gradient."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, dh, generator=g).requires_grad_() for _ in range(3))
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[:, s - 7 :] = torch.rand(b, 7, generator=g) > 0.5
    return q, k, v, keep, torch.randn(b, h, s, dh, generator=g)


def fused(q, k, v, keep):  # type: ignore[no-untyped-def]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def bench_shape(b: int, s: int, repeats: int) -> list[tuple[str, float, float, float]]:
    """Rows (mode, fused ms, bmm ms, fused/bmm) for one shape."""
    q, k, v, keep, grad = inputs(b, 4, s, 32)
    ways = {"fused": fused, "bmm": attend_bmm}

    def train(f):  # type: ignore[no-untyped-def]
        return lambda: f(q, k, v, keep).backward(grad)

    def infer(f):  # type: ignore[no-untyped-def]
        def run() -> None:
            with torch.no_grad():
                f(q, k, v, keep)

        return run

    rows = []
    for mode, wrap in (("forward + backward", train), ("forward, no grad", infer)):
        times: dict[str, list[float]] = {name: [] for name in ways}
        for i in range(repeats + 3):  # 3 warm-up rounds
            for name, f in ways.items():
                ms = timed(wrap(f))
                if i >= 3:
                    times[name].append(ms)
        a, c = statistics.median(times["fused"]), statistics.median(times["bmm"])
        rows.append((mode, a, c, a / c))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"threads {args.threads}, batch {args.batch_size}, 4 heads of 32, median of {args.repeats}"
    )
    print(
        f"{'tokens':>6}  {'mode':<20} {'fused ms':>9} {'bmm ms':>8} {'ratio':>6} {'max |diff|':>10}"
    )
    for s in (27, 75):
        q, k, v, keep, _ = inputs(args.batch_size, 4, s, 32)
        with torch.no_grad():
            diff = (fused(q, k, v, keep) - attend_bmm(q, k, v, keep)).abs().max().item()
        for mode, a, c, r in bench_shape(args.batch_size, s, args.repeats):
            print(f"{s:>6}  {mode:<20} {a:>9.2f} {c:>8.2f} {r:>5.2f}× {diff:>10.1e}")


if __name__ == "__main__":
    main()
