"""One optimiser step — the step that ``vlmoe train``, ``vlmoe compare`` and
``bench/train_step.py`` all run."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vlmoe.models.output import ModelOutput


class NonFiniteError(ValueError):
    """The loss or the gradient norm of a step was NaN or infinite."""


def train_step(
    model: nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    engine: Any,
    grad_clip: float = 0.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    nonfinite: str = "stop",
) -> ModelOutput | None:
    """Forward, loss (task + aux), backward, gradient sync, clip, optimiser and lr step.

    ``engine`` (``vlmoe.train.parallel.Engine``) finishes the gradients under data / expert
    parallelism (a no-op in one process) and clips by the global norm (``grad_clip`` 0 = no
    clipping; the norm is still checked). A NaN/inf loss or gradient norm never reaches the
    weights: ``nonfinite="stop"`` raises ``NonFiniteError``, ``"skip"`` drops the step
    (gradients cleared, no optimiser or lr step) and returns None — every process decides
    alike. Otherwise returns the forward's ``ModelOutput`` (read it, don't differentiate it).
    """
    out = model(batch)
    if out.loss is None:
        raise ValueError("train_step: the batch has no targets, the model returned no loss")
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    engine.finish_gradients(model)
    norm = engine.clip_grad_norm_(model, grad_clip if grad_clip > 0 else math.inf)
    loss = float(out.loss.detach())
    bad = float(not (math.isfinite(loss) and math.isfinite(float(norm))))
    if engine.world_size > 1:  # the gradient norm is global, a loss is not: agree
        bad = engine.all_reduce_sums({"bad": bad})["bad"]
    if bad:
        optimizer.zero_grad(set_to_none=True)
        if nonfinite == "skip":
            return None
        raise NonFiniteError(f"loss {loss:g}, gradient norm {float(norm):g}")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return out
