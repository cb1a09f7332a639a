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


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exempt: set[str],
    lr_scales: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups over the parameters that require grad: decayed and not (``exempt``).

    ``lr_scales`` ({fnmatch pattern: factor}, `TrainConfig.lr_scales`): a parameter whose name
    matches a pattern (the first that does) goes to a group with ``"lr_scale": factor``;
    without scales the two groups are as before (so are optimizer states saved by then). A
    pattern that matches no trainable parameter is a ConfigError (a typo would otherwise train
    everything at one rate silently)."""
    scales = lr_scales or {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(False, 1.0): [], (True, 1.0): []}
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pat = next((q for q in scales if fnmatch.fnmatchcase(name, q)), None)
        used.add(pat)
        key = (name in exempt, float(scales[pat]) if pat is not None else 1.0)
        groups.setdefault(key, []).append(p)
    unused = [q for q in scales if q not in used]
    if unused:
        raise ConfigError(f"train.lr_scales: {unused} match no trainable parameter")
    return [
        {"params": ps, "weight_decay": 0.0 if keep else weight_decay, "lr_scale": f}
        for (keep, f), ps in groups.items()
        if ps or f == 1.0
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
    lr_scales: dict[str, float] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (β = 0.9, 0.98) over the trainable parameters, and its LambdaLR schedule
    ``schedule = (warm-up steps, total steps, final lr ratio)``; ``exempt``: no_decay_names;
    ``lr_scales``: per-parameter lr factors (`param_groups`)."""
    warmup, total, min_ratio = schedule
    groups = param_groups(model, weight_decay, exempt, lr_scales)
    for g in groups:  # the schedule scales each group's own peak lr
        g["lr"] = lr * g.pop("lr_scale")
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=_can_fuse(groups))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total, min_ratio))
    return opt, sched
