"""Answer head: classify the fused representation into one of the known answers; and the
auxiliary scene head that trains the stem on what each picture shows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AnswerHead(nn.Module):
    """[CLS] text token c and mean vision token v, [B, D] each → answer logits [B, A].

    The MLP sees [c, v, c ⊙ v]. The product term is the multiplicative fusion of classic VQA
    models (the easy-VQA baseline, MCB/MUTAN): "which property is asked" × "what the image
    shows" becomes linear in it. Without it a from-scratch model sits for epochs on the
    language prior (answering from the question alone) before attention learns the interaction.

    With ``text_mean`` the MLP also sees the mean text token t and t ⊙ v: [c, v, c ⊙ v, t, t ⊙ v].
    Every word's own token carries that word, so t names the question's colour or shape from
    step 1, whereas [CLS] holds it only once its attention has learnt to fetch it — which some
    seeds never did for most colours (README, Robustness, item 12).
    """

    def __init__(self, d_model: int, num_answers: int, text_mean: bool = False) -> None:
        super().__init__()
        self.text_mean = text_mean
        width = self.num_inputs(text_mean) * d_model
        self.mlp = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, d_model),
            nn.GELU(),
            nn.Linear(d_model, num_answers),
        )

    @staticmethod
    def num_inputs(text_mean: bool) -> int:
        """How many D-wide vectors the MLP reads: [c, v, c ⊙ v], with ``text_mean`` also
        [t, t ⊙ v] (`vlmoe.flops` counts the head by it)."""
        return 5 if text_mean else 3

    def forward(
        self, cls_BD: torch.Tensor, vision_BD: torch.Tensor, text_BD: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[CLS] c, mean vision token v and (with ``text_mean``) mean text token t, [B, D]
        each → logits [B, A]."""
        parts = [cls_BD, vision_BD, cls_BD * vision_BD]
        if self.text_mean:
            if text_BD is None:
                raise ValueError("AnswerHead(text_mean=True) needs the mean text token")
            parts += [text_BD, text_BD * vision_BD]
        return self.mlp(torch.cat(parts, dim=-1))


class SceneHead(nn.Module):
    """An auxiliary training head: patch tokens [B, P, D] → logits [B, sum(classes)], one
    softmax per label group (easy-VQA: 8 colours, 3 shapes).

    The tokens are max-pooled over the patches, not averaged: a shape a few pixels wide lights
    one or two of 16 patches, and a mean would bury it under background. Max pool and MLP are
    `bench/shape_probe.py`'s head, the one that taught a stem small shapes there.
    """

    def __init__(self, d_model: int, classes: tuple[int, ...]) -> None:
        super().__init__()
        self.classes = tuple(classes)
        self.mlp = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, d_model),
            nn.GELU(),
            nn.Linear(d_model, sum(self.classes)),
        )

    def forward(self, tokens_BPD: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens_BPD.amax(dim=1))

    def loss(self, tokens_BPD: torch.Tensor, labels_BG: torch.Tensor) -> torch.Tensor:
        """Sum over the label groups of the mean cross-entropy; labels long [B, G]."""
        logits = self(tokens_BPD).split(self.classes, dim=-1)
        return sum(
            (F.cross_entropy(z, labels_BG[:, g]) for g, z in enumerate(logits)),
            tokens_BPD.new_zeros(()),
        )
