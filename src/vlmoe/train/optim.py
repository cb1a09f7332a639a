"""Optimiser and schedule: AdamW with decay chosen by what a parameter *is*, warm-up + cosine."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from vlmoe.config import ConfigError

#: modules whose parameters are never decayed: normalisation scales/shifts and lookup tables
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.Embedding,
)


def no_decay(module: nn.Module, param: nn.Parameter) -> bool:
    """Whether ``param`` (held directly by ``module``) is exempt from weight decay.

    Norm parameters, embedding tables, biases and other vectors are not decayed (GPT-2 / timm
    practice), nor is a parameter a model marks with ``param._no_weight_decay = True`` (e.g. a
    learned position table, which is an embedding held as a plain matrix).
    """
    return (
        isinstance(module, NO_DECAY_MODULES)
        or param.ndim < 2
        or bool(getattr(param, "_no_weight_decay", False))
    )


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters exempt from weight decay (see ``no_decay``).

    Call it on the plain model, before ``Engine.parallelize``: FSDP2 swaps parameters for
    sharded ones (dropping attributes such as ``_no_weight_decay``) but keeps their names.
    """
    out = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if no_decay(module, p):
                out.add(f"{mname}.{pname}" if mname else pname)
    return out


def param_groups(model: nn.Module, weight_decay: float, exempt: set[str]) -> list[dict[str, Any]]:
    """Two AdamW groups over the parameters that require grad: decayed and not (``exempt``)."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if name in exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def set_trainable(model: nn.Module, patterns: Iterable[str]) -> tuple[int, int]:
    """Freeze every parameter whose name matches none of the fnmatch ``patterns``.

    Returns (trainable, total) parameter counts. No parameter matching is a config error
    (raised as ConfigError naming the patterns), since a stage that trains nothing is a typo.
    """
    patterns = tuple(patterns)
    n_train = n_all = 0
    for name, p in model.named_parameters():
        on = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(on)
        n_all += p.numel()
        n_train += p.numel() if on else 0
    if n_train == 0:
        raise ConfigError(f"train.stages.trainable: {list(patterns)} match no parameter")
    return n_train, n_all


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _can_fuse(groups: list[dict[str, Any]]) -> bool | None:
    """Fused AdamW (one kernel over all parameters) for plain fp32 tensors on the CPU or a
    GPU: measured 0.92 s → 0.14 s a step for the 199M trainable parameters of the upcycled
    SmolLM2, where the default per-tensor loop streams parameters and moments several
    times. Sharded (DTensor) parameters keep the default implementation (None)."""
    from torch.distributed.tensor import DTensor

    ps = [p for g in groups for p in g["params"]]
    ok = all(
        not isinstance(p, DTensor) and p.dtype == torch.float32 and p.device.type in ("cpu", "cuda")
        for p in ps
    )
    return True if ps and ok else None


def build_optimizer(
    model: nn.Module,
    exempt: set[str],
    lr: float,
    weight_decay: float,
    schedule: tuple[int, int, float],
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (β = 0.9, 0.98) over the trainable parameters, and its LambdaLR schedule
    ``schedule = (warm-up steps, total steps, final lr ratio)``; ``exempt``: no_decay_names."""
    warmup, total, min_ratio = schedule
    groups = param_groups(model, weight_decay, exempt)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=_can_fuse(groups))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total, min_ratio))
    return opt, sched
