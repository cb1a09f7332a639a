"""Worker for tests/test_parallel.py: one rank of a 2-process gloo run (started by the test).

    python tests/parallel_worker.py layer OUT_DIR
    python -m torch.distributed.run --standalone --nproc-per-node N \
        tests/parallel_worker.py train OUT_DIR [STEPS [RESUME_DIR]]

with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set (torchrun sets them). ``layer``: each rank
compares its expert-parallel layer against the single-process layer on the concatenated batch
and writes the worst absolute differences to OUT_DIR/layer-RANK.json. ``train``: a short
``tiny`` run with a metric line every step into OUT_DIR/ck (also fine with one process, no
launcher); then the checkpoint is loaded back into an expert-parallel model and rank 0 writes
its logits on a fixed batch to OUT_DIR/logits.pt; with RESUME_DIR, the run saved there (by
any number of processes) is resumed to STEPS.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from vlmoe.moe import MoE, MoEConfig
from vlmoe.moe.parallel import ExpertParallelMoE

CONFIGS = {
    "softmax_all_losses": dict(
        d_model=16, d_ff=24, num_experts=4, top_k=2, num_shared_experts=1,
        load_balance_weight=0.1, z_loss_weight=0.01, importance_weight=0.1,
        local_entropy_weight=0.05, global_entropy_weight=0.05, global_entropy_threshold=1.0,
    ),
    "sigmoid_gelu": dict(
        d_model=16, d_ff=16, num_experts=4, top_k=1, router="sigmoid", activation="gelu",
        bias_update_rate=0.01,
    ),
    "noisy_load": dict(
        d_model=16, d_ff=16, num_experts=4, top_k=2, router="noisy", noise_std=0.5,
        load_weight=0.1, importance_weight=0.1,
    ),
    "dense_router": dict(d_model=16, d_ff=8, num_experts=4, top_k=4, router="dense"),
}  # fmt: skip


def mx(t: torch.Tensor) -> float:
    """Largest absolute entry (0 for an empty tensor)."""
    return t.abs().max().item() if t.numel() else 0.0


def sync_gradients(ep: ExpertParallelMoE, world: int) -> None:
    """What the engine does after backward for a bare layer: replicated parameters' gradients
    averaged over the ranks, the expert shards' divided by W (see vlmoe.moe.parallel)."""
    experts = {id(p) for p in ep.experts.parameters()}
    for p in ep.parameters():
        if p.grad is None:
            continue
        if id(p) in experts:
            p.grad.div_(world)
        else:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def layer(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    report = {}
    for name, kw in CONFIGS.items():
        # uneven on purpose (variable all-to-all splits); one config with an empty rank
        sizes = [0, 11] if name == "dense_router" else [13, 19]
        torch.manual_seed(0)
        ref = MoE(MoEConfig(**kw))
        if name == "noisy_load":
            ref.eval()  # no noise drawn (ranks' RNG streams differ), load loss still on
        ep = ExpertParallelMoE.from_moe(ref)
        T = sum(sizes)
        g = torch.Generator().manual_seed(1)
        x_TD = torch.randn(T, 16, generator=g)
        c_TD = torch.randn(T, 16, generator=g)
        gid_T = torch.randint(0, 2, (T,), generator=g)
        mask_T = torch.rand(T, generator=g) > 0.2
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        # single process on the global batch: L = mean_t <y_t, c_t> + aux
        xr = x_TD.clone().requires_grad_()
        o = ref(xr, token_mask=mask_T, group_ids=gid_T)
        loss = (o.output * c_TD).sum() / T + o.aux_loss
        loss.backward()
        # expert parallel on the local shard: L_r = (W / T) Σ_local <y, c> + aux, so that
        # the mean over ranks of L_r is L
        xe = x_TD[sl].clone().requires_grad_()
        oe = ep(xe, token_mask=mask_T[sl], group_ids=gid_T[sl])
        loss_e = (oe.output * c_TD[sl]).sum() * world / T + oe.aux_loss
        loss_e.backward()
        sync_gradients(ep, world)
        xe_grad = xe.grad / world  # the input gradient of J = Σ_r L_r is W · dL/dx
        full = ep.to_moe()
        diffs = {
            "output": mx(oe.output - o.output[sl]),
            "aux_loss": abs(oe.aux_loss.item() - o.aux_loss.item()),
            "x_grad": mx(xe_grad - xr.grad[sl]),
            "tokens_per_expert": (oe.stats.tokens_per_expert - o.stats.tokens_per_expert)
            .abs().max().item(),
            "entropy": abs(oe.stats.router_entropy.item() - o.stats.router_entropy.item()),
            "bias": (ep.router.bias_E - ref.router.bias_E).abs().max().item(),
            "gathered_weights": max(
                (full.state_dict()[k] - v).abs().max().item()
                for k, v in ref.state_dict().items()
            ),
        }  # fmt: skip
        for k in o.aux_losses:
            diffs[f"aux.{k}"] = abs(oe.aux_losses[k].item() - o.aux_losses[k].item())
        for pname, p in ref.named_parameters():
            pe = dict(ep.named_parameters())[pname]
            gref = p.grad
            if pname.startswith("experts."):
                gref = gref[ep.experts.first : ep.experts.first + ep.experts.num_local]
            diffs[f"grad.{pname}"] = (pe.grad - gref).abs().max().item()
        diffs["a2a_bytes"] = ep.experts.a2a.bytes
        report[name] = diffs
    with open(os.path.join(out_dir, f"layer-{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()  # torch 2.13 + gloo: leaving without barrier + destroy can SIGABRT
    dist.destroy_process_group()


def tiny_config(steps: int):
    """The ``tiny`` preset cut to ``steps`` optimiser steps, a metric line every step, with
    the default's scene head and extra pictures (so 2 processes must draw them as 1 does)."""
    import dataclasses

    from vlmoe.config import get_preset

    cfg = get_preset("tiny")
    t = cfg.train
    per_epoch = t.train_subset // t.batch_size
    cfg.train = dataclasses.replace(
        t, epochs=steps / per_epoch, log_every=1, routing_every=1, eval_subset=64,
        eval_batch_size=48,  # 64 = 48 + 16: a short last batch in evaluation
        scene_extra=8,
    )  # fmt: skip
    cfg.model = dataclasses.replace(cfg.model, scene_loss=1.0)
    return cfg


def fixed_batch(ck, n: int = 8):
    from vlmoe.data import iterate_batches, load_data

    c = ck.config
    split = load_data(c.data, "val", c.model.image_size, c.train.val_fraction, c.train.seed)
    return next(iterate_batches(split, ck.tokenizer, ck.answers, n, shuffle=False,
                                max_len=c.model.max_text_len))  # fmt: skip


def train(out_dir: str, steps: str = "4", resume_dir: str = "") -> None:
    from vlmoe.checkpoint import load_checkpoint
    from vlmoe.train import train as run
    from vlmoe.train.parallel import Engine

    e = Engine.from_env("cpu")
    ck_dir = os.path.join(out_dir, "ck")
    run(tiny_config(int(steps)), ck_dir, progress=False, engine=e)
    # reload the checkpoint into an expert-parallel (FSDP2) model: logits on a fixed batch
    ck = load_checkpoint(ck_dir)
    model = e.parallelize(ck.model)
    b = fixed_batch(ck)
    with torch.no_grad():
        logits = model(b).logits
    if e.is_main:
        torch.save(logits, os.path.join(out_dir, "logits.pt"))
    if resume_dir:  # continue a checkpoint saved by another number of processes
        run(tiny_config(int(steps)), resume_dir, progress=False, resume=True, engine=e)
    e.shutdown()


if __name__ == "__main__":
    {"layer": layer, "train": train}[sys.argv[1]](*sys.argv[2:])
