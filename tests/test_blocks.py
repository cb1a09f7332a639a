"""Shared attention: the CPU path for short sequences against PyTorch's fused kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmoe.models.blocks import Attention


def _sdpa(att: Attention, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    B, S, D = x.shape
    q, k, v = att.qkv(x).view(B, S, 3, att.n_heads, D // att.n_heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    return att.proj(y.transpose(1, 2).reshape(B, S, D))


def test_short_sequence_path_matches_scaled_dot_product_attention() -> None:
    torch.manual_seed(0)
    att = Attention(32, 4, 0.0)
    x = torch.randn(5, 11, 32, requires_grad=True)
    keep = torch.rand(5, 11) > 0.4
    keep[:, 0] = True
    y, ref = att(x, keep), _sdpa(att, x, keep)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, gref, rtol=1e-4, atol=1e-5)
    # a masked key changes nothing; a row with no key at all goes to the fused kernel (zeros)
    x2 = x.detach().clone()
    x2[~keep] = 100.0
    torch.testing.assert_close(att(x2, keep)[keep], att(x.detach(), keep)[keep])
    keep[2] = False
    torch.testing.assert_close(att(x.detach(), keep), _sdpa(att, x.detach(), keep))
