"""The VL-MoE block's attention on the CPU (`attend_bmm`) against torch's fused kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmoe.models.blocks import Attention, attend_bmm


def _qkv(b: int, h: int, s: int, dh: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, dh, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(b, s, generator=g) > 0.4
    keep[:, 0] = True  # every row keeps a key, as every VL-MoE row keeps its patches
    return q, k, v, keep


@pytest.mark.parametrize("b,h,s,dh,seed", [(3, 4, 27, 32, 0), (2, 2, 9, 8, 1), (5, 1, 40, 16, 2)])
def test_attend_bmm_is_the_fused_kernel_forward_and_backward(b, h, s, dh, seed) -> None:
    q, k, v, keep = _qkv(b, h, s, dh, seed)
    grad = torch.randn(b, h, s, dh, dtype=torch.float64)
    outs, grads = [], []
    for f in (
        lambda *t: F.scaled_dot_product_attention(*t, attn_mask=keep[:, None, None, :]),
        lambda *t: attend_bmm(*t, keep),
    ):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*leaves)
        out.backward(grad)
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    for mine, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_masked_keys_get_no_weight() -> None:
    q, k, v, keep = _qkv(2, 4, 12, 8, 3)
    before = attend_bmm(q, k, v, keep)
    v2, k2 = v.clone(), k.clone()
    v2[~keep[:, None, :, None].expand_as(v)] = 1e6  # anything at the padded keys
    k2[~keep[:, None, :, None].expand_as(k)] = -1e3
    assert torch.equal(attend_bmm(q, k2, v2, keep), before)


def test_cpu_attention_module_rows_do_not_depend_on_their_batch_and_dropout_trains_only() -> None:
    torch.manual_seed(0)
    attn = Attention(64, 4, dropout=0.5).eval()
    x = torch.randn(6, 15, 64)
    keep = torch.rand(6, 15) > 0.3
    keep[:, 0] = True
    together = attn(x, keep)
    alone = torch.cat([attn(x[i : i + 1], keep[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-6)
    attn.train()
    torch.manual_seed(1)
    dropped = attn(x, keep)
    assert (dropped - together).abs().max() > 1e-3  # dropout acts in training
    attn.eval()
    assert torch.equal(attn(x, keep), together)  # and not in evaluation
