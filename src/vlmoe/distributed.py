"""Multi-process training on ``torch.distributed``: launch, data + expert parallelism, I/O.

Launch with PyTorch's launcher; ``vlmoe train`` picks the process group up from the
environment variables it sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)::

    torchrun --nproc-per-node 2 -m vlmoe train --preset tiny
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m vlmoe train ...

Parallel layout (one process group, W ranks):
    * experts: expert parallel over all W ranks — each MoE layer's E experts are split in W
      slices (``vlmoe.moe.parallel.ExpertParallelMoE``), tokens travel by all-to-all;
    * everything else (embeddings, attention, routers, dense FFNs, heads): replicated, data
      parallel — gradients all-reduced (mean) by hand in one flat buffer per dtype after
      ``backward()`` (``Dist.sync_gradients``). Chosen over DDP because DDP would also
      all-reduce the expert shards (each of which exists once) and needs private APIs to be
      told not to; the cost is no overlap of communication with the backward pass;
    * data: ``train.batch_size`` is the *global* batch; rank r gets the r-th contiguous
      ``batch_size / W`` slice of every global batch (``iterate_batches(rank=, world_size=)``),
      so W ranks together see exactly the 1-process batches.

Losses and gradients (why a W-process run equals the 1-process run with the same batch):
each rank's task loss is the mean over its B/W samples, so the mean over ranks is the global
mean; auxiliary losses are computed from global batch statistics and are identical on every
rank (see ``vlmoe.moe.parallel``). All the collectives differentiate J = Σ_r L_r = W · L, so
every gradient is scaled by 1/W: replicated parameters by the all-reduce *mean*, expert
parameters (which received every rank's tokens' gradient through the all-to-all) by a plain
division. Gradient clipping uses the global norm (replicated grads counted once, expert shards
summed over ranks).

Evaluation is sharded: each rank runs its slice of every evaluation batch through the
expert-parallel model, and the per-question results and loss sums are all-reduced, so every
rank returns the full-split result (equal to the 1-process one) at 1/W of the cost.

Checkpoints are written by rank 0 only, in the single-process layout (expert weights and their
AdamW moments all-gathered), so they load with any number of processes, including 1; a
W-process model loads a 1-process (or any-W) checkpoint by keeping its own expert rows.

Timeouts: every collective runs under the process group's timeout (``--dist-timeout`` /
``VLMOE_DIST_TIMEOUT``, default 120 s). A rank that dies closes its sockets, so the others
fail at their next collective (at once on gloo, or after the timeout), raise
``torch.distributed.DistError``/``RuntimeError`` and ``vlmoe`` prints one line
``vlmoe: error: distributed: ...`` and exits non-zero.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vlmoe.moe.parallel import ShardedExperts, expert_parallel, gather_experts
from vlmoe.parallel_engine import (  # one copy of the launch and failure helpers
    _LAUNCH_VARS,
    DEFAULT_TIMEOUT_S,
    ENV_TIMEOUT,
    DistributedError,
    describe_failure,
    is_distributed_failure,
    launched,
    timeout_from_env,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENV_TIMEOUT",
    "Dist",
    "DistributedError",
    "expert_parameters",
    "init_from_env",
    "describe_failure",
    "is_distributed_failure",
    "launched",
    "timeout_from_env",
]


def init_from_env(device: str = "cpu", timeout_s: float | None = None) -> Dist:
    """Join the process group described by the launcher's environment variables.

    Returns a single-process ``Dist`` (no process group) when WORLD_SIZE is unset or 1.
    Backend: NCCL for a CUDA ``device`` (each rank on ``cuda:LOCAL_RANK``), gloo otherwise.
    ``timeout_s`` (default: ``timeout_from_env()``) bounds the rendezvous and every collective.
    """
    if not launched():
        return Dist(device=device)
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
            "launch with torchrun (e.g. torchrun --nproc-per-node 2 -m vlmoe train ...)"
        )
    timeout = timeout_from_env() if timeout_s is None else float(timeout_s)
    if not timeout > 0:
        raise DistributedError(f"--dist-timeout: expected a positive number, got {timeout_s}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda: CUDA is not available on this machine")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout),
                **({"device_id": torch.device(device)} if backend == "nccl" else {}),
            )
        except (dist.DistError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {rank}: cannot join the process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({first})"
            ) from None
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device,
                timeout_s=timeout)  # fmt: skip


def expert_parameters(model: nn.Module) -> dict[int, ShardedExperts]:
    """``id(param) → owning ShardedExperts`` for every expert-parallel parameter of ``model``."""
    out: dict[int, ShardedExperts] = {}
    for m in model.modules():
        if isinstance(m, ShardedExperts):
            for p in m.parameters(recurse=False):
                out[id(p)] = m
    return out


class _StateDict(nn.Module):
    """A stand-in module whose ``state_dict()`` is a given dict (for ``save_checkpoint``)."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return self._state


