"""Expert parallelism on CPU (gloo): all-to-all bytes per step and step time, 1 vs 2 processes.

    python bench/expert_parallel.py                 # both rows, ~1-2 minutes on 2 CPU cores
    python bench/expert_parallel.py --worlds 1 2 4 --steps 20

For each process count W it starts W local processes (a gloo group on a free port; W = 1 runs
without a group) and times, with the same *global* batch at every W:

  * ``layer``: one ``ExpertParallelMoE`` (D=128, F=256, E=8, top-2, the ``default`` preset's
    MoE) forward + backward on T=4096 global tokens (T/W per rank);
  * ``train step``: the ``default`` VL-MoE model (2 MoE blocks × vision + text MoE), global
    batch 64 of random 64×64 images and 12-word questions: forward, backward, gradient sync
    (DP all-reduce + expert scaling), clipping and the AdamW step — what ``vlmoe train`` runs.

Reported per step: median wall time (rank 0, after warm-up), and the bytes all ranks together
pushed through all-to-all (token rows out and back, forward and backward; the per-expert
count exchange, E int64 per layer call, is left out). "off-rank" is the part that crossed
between processes — rows whose expert lives on the sending rank stay in shared memory.
Each process runs ``--threads`` threads (default 1: one core per process, the CPU analogue of
one GPU per process), so W processes use W cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from launch import run_local_ranks


def worker(out: str, steps: int, warmup: int) -> None:
    import torch
    import torch.distributed as dist

    from vlmoe.config import get_preset
    from vlmoe.data import Batch
    from vlmoe.models import build_model
    from vlmoe.moe import MoE, MoEConfig
    from vlmoe.moe.parallel import ShardedExperts
    from vlmoe.train import train_step as real_train_step
    from vlmoe.train.parallel import Engine

    d = Engine.from_env("cpu")
    W, rank = d.world_size, d.rank
    results = {}

    def timed(step_fn, model) -> tuple[float, float, float]:
        shards = [m for m in model.modules() if isinstance(m, ShardedExperts)]
        times = []
        for _ in range(warmup + steps):
            for m in shards:
                m.a2a.reset()
            d.barrier()
            t0 = time.perf_counter()
            step_fn()
            times.append(time.perf_counter() - t0)
        b = torch.tensor(
            [
                float(sum(m.a2a.bytes for m in shards)),
                float(sum(m.a2a.remote_bytes for m in shards)),
            ],
            dtype=torch.float64,
        )
        if W > 1:
            dist.all_reduce(b)
        return statistics.median(times[warmup:]) * 1e3, float(b[0]), float(b[1])

    # --- layer
    torch.manual_seed(0)
    T = 4096
    cfg = MoEConfig(d_model=128, d_ff=256, num_experts=8, top_k=2)
    layer = d.parallelize(MoE(cfg))
    x = torch.randn(T, 128, generator=torch.Generator().manual_seed(1)).chunk(W)[rank]

    def layer_step() -> None:
        out = layer(x)
        (out.output.square().mean() + out.aux_loss).backward()
        d.finish_gradients(layer)

    results["layer"] = timed(layer_step, layer)

    # --- full train step of the default model
    rc = get_preset("default")
    mcfg = rc.model
    mcfg.vocab_size, mcfg.num_answers = 64, 13
    torch.manual_seed(0)
    model = d.parallelize(build_model(mcfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B = d.local_batch_size(64)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(64, 3, 64, 64, generator=g).chunk(W)[rank]
    ids = torch.randint(1, 64, (64, 12), generator=g).chunk(W)[rank]
    mask = torch.ones(B, 12, dtype=torch.bool)
    labels = torch.randint(0, 13, (64,), generator=g).chunk(W)[rank]
    batch = Batch(images, ids, mask, labels, torch.arange(B))

    def train_step() -> None:  # the step vlmoe train runs
        real_train_step(model, batch, opt, d, 1.0)

    results["train step"] = timed(train_step, model)
    if rank == 0:
        Path(out).write_text(
            json.dumps({"world": W, "threads": torch.get_num_threads(), **results})
        )
    d.shutdown()


def run_world(W: int, steps: int, warmup: int, threads: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        argv = [sys.executable, __file__, "--worker", out, "--steps", str(steps),
                "--warmup", str(warmup)]  # fmt: skip
        run_local_ranks(argv, W, threads, timeout, f"W={W}")
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="threads per process (default 1: a core each)"
    )
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.steps, a.warmup)
        return
    rows = [run_world(W, a.steps, a.warmup, a.threads, a.timeout) for W in a.worlds]
    print(f"expert parallelism on CPU (gloo), median of {a.steps} steps after {a.warmup} warm-up")
    print(
        f"{'workload':<38} {'procs':>5} {'thr/proc':>8} {'step ms':>9} {'a2a MB/step':>12} {'off-rank MB':>12}"
    )
    names = {
        "layer": "MoE layer T=4096 D=128 F=256 E=8 k=2",
        "train step": "default model train step, batch 64",
    }
    for key, label in names.items():
        for r in rows:
            ms, b, rb = r[key]
            print(
                f"{label:<38} {r['world']:>5} {r['threads']:>8} {ms:>9.1f} {b / 1e6:>12.2f} {rb / 1e6:>12.2f}"
            )


if __name__ == "__main__":
    main()
