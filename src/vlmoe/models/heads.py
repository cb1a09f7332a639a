"""Answer head: classify the fused representation into one of the known answers."""

from __future__ import annotations

import torch
from torch import nn


class AnswerHead(nn.Module):
    """[CLS] text token and mean vision token, [B, D] each → answer logits [B, A]."""

    def __init__(self, d_model: int, num_answers: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_model, d_model), nn.GELU(), nn.Linear(d_model, num_answers)
        )

    def forward(self, cls_BD: torch.Tensor, vision_BD: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([cls_BD, vision_BD], dim=-1))
