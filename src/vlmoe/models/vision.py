"""Vision tower input: a small convolutional stem that turns an image into patch tokens.

A conv stem (rather than one big linear patchify) is the "early convolutions help
transformers see better" recipe (Xiao et al. 2021): it trains faster and more stably on small
data, which matters on a CPU budget.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvStem(nn.Module):
    """images [B, 3, S, S] → patch tokens [B, P, D] with P = (S / patch_size)².

    log2(patch_size) − 1 stride-2 3×3 convs (width doubling from `channels`), then a stride-2
    2×2 conv to `d_model`; plus a learned position embedding per patch.
    """

    def __init__(self, image_size: int, patch_size: int, channels: int, d_model: int) -> None:
        super().__init__()
        n = int(math.log2(patch_size))
        if 2**n != patch_size or n < 1:
            raise ValueError(f"model.patch_size: expected a power of two >= 2, got {patch_size}")
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(n - 1):
            c_out = channels * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                nn.GroupNorm(1, c_out),
                nn.GELU(),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, d_model, 2, stride=2))
        self.stem = nn.Sequential(*layers)
        self.num_patches = (image_size // patch_size) ** 2
        self.pos_PD = nn.Parameter(torch.zeros(self.num_patches, d_model))
        self.pos_PD._no_weight_decay = True  # a position table: not decayed
        nn.init.trunc_normal_(self.pos_PD, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # [B, D, S/p, S/p]
        return x.flatten(2).transpose(1, 2) + self.pos_PD
