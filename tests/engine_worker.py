"""Worker for tests/test_parallel_engine.py: one rank of a gloo run of ``vlmoe.train.parallel``.

    python tests/engine_worker.py OUT_DIR STEPS [--ep N] [--no-fsdp] [--save-at K]
        [--resume DIR] [--first S]

with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set for W > 1 (the test sets them;
without them it is the 1-process run). It builds the tiny VL-MoE from seed 0, parallelises it,
and runs a minimal training loop on fixed random global batches (batch b depends only on b):
forward, ``loss.backward()``, ``finish_gradients``, ``clip_grad_norm_``, AdamW. Rank 0 writes
OUT_DIR/losses.json ({"loss": {step: global loss}, "grad_norm": {step: norm before clipping},
"param_counts": [total, active]}) and the single-process state dict at the start and
the end (OUT_DIR/full-init.safetensors, full-final.safetensors). ``--save-at K`` saves a DCP
checkpoint to OUT_DIR/state after step K; ``--resume DIR`` loads one and goes on from its step.
A distributed failure ends the rank with one line ``vlmoe: error: distributed: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmoe.config import tiny
from vlmoe.models import build_model
from vlmoe.train.parallel import Engine, ParallelPlan, exit_on_failure

GLOBAL_BATCH, VOCAB, ANSWERS, MAX_NORM = 8, 40, 13, 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int, timeout_s: int = 30) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        VLMOE_DIST_TIMEOUT=str(timeout_s),
    )  # fmt: skip
    return env


def run_ranks(argv: list[str], world: int = 2, timeout: float = 300) -> list[str]:
    """Start ``world`` processes of ``argv`` as ranks of one group on a free local port; wait
    (each at most ``timeout`` s, then killed); assert every rank exited 0, failing with its
    stderr's tail; return the stderrs."""
    port = free_port()
    procs = [
        subprocess.Popen(argv, env=worker_env(r, world, port), stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, e in zip(procs, errs, strict=True):
        assert p.returncode == 0, e[-3000:]
    return errs


def build() -> torch.nn.Module:
    """The tiny VL-MoE (4 experts top-2 in block 1), seed 0, dropout 0."""
    cfg = tiny().model
    cfg.vocab_size, cfg.num_answers = VOCAB, ANSWERS
    torch.manual_seed(0)
    return build_model(cfg)


def global_batch(b: int) -> dict[str, torch.Tensor]:
    """Global batch number ``b``: random images, questions of 5..16 words, answers."""
    g = torch.Generator().manual_seed(1000 + b)
    n, L = GLOBAL_BATCH, tiny().model.max_text_len
    lengths = torch.randint(5, L + 1, (n,), generator=g)
    return {
        "images": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": torch.randint(1, VOCAB, (n, L), generator=g),
        "attention_mask": torch.arange(L)[None, :] < lengths[:, None],
        "labels": torch.randint(0, ANSWERS, (n,), generator=g),
    }


def model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The one call into the model family: ``forward(batch) -> ModelOutput``."""
    from vlmoe.data import Batch

    n = batch["labels"].shape[0]
    b = Batch(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"],
              torch.arange(n))  # fmt: skip
    return model(b).loss


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    engine = Engine.from_env("cpu", plan=ParallelPlan(ep=args.ep, fsdp=not args.no_fsdp))
    model = engine.parallelize(build())
    full = engine.full_state_dict(model)
    if engine.is_main:
        save_file({k: v.contiguous() for k, v in full.items()}, out / "full-init.safetensors")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    first = 0
    if args.resume:
        extra = engine.load_state(Path(args.resume), model, opt)
        first = int(extra["step"])
        torch.set_rng_state(extra["rng"])
    losses: dict[int, float] = {}
    norms: dict[int, float] = {}
    for step in range(first, args.steps):
        batch = {k: engine.rank_slice(v) for k, v in global_batch(step).items()}
        loss = model_loss(model, batch)
        loss.backward()
        engine.finish_gradients(model)
        norms[step + 1] = float(engine.clip_grad_norm_(model, MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        s = engine.all_reduce_sums({"loss": loss.item()})
        losses[step + 1] = s["loss"] / engine.world_size
        if engine.is_main:
            print(f"step {step + 1} loss {losses[step + 1]:.6f}", file=sys.stderr, flush=True)
        if step + 1 == args.save_at:
            extra = {"step": torch.tensor(step + 1), "rng": torch.get_rng_state()}
            engine.save_state(out / "state", model, opt, extra)
    full = engine.full_state_dict(model)
    if engine.is_main:
        counts = list(model.param_counts())  # whole-model counts under any sharding
        report = {"loss": losses, "grad_norm": norms, "param_counts": counts}
        (out / "losses.json").write_text(json.dumps(report))
        save_file({k: v.contiguous() for k, v in full.items()}, out / "full-final.safetensors")
    engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("steps", type=int)
    p.add_argument("--ep", type=int, default=0)
    p.add_argument("--no-fsdp", action="store_true")
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--resume", default="")
    args = p.parse_args(argv)
    try:
        run(args)
    except Exception as e:
        exit_on_failure(e)  # a dead or stuck peer: one line, exit 1, no teardown
        raise


if __name__ == "__main__":
    main()
