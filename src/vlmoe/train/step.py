"""One optimiser step — the step that ``vlmoe train``, ``vlmoe compare`` and
``bench/train_step.py`` all run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmoe.models.output import ModelOutput


def train_step(
    model: nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    engine: Any,
    grad_clip: float = 0.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> ModelOutput:
    """Forward, loss (task + aux), backward, gradient sync, clip, optimiser and lr step.

    ``engine`` (``vlmoe.train.parallel.Engine``) finishes the gradients under data / expert
    parallelism (a no-op in one process) and clips by the global norm. Returns the forward's
    ``ModelOutput`` (its tensors still attached to the graph that was freed: read, don't
    differentiate).
    """
    out = model(batch)
    if out.loss is None:
        raise ValueError("train_step: the batch has no targets, the model returned no loss")
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    engine.finish_gradients(model)
    if grad_clip > 0:
        engine.clip_grad_norm_(model, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return out
