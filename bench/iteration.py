"""Training iterations of the `default` preset: this checkout against another one.

    git worktree add /tmp/base <commit>
    python bench/iteration.py --baseline /tmp/base/src [--steps 40] [--rounds 3] [--epochs 0 2]

An iteration is what `vlmoe train` does per step: make the batch (augmented from epoch 2) and
run `vlmoe.train.train_step` with the trainer's optimizer and allocator setting, from a fresh
model at the start of the epoch. Each (code, epoch) pair runs in a process of its own — the
baseline's `vlmoe` package first on its path — and the two codes alternate, round after round,
so that machine noise hits both alike. The table gives the median ms per iteration over the
rounds and baseline/this (> 1: this checkout is faster).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"


def worker(src: str, epoch: int, steps: int) -> None:
    """In a subprocess: time `steps` iterations with the package under `src`; print ms."""
    sys.path.insert(0, src)
    import math
    import time

    import torch

    import vlmoe
    from vlmoe.config import default
    from vlmoe.moe import keep_freed_memory
    from vlmoe.train import VQATask
    from vlmoe.train.optim import build_optimizer, no_decay_names
    from vlmoe.train.parallel import Engine
    from vlmoe.train.step import train_step

    if not vlmoe.__file__.startswith(src):
        raise SystemExit(f"bench/iteration.py: imported vlmoe from {vlmoe.__file__}, not {src}")
    keep_freed_memory()
    torch.manual_seed(0)
    cfg = default()
    t = cfg.train
    task = VQATask(cfg)
    engine = Engine.from_env("cpu")
    model = engine.parallelize(task.build_model(cfg.stages()[0]))
    # the run's length, as the trainer computes it (Trainer.totals)
    total = math.ceil(t.epochs * task.batches_per_epoch(t.batch_size))
    schedule = (t.warmup_steps, total, t.min_lr_ratio)
    opt, sched = build_optimizer(
        model, no_decay_names(model), t.lr, t.weight_decay, schedule, t.lr_scales
    )
    batches = task.train_batches(t.batch_size, epoch, 0, 0, 1)
    for _ in range(3):  # warm-up
        train_step(model, next(batches), opt, engine, t.grad_clip, sched)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, next(batches), opt, engine, t.grad_clip, sched)
    print((time.perf_counter() - start) / steps * 1000)


def run(src: str, epoch: int, steps: int) -> float:
    cmd = [sys.executable, __file__, "--worker", src, "--epochs", str(epoch), "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"bench/iteration.py: the run of {src}, epoch {epoch} failed: {last}")
    return float(done.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", help="the other checkout's src/ folder (required)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.epochs[0], args.steps)
    if not args.baseline:
        raise SystemExit(
            "bench/iteration.py: --baseline: expected the other checkout's src/ folder"
        )
    base = str(Path(args.baseline).resolve())
    if not (Path(base) / "vlmoe" / "__init__.py").is_file():
        raise SystemExit(
            f"bench/iteration.py: --baseline {base}: expected a src/ folder holding vlmoe/"
        )
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for epoch in args.epochs:
            for name, src in (("baseline", base), ("this", str(HERE))):
                times.setdefault((name, epoch), []).append(run(src, epoch, args.steps))
    print(f"{args.steps} iterations per process, median of {args.rounds} rounds")
    print(f"{'epoch':>5} {'baseline ms':>12} {'this ms':>8} {'ratio':>6}   per round")
    for epoch in args.epochs:
        b, t = times[("baseline", epoch)], times[("this", epoch)]
        rounds = " ".join(f"{x / y:.2f}×" for x, y in zip(b, t, strict=True))
        mb, mt = statistics.median(b), statistics.median(t)
        print(f"{epoch:>5} {mb:>12.1f} {mt:>8.1f} {mb / mt:>5.2f}×   {rounds}")


if __name__ == "__main__":
    main()
