"""Training-step cost with a picture's questions drawn one by one or in runs (`questions_per_image`).

    python bench/per_image.py [--preset default] [--values 1 2 4] [--repeats 15] [--epoch 2]

One step = what `vlmoe train` does per step: take the next training batch (indexing, flips and
the preset's augmentation, which is on from `--epoch` 2), then `vlmoe.train.train_step` (forward,
loss, backward, clipping, AdamW). With runs of k questions per picture a batch of 128 holds about
128 / k pictures, so the conv stem and the augmentation run on fewer images. Every value gets
its own model from the same initial weights and its own batch stream; steps alternate between
the values so that machine noise hits them alike. The table: median step time over `--repeats`
timed steps (after warm-up), pictures per batch, and the ratio to the first value.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlmoe.config import get_preset
from vlmoe.models import build_model
from vlmoe.moe import keep_freed_memory
from vlmoe.train import VQATask, train_step
from vlmoe.train.optim import build_optimizer, no_decay_names
from vlmoe.train.parallel import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--values", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--epoch", type=int, default=2, help="epoch the batches come from")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as vlmoe train does
    engine = Engine.from_env("cpu")

    runs = {}
    for k in args.values:
        cfg = get_preset(args.preset)
        cfg.train.questions_per_image = k
        task = VQATask(cfg)
        t = task.cfg.train
        torch.manual_seed(0)
        model = build_model(task.cfg.model).train()
        schedule = (t.warmup_steps, 10_000, t.min_lr_ratio)
        opt = build_optimizer(model, no_decay_names(model), t.lr, t.weight_decay, schedule)
        batches = task.train_batches(t.batch_size, args.epoch, 0, 0, 1)
        runs[k] = (model, opt, batches, t)

    def step(k: int) -> tuple[float, int]:
        model, (opt, sched), batches, t = runs[k]
        start = time.perf_counter()
        batch = next(batches)
        train_step(model, batch, opt, engine, t.grad_clip, sched)
        pictures = len(batch) if batch.first_row is None else int(batch.first_row.unique().numel())
        return time.perf_counter() - start, pictures

    times: dict[int, list[float]] = {k: [] for k in args.values}
    pictures: dict[int, list[int]] = {k: [] for k in args.values}
    for i in range(args.warmup + args.repeats):
        for k in args.values:  # alternate so that load changes hit every value alike
            dt, n = step(k)
            if i >= args.warmup:
                times[k].append(dt)
                pictures[k].append(n)

    first = args.values[0]
    print(
        f"preset={args.preset} epoch={args.epoch} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} (batch, augmentation and train_step)"
    )
    print(f"{'per image':>9} {'stem images':>12} {'step ms':>9} {'ratio':>7}")
    ref = statistics.median(times[first])
    for k in args.values:
        med = statistics.median(times[k])
        pics = statistics.median(pictures[k])
        print(f"{k:>9} {pics:>12.0f} {med * 1e3:>9.1f} {med / ref:>6.2f}x")


if __name__ == "__main__":
    main()
