"""Parameter + optimiser memory per process under ``vlmoe.train.parallel``: 1 vs W processes.

    python bench/parallel_memory.py                    # W = 1, 2; ~1 minute on 2 CPU cores
    python bench/parallel_memory.py --worlds 1 2 4 --preset default

For each process count W (a gloo group on a free local port; W = 1 without a group) and each
layout — FSDP2 (dense parameters sharded over all W ranks) and replicated (``fsdp=False``) —
with experts sharded over all W ranks (``ep = W``), it builds the preset's VL-MoE, runs
``Engine.parallelize``, takes one AdamW step (forward, backward, ``finish_gradients``,
``clip_grad_norm_``) so that the optimiser state exists, and counts on rank 0 the bytes of
the storages that hold this process's parameters and optimiser state (each storage once,
FSDP2's padding included), then times ``--steps`` more training steps (median, rank 0).
Gradients are not counted (they are freed by ``zero_grad(set_to_none=True)`` between steps).
Ratios are against the 1-process row measured in the same run.
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


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors: their local shard)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def worker(out: str, preset: str, fsdp: bool, steps: int) -> None:
    import torch

    from vlmoe.config import get_preset
    from vlmoe.data import Batch
    from vlmoe.models import build_model
    from vlmoe.train.parallel import Engine, ParallelPlan

    engine = Engine.from_env("cpu", plan=ParallelPlan(ep=0, fsdp=fsdp))
    mcfg = get_preset(preset).model
    mcfg.vocab_size, mcfg.num_answers = 64, 13
    torch.manual_seed(0)
    model = engine.parallelize(build_model(mcfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    S, L, B = mcfg.image_size, 12, 32
    parts = [
        engine.rank_slice(torch.randn(B, 3, S, S, generator=g)),
        engine.rank_slice(torch.randint(1, 64, (B, L), generator=g)),
        engine.rank_slice(torch.ones(B, L, dtype=torch.bool)),
        engine.rank_slice(torch.randint(0, 13, (B,), generator=g)),
    ]
    batch = Batch(*parts, torch.arange(parts[0].shape[0]))

    def step() -> float:
        engine.barrier()
        t0 = time.perf_counter()
        model(batch).loss.backward()
        engine.finish_gradients(model)
        engine.clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()
    params = _storage_bytes(model.parameters())
    state = _storage_bytes(v for st in opt.state.values() for v in st.values()
                           if isinstance(v, torch.Tensor))  # fmt: skip
    ms = statistics.median(step() for _ in range(steps)) * 1e3
    if engine.is_main:
        n = sum(p.numel() for p in model.parameters())  # DTensor numel: the whole tensor
        Path(out).write_text(json.dumps({"params": params, "optim": state, "ms": ms, "n": n}))
    engine.shutdown()


def run(W: int, preset: str, fsdp: bool, steps: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        argv = [sys.executable, __file__, "--worker", out, "--preset", preset,
                "--steps", str(steps), *([] if fsdp else ["--no-fsdp"])]  # fmt: skip
        run_local_ranks(argv, W, 1, timeout, f"W={W} fsdp={fsdp}")
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--no-fsdp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.preset, not a.no_fsdp, a.steps)
        return
    base = run(1, a.preset, True, a.steps, a.timeout)
    rows = [("1 process", 1, base)]
    for W in (w for w in a.worlds if w > 1):
        rows.append(("FSDP2 + EP", W, run(W, a.preset, True, a.steps, a.timeout)))
        rows.append(("replicated + EP", W, run(W, a.preset, False, a.steps, a.timeout)))
    tot0 = base["params"] + base["optim"]
    print(f"preset {a.preset}: {base['n'] / 1e6:.2f} M parameters; per-process memory on rank 0"
          f", AdamW; step = median of {a.steps} (1 thread per process)")  # fmt: skip
    print(f"{'layout':<16} {'procs':>5} {'params MB':>10} {'optim MB':>9} {'total MB':>9} "
          f"{'vs 1 proc':>9} {'step ms':>8}")  # fmt: skip
    for name, W, r in rows:
        tot = r["params"] + r["optim"]
        print(f"{name:<16} {W:>5} {r['params'] / 1e6:>10.2f} {r['optim'] / 1e6:>9.2f} "
              f"{tot / 1e6:>9.2f} {tot / tot0:>9.3f} {r['ms']:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
