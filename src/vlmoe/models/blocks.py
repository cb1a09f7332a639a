"""Multiway transformer blocks: shared attention, per-modality FFNs (dense or MoE).

Legend: B batch, P image patches, L text positions, S = P + L, D model width, F FFN hidden,
T tokens fed to one FFN (the valid tokens of one modality, flattened).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.models.output import RoutingRecord
from vlmoe.moe import DenseFFN, MoE, MoEConfig


class Attention(nn.Module):
    """Multi-head self-attention over [B, S, D] with a key padding mask [B, S] (True = real)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x_BSD: torch.Tensor, keep_BS: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], keep [B, S] bool (every row keeps at least one key) → [B, S, D]."""
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, Dh]
        p = self.dropout if self.training else 0.0
        if x_BSD.device.type == "cpu":
            y = attend_bmm(q, k, v, keep_BS, p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep_BS[:, None, None, :], dropout_p=p
            )
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


def attend_bmm(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_BS: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q kᵀ / √Dh, keys with keep False masked out) v, as batched matmuls.

    q, k, v [B, H, S, Dh], keep [B, S] bool → [B, H, S, Dh]; a row must keep at least one key.
    The same function as `F.scaled_dot_product_attention` with that mask (outputs agree to
    ~1e-6). Why: on the CPU, for the short sequences here (easy-VQA: 16 patches + 11 words),
    torch's fused CPU kernel takes ~1.7× as long, forward and backward (10.9 ms against
    6.3 ms per layer for a batch of 128 on 2 cores; `bench/attention.py`).
    """
    B, H, S, Dh = q.shape
    # one additive row per (batch row, head), broadcast over the queries by baddbmm
    bias = torch.zeros(B, H, 1, S, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~keep_BS[:, None, None, :], float("-inf"))
    scores = torch.baddbmm(
        bias.view(B * H, 1, S),
        q.reshape(B * H, S, Dh),
        k.reshape(B * H, S, Dh).transpose(1, 2),
        alpha=Dh**-0.5,
    )
    probs = scores.softmax(-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.bmm(probs, v.reshape(B * H, S, Dh)).view(B, H, S, Dh)


class ModalityFFN(nn.Module):
    """Pre-norm residual FFN for one modality, dense or MoE.

    forward(x [B, N, D], keep [B, N] bool) → (x + FFN(norm(x)) [B, N, D], aux loss, record).
    An MoE FFN routes only the real tokens (`keep`), so padding never enters the routing
    statistics or the balancing losses.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        moe: MoEConfig | None,
        layer: int,
        modality: str,
        dropout: float,
        activation: str = "swiglu",
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.layer, self.modality = layer, modality
        self.is_moe = moe is not None
        self.ffn: nn.Module = MoE(moe) if moe is not None else DenseFFN(d_model, d_ff, activation)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x_BND: torch.Tensor, keep_BN: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, RoutingRecord | None]:
        h = self.norm(x_BND)
        if not self.is_moe:
            return x_BND + self.drop(self.ffn(h)), None, None
        if keep_BN is None:
            out = self.ffn(h)
            y = out.output
            B, N, _ = x_BND.shape
            idx = torch.stack(
                torch.meshgrid(torch.arange(B), torch.arange(N), indexing="ij"), -1
            ).reshape(-1, 2)
        else:
            idx = keep_BN.nonzero()  # [T, 2] row-major, matches h[keep] order
            out = self.ffn(h[keep_BN])
            y = torch.zeros_like(x_BND)
            y[keep_BN] = out.output
        rec = RoutingRecord(self.layer, self.modality, out.stats, out.routing, idx)
        return x_BND + self.drop(y), out.aux_loss, rec


class MultiwayBlock(nn.Module):
    """Shared self-attention, then a vision FFN and a text FFN (or one shared VL FFN)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        layer: int,
        vision_moe: MoEConfig | None,
        text_moe: MoEConfig | None,
        shared_vl: bool,
        dropout: float,
        activation: str = "swiglu",
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.shared_vl = shared_vl
        if shared_vl:
            self.ffn_vl = ModalityFFN(d_model, d_ff, None, layer, "vl", dropout, activation)
        else:
            self.ffn_vision = ModalityFFN(
                d_model, d_ff, vision_moe, layer, "vision", dropout, activation
            )
            self.ffn_text = ModalityFFN(d_model, d_ff, text_moe, layer, "text", dropout, activation)

    def forward(
        self, x_v: torch.Tensor, x_t: torch.Tensor, text_keep_BL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[RoutingRecord]]:
        """x_v [B, P, D], x_t [B, L, D], text_keep [B, L] → (x_v, x_t, aux losses, records)."""
        P = x_v.shape[1]
        x = torch.cat([x_v, x_t], dim=1)
        keep = torch.cat([text_keep_BL.new_ones(x_v.shape[:2]), text_keep_BL], dim=1)
        x = x + self.drop(self.attn(self.norm_attn(x), keep))
        aux: list[torch.Tensor] = []
        recs: list[RoutingRecord] = []
        if self.shared_vl:
            x, _, _ = self.ffn_vl(x, None)
            return x[:, :P], x[:, P:], aux, recs
        x_v, x_t = x[:, :P], x[:, P:]
        x_v, a_v, r_v = self.ffn_vision(x_v, None)
        x_t, a_t, r_t = self.ffn_text(x_t, text_keep_BL)
        for a, r in ((a_v, r_v), (a_t, r_t)):
            if r is not None:
                aux.append(a)
                recs.append(r)
        return x_v, x_t, aux, recs
