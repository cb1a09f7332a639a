"""Interop with transformers' MixtralSparseMoeBlock, both ways, within 1e-5 (fp32)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from vlmoe.moe import MoE, MoEConfig, from_hf_mixtral, mixtral_block, to_hf_mixtral  # noqa: E402

IMPLS = ["eager", "batched_mm", "grouped_mm"]


@pytest.mark.parametrize("hf_impl", IMPLS)
@pytest.mark.parametrize("impl", ["reference", "grouped"])
def test_from_hf_matches(hf_impl, impl):
    torch.manual_seed(0)
    block = mixtral_block(16, 24, num_experts=6, top_k=2, experts_implementation=hf_impl).eval()
    moe = from_hf_mixtral(block, impl=impl).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).output, block(x), atol=1e-5, rtol=1e-5)


def test_to_hf_matches_and_round_trips():
    torch.manual_seed(1)
    moe = MoE(MoEConfig(d_model=16, d_ff=24, num_experts=5, top_k=3)).eval()
    block = to_hf_mixtral(moe).eval()
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), moe(x).output, atol=1e-5, rtol=1e-5)
    back = from_hf_mixtral(block)
    for a, b in zip(moe.parameters(), back.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # into an existing block too
    other = mixtral_block(16, 24, 5, 3)
    assert to_hf_mixtral(moe, other) is other
    torch.testing.assert_close(other.experts.down_proj, block.experts.down_proj)


def test_to_hf_rejects_inexpressible():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, router="sigmoid"))
    with pytest.raises(ValueError, match="^router"):
        to_hf_mixtral(moe)
    with pytest.raises(ValueError, match="^block"):
        to_hf_mixtral(MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4)), mixtral_block(8, 8, 5, 2))


def test_load_balance_matches_hf():
    torch.manual_seed(2)
    block = mixtral_block(16, 24, num_experts=6, top_k=2)
    moe = from_hf_mixtral(block)
    x = torch.randn(40, 16)
    out = moe(x)
    coef = block.experts.config.router_aux_loss_coef
    hf = load_balancing_loss_func((out.routing.logits,), num_experts=6, top_k=2)
    torch.testing.assert_close(out.aux_losses["load_balance"], coef * hf)
