"""Text tower input: word embeddings plus learned positions."""

from __future__ import annotations

import torch
from torch import nn


class TextEmbedding(nn.Module):
    """input_ids [B, L] → word tokens [B, L, D]."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int) -> None:
        super().__init__()
        self.tok_VD = nn.Embedding(vocab_size, d_model)
        self.pos_LD = nn.Parameter(torch.zeros(max_len, d_model))
        self.pos_LD._no_weight_decay = True  # a position table: not decayed
        nn.init.trunc_normal_(self.tok_VD.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_LD, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        return self.tok_VD(input_ids) + self.pos_LD[:L]
