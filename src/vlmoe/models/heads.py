"""Answer head: classify the fused representation into one of the known answers."""

from __future__ import annotations

import torch
from torch import nn


class AnswerHead(nn.Module):
    """[CLS] text token c and mean vision token v, [B, D] each → answer logits [B, A].

    The MLP sees [c, v, c ⊙ v]. The product term is the multiplicative fusion of classic VQA
    models (the easy-VQA baseline, MCB/MUTAN): "which property is asked" × "what the image
    shows" becomes linear in it. Without it a from-scratch model sits for epochs on the
    language prior (answering from the question alone) before attention learns the interaction.
    """

    def __init__(self, d_model: int, num_answers: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(3 * d_model),
            nn.Linear(3 * d_model, d_model),
            nn.GELU(),
            nn.Linear(d_model, num_answers),
        )

    def forward(self, cls_BD: torch.Tensor, vision_BD: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([cls_BD, vision_BD, cls_BD * vision_BD], dim=-1))
