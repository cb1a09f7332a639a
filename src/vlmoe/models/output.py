"""The contract between every model family and the trainer.

A model's ``forward(batch)`` takes one batch object (a dataclass with ``.to(device)``) and
returns a ``ModelOutput``. The trainer (``vlmoe.train``) knows nothing else about a model:
it calls ``backward()`` on ``loss``, logs ``task_loss`` / ``aux_loss`` / ``metrics`` and
summarises ``routing``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmoe.moe import MoEStats, RoutingDecision

__all__ = ["ModelOutput", "RoutingRecord"]


@dataclass
class RoutingRecord:
    """What one MoE FFN did in one forward pass (all tensors detached).

    ``token_index`` [T, 2] gives (sample in batch, position) of each routed token: for images
    the patch index (row-major over the patch grid), for text the token position.
    ``modality`` names the tokens the layer saw ("vision", "text", or "vl" for a shared pool).
    """

    layer: int
    modality: str
    stats: MoEStats
    routing: RoutingDecision
    token_index: torch.Tensor

    @property
    def name(self) -> str:
        return f"layer{self.layer}.{self.modality}"


@dataclass
class ModelOutput:
    """One forward pass of any vlmoe model.

    loss       0-dim, task_loss + aux_loss: what training differentiates (None without targets)
    task_loss  0-dim, the task's own loss (cross-entropy, contrastive, next-token), or None
    aux_loss   0-dim, the sum of every MoE layer's weighted auxiliary losses (0 for dense models)
    logits     the task's scores (answers [B, A], vocabulary [B, L, V], similarities [B, B], …)
    routing    one record per MoE FFN called
    metrics    extra per-batch *sums* to log, name → 0-dim tensor, e.g. {"correct": 61,
               "count": 64}; the trainer sums them over a logging window (and over ranks) and
               reports ``correct / count`` as accuracy
    """

    loss: torch.Tensor | None
    task_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    logits: torch.Tensor | None = None
    routing: list[RoutingRecord] = field(default_factory=list)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def init_linear(m: torch.nn.Module) -> None:
    """The transformer-wide init of every ``nn.Linear``: truncated normal std 0.02, zero bias
    (BEiT / ViT practice; FFN weights follow ``vlmoe.moe.init_ffn_`` instead)."""
    if isinstance(m, torch.nn.Linear):
        torch.nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)
