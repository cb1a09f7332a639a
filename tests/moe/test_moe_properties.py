"""Hypothesis properties: permutation equivariance, normalised weights, extreme logits."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmoe.moe import ROUTERS, MoE, MoEConfig, sigmoid_route, softmax_route

SETTINGS = settings(max_examples=15, deadline=None)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    T=st.integers(1, 24),
    E=st.integers(1, 6),
    data=st.data(),
)
def test_dropless_permutation_equivariant(seed, T, E, data):
    k = data.draw(st.integers(1, E))
    router = data.draw(st.sampled_from(["softmax", "sigmoid", "dense"]))
    torch.manual_seed(seed)
    moe = MoE(
        MoEConfig(d_model=8, d_ff=8, num_experts=E, top_k=k, router=router, impl="grouped")
    ).eval()
    x = torch.randn(T, 8)
    perm = torch.randperm(T)
    with torch.no_grad():
        y = moe(x).output
        y_perm = moe(x[perm]).output
    torch.testing.assert_close(y_perm, y[perm], atol=1e-5, rtol=1e-5)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    E=st.integers(1, 8),
    scale=st.sampled_from([1e-3, 1.0, 1e2, 1e4, 1e30]),
    data=st.data(),
)
def test_normalised_weights_sum_to_one(seed, E, scale, data):
    k = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(10, E, generator=g) * scale
    d = softmax_route(logits, k, normalize=True)
    assert torch.isfinite(d.weights).all()
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(10))
    d = sigmoid_route(logits, torch.zeros(E), k, normalize=True)
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(10))
    assert (d.indices >= 0).all() and (d.indices < E).all()


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    router=st.sampled_from(ROUTERS),
    scale=st.sampled_from([1e3, 1e6, 1e15]),
    cf=st.sampled_from([None, 1.0]),
)
def test_no_nan_on_extreme_logits(seed, router, scale, cf):
    torch.manual_seed(seed)
    moe = MoE(
        MoEConfig(
            d_model=8,
            d_ff=8,
            num_experts=4,
            router=router,
            capacity_factor=cf,
            importance_weight=1.0,
            local_entropy_weight=1.0,
            global_entropy_weight=1.0,
        )
    )
    with torch.no_grad():
        moe.router.weight.mul_(scale)
    moe.train()
    x = torch.randn(12, 8, requires_grad=True)
    out = moe(x)
    for v in out.aux_losses.values():
        assert not torch.isnan(v), out.aux_losses
    assert torch.isfinite(out.output).all()
    assert torch.isfinite(out.stats.router_entropy)
    out.output.sum().backward()
    assert torch.isfinite(x.grad).all()
