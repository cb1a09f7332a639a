"""Train-step throughput: the `default` VL-MoE model against its dense twin (equal active params).

    python bench/train_step.py [--preset default] [--repeats 7] [--batch-size 128] [--threads N]

Both models see the same real easy-VQA batch (images, questions, labels) and run the step
`vlmoe train` runs — `vlmoe.train.train_step`: forward, loss (+ aux losses), backward, gradient
clipping, AdamW with the trainer's parameter groups, lr schedule — with the trainer's allocator
setting (`keep_freed_memory`). Runs alternate between the
two models so that machine noise hits both alike; the table reports the median step time over
`--repeats` timed steps (after warm-up), samples/s, and the MoE/dense ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlmoe.config import dense, get_preset
from vlmoe.models import build_model
from vlmoe.moe import keep_freed_memory
from vlmoe.train import VQATask, train_step
from vlmoe.train.optim import build_optimizer, no_decay_names
from vlmoe.train.parallel import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    keep_freed_memory()  # as vlmoe train does
    base = get_preset(args.preset)
    bs = args.batch_size or base.train.batch_size
    base.train.batch_size = bs
    task = VQATask(base)
    batch = next(task.train_batches(bs, epoch=0, start=0, rank=0, world_size=1))
    engine = Engine.from_env("cpu")
    t = base.train

    variants = {"moe": task.cfg, "dense twin": dense(task.cfg)}
    models, opts = {}, {}
    for name, cfg in variants.items():
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        models[name] = model
        schedule = (t.warmup_steps, 10_000, t.min_lr_ratio)
        opts[name] = build_optimizer(model, no_decay_names(model), t.lr, t.weight_decay, schedule)

    def step(name: str) -> float:
        opt, sched = opts[name]
        start = time.perf_counter()
        train_step(models[name], batch, opt, engine, t.grad_clip, sched)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {n: [] for n in variants}
    for i in range(args.warmup + args.repeats):
        for n in variants:  # alternate so that load changes hit both variants alike
            dt = step(n)
            if i >= args.warmup:
                times[n].append(dt)

    print(
        f"preset={args.preset} batch={bs} threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print(
        f"{'model':<12} {'total params':>13} {'active params':>14} {'step ms':>9} {'samples/s':>10} {'ratio':>7}"
    )
    ref = statistics.median(times["dense twin"])
    for n, ts in times.items():
        med = statistics.median(ts)
        tot, act = models[n].param_counts()
        print(
            f"{n:<12} {tot:>13,} {act:>14,} {med * 1e3:>9.1f} {bs / med:>10.1f} {med / ref:>6.2f}x"
        )


if __name__ == "__main__":
    main()