@dataclass
class Dist:
    """This process's place in the run, and the collective steps of training.

    With ``world_size == 1`` (no process group) every method is the plain single-process
    operation, so the training loop has one code path.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    timeout_s: float | None = None

    @classmethod
    def current(cls, device: str = "cpu") -> Dist:
        """The process group torch.distributed is running (or a single-process ``Dist``)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(),
                       int(os.environ.get("LOCAL_RANK", 0)), device)  # fmt: skip
        return cls(device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ set-up
    def local_batch_size(self, global_batch: int, what: str = "train.batch_size") -> int:
        """This rank's share of a global batch; it must divide evenly."""
        if global_batch % self.world_size:
            raise DistributedError(
                f"{what}: the global batch {global_batch} does not split evenly over "
                f"{self.world_size} processes (use a multiple of {self.world_size})"
            )
        return global_batch // self.world_size

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Shard every MoE layer's experts over the ranks and make the replicated parameters
        and buffers equal rank 0's (as DDP does at construction). In place; call on every
        rank before building the optimiser, with the model built from the same seed."""
        if not self.active:
            return model
        for m in model.modules():
            cfg = getattr(m, "config", None)
            n = getattr(cfg, "num_experts", None)
            if isinstance(n, int) and n % self.world_size:
                raise DistributedError(
                    f"model.moe.num_experts: {n} experts cannot be split over "
                    f"{self.world_size} processes (expert parallelism needs a multiple)"
                )
        model = expert_parallel(model)
        experts = expert_parameters(model)
        shared = [p.data for p in model.parameters() if id(p) not in experts]
        shared += [b for b in model.buffers()]
        for group in _by_dtype(shared):
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            _unflatten_into(flat, group)
        return model

    # ------------------------------------------------------------------ gradients
    def sync_gradients(self, model: nn.Module) -> None:
        """After ``backward()``: average the replicated parameters' gradients over the ranks
        (one all-reduce per dtype) and divide the expert shards' gradients by W."""
        if not self.active:
            return
        experts = expert_parameters(model)
        W = self.world_size
        shared = []
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if id(p) in experts:
                if p.grad is not None:
                    p.grad.div_(W)
                continue
            if p.grad is None:  # keep the flat layout identical on every rank
                p.grad = torch.zeros_like(p)
            shared.append(p.grad)
        for group in _by_dtype(shared):
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat.div_(W)
            _unflatten_into(flat, group)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model's gradients."""
        if not self.active:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        experts = expert_parameters(model)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        dev = grads[0].device
        sq = torch.zeros(2, dtype=torch.float32, device=dev)
        for p in model.parameters():
            if p.grad is not None:
                sq[int(id(p) in experts)] += p.grad.detach().float().pow(2).sum()
        expert_sq = sq[1:].clone()
        dist.all_reduce(expert_sq)
        total = (sq[0] + expert_sq[0]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    # ------------------------------------------------------------------ metrics
    def reduce_window(self, win: dict[str, Any]) -> None:
        """Make a training-metrics window global: mean loss and aux loss over ranks, summed
        correct answers and samples. In place; every rank gets the same numbers."""
        if not self.active:
            return
        v = torch.tensor(
            [win["loss"], win["aux"], float(win["correct"]), float(win["n"])],
            dtype=torch.float64,
            device=self.device,  # NCCL reduces device tensors only
        )
        dist.all_reduce(v)
        win["loss"] = float(v[0]) / self.world_size
        win["aux"] = float(v[1]) / self.world_size
        win["correct"], win["n"] = round(float(v[2])), round(float(v[3]))

    def rank_slice(self, t: Tensor) -> Tensor:
        """This rank's contiguous 1/W of ``t`` along dim 0 (all of it for one process): how
        per-sample randomness drawn for the global batch is shared out."""
        if not self.active:
            return t
        return t.chunk(self.world_size)[self.rank]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Any, tokenizer: Any, answers: list[str], *,
                 batch_size: int = 512, device: str | torch.device = "cpu",
                 warn_unknown: bool = True) -> Any:  # fmt: skip
        """``vlmoe.evaluate.evaluate`` over the whole split, sharded over the ranks.

        Each rank runs its contiguous slice of every batch (the expert-parallel model needs all
        ranks in every forward); per-question correctness and loss sums are all-reduced, so
        every rank returns the full-split result.
        """
        from vlmoe.data import QUESTION_KINDS, iterate_batches
        from vlmoe.evaluate import EvalResult, evaluate

        if not self.active:
            return evaluate(model, split, tokenizer, answers, batch_size=batch_size,
                            device=device, warn_unknown=warn_unknown)  # fmt: skip
        was_training = model.training
        model.eval()
        n = len(split)
        correct = torch.zeros(n, dtype=torch.float64, device=device)
        loss = torch.zeros(2, dtype=torch.float64, device=device)
        per_rank = max(1, math.ceil(batch_size / self.world_size))
        for batch in iterate_batches(
            split, tokenizer, answers, per_rank, shuffle=False,
            max_len=model.cfg.max_text_len, rank=self.rank, world_size=self.world_size,
        ):  # fmt: skip
            batch = batch.to(device)
            out = model(batch.images, batch.input_ids, batch.attention_mask)
            known = batch.labels >= 0
            hit = (out.logits.argmax(-1) == batch.labels) & known
            correct[batch.question_index.to(correct.device)] = hit.double()
            if known.any():
                loss[0] += F.cross_entropy(
                    out.logits[known].float(), batch.labels[known], reduction="sum"
                )
                loss[1] += known.sum()
        model.train(was_training)
        dist.all_reduce(correct)
        dist.all_reduce(loss)
        hit_Q = (correct > 0.5).cpu()
        loss = loss.cpu()
        known_set = set(answers)
        n_unknown = sum(a not in known_set for a in split.answers)
        if n_unknown and warn_unknown and self.is_main:
            warnings.warn(
                f"{split.source}: {n_unknown} of {n} answers are not in the model's answer "
                "set; they count as wrong",
                stacklevel=2,
            )
        kinds = list(split.kinds)
        per_kind = {}
        for kind in QUESTION_KINDS:
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if idx:
                per_kind[kind] = {"accuracy": float(hit_Q[idx].float().mean()), "n": len(idx)}
        return EvalResult(
            accuracy=float(hit_Q.float().mean()) if n else 0.0,
            loss=float(loss[0]) / max(float(loss[1]), 1.0),
            n=n,
            n_unknown_answer=n_unknown,
            per_kind=per_kind,
        )

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's state dict in the single-process layout (expert shards all-gathered).
        Collective; every rank gets it."""
        state = model.state_dict()
        if not self.active:
            return state
        for name, m in model.named_modules():
            if isinstance(m, ShardedExperts):
                prefix = f"{name}." if name else ""
                for k, v in gather_experts(m).items():
                    state[prefix + k] = v
        return state

    def full_optimizer_state(self, opt: torch.optim.Optimizer, model: nn.Module) -> dict:
        """``opt.state_dict()`` with every expert parameter's per-element state (AdamW's
        moments) all-gathered to the full ``[E, ...]`` shape. Collective."""

        def gather(v: Tensor, p: Tensor, m: Any) -> Tensor | None:
            if v.shape != p.shape:
                return None
            parts = [torch.empty_like(v) for _ in range(m.ep_size)]
            dist.all_gather(parts, v.contiguous(), group=m.group)
            return torch.cat(parts, 0)

        return self._map_expert_state(opt.state_dict(), opt, model, gather)

    def shard_optimizer_state(self, sd: dict, opt: torch.optim.Optimizer, model: nn.Module) -> dict:
        """The inverse of ``full_optimizer_state``: keep this rank's expert rows (any-W
        checkpoint → this W). Not collective."""

        def shard(v: Tensor, p: Tensor, m: Any) -> Tensor | None:
            if v.ndim != p.ndim or v.shape[0] != m.num_experts:
                return None
            return v[m.first : m.first + m.num_local].clone()

        return self._map_expert_state(sd, opt, model, shard)

    def _map_expert_state(self, sd: dict, opt: torch.optim.Optimizer, model: nn.Module,
                          fn: Any) -> dict:  # fmt: skip
        """Copy of optimizer state dict ``sd`` with ``fn(tensor, param, experts_module)``
        applied to every per-parameter tensor of an expert parameter (None = keep as is)."""
        if not self.active:
            return sd
        experts = expert_parameters(model)
        params = [p for g in opt.param_groups for p in g["params"]]
        state = dict(sd["state"])
        for i, p in enumerate(params):
            m = experts.get(id(p))
            if m is None or i not in state:
                continue
            st = dict(state[i])  # a copy: opt.state_dict() shares the live per-param dicts
            for k, v in st.items():
                if isinstance(v, Tensor) and (out := fn(v, p, m)) is not None:
                    st[k] = out
            state[i] = st
        return {**sd, "state": state}

    def save_checkpoint(self, out_dir: str | Path, config: Any, model: nn.Module,
                        tokenizer: Any, answers: list[str], metrics: list[dict[str, Any]],
                        trainer_state: dict[str, Any] | None = None) -> None:  # fmt: skip
        """``vlmoe.checkpoint.save_checkpoint`` of the full (gathered) model, by rank 0.
        Collective: every rank must call it; all return once the checkpoint is in place."""
        from vlmoe.checkpoint import save_checkpoint

        state = self.full_state_dict(model)
        if self.is_main:
            save_checkpoint(out_dir, config, _StateDict(state), tokenizer, answers, metrics,
                            trainer_state)  # fmt: skip
        self.barrier()

    def shutdown(self) -> None:
        """Leave the process group (no-op for a single process)."""
        if self.active and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # after a failed collective the group may be unusable
                pass


def _by_dtype(ts: Iterable[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in ts:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def _unflatten_into(flat: Tensor, ts: list[Tensor]) -> None:
    i = 0
    for t in ts:
        n = t.numel()
        t.copy_(flat[i : i + n].view_as(t))
        i += n
