"""MoE layer: public contract, every router × path equals the reference, dense equivalence."""

from __future__ import annotations

import pytest
import torch

from vlmoe.moe import (
    ROUTERS,
    DenseFFN,
    MoE,
    MoEConfig,
    MoEOutput,
    MoEStats,
    RoutingDecision,
    grouped_ffn,
    reference_experts,
)

PATHS = ("grouped", "capacity")


def make(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    base = dict(d_model=16, d_ff=24, num_experts=6, top_k=2)
    base.update(kw)
    return MoE(MoEConfig(**base))


def run_impl(moe: MoE, x: torch.Tensor, impl: str, seed: int = 1):
    """Forward+backward under one impl with a fixed RNG; returns output, aux, grads."""
    moe.config.impl = impl
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = moe(x)
    g = torch.randn_like(out.output)
    ((out.output * g).sum() + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return out, x.grad.clone(), grads


def test_contract_shapes_and_types():
    moe = make(num_shared_experts=1)
    x = torch.randn(3, 5, 16)
    out = moe(x)
    assert isinstance(out, MoEOutput) and isinstance(out.stats, MoEStats)
    assert isinstance(out.routing, RoutingDecision)
    assert out.output.shape == x.shape
    assert out.aux_loss.shape == () and out.aux_loss.requires_grad
    assert set(out.aux_losses) == {"load_balance", "z_loss"}
    torch.testing.assert_close(out.aux_loss, sum(out.aux_losses.values()))
    r = out.routing
    assert r.indices.shape == (15, 2) and r.indices.dtype == torch.long
    assert r.weights.shape == (15, 2) and r.probs.shape == (15, 6) and r.logits.shape == (15, 6)
    assert not any(t.requires_grad for t in r)
    s = out.stats
    assert s.tokens_per_expert.shape == (6,) and s.tokens_per_expert.dtype == torch.float32
    assert s.tokens_per_expert.sum() == 30
    assert s.dropped_fraction == 0
    assert s.load_imbalance >= 1
    assert not any(t.requires_grad for t in (s.tokens_per_expert, s.router_entropy))
    # slot 0 is the top-1 expert
    torch.testing.assert_close(r.indices[:, 0], r.probs.argmax(-1))


def test_no_aux_losses_gives_zero_tensor():
    moe = make(load_balance_weight=0.0, z_loss_weight=0.0)
    out = moe(torch.randn(4, 16))
    assert out.aux_losses == {} and out.aux_loss.shape == () and out.aux_loss == 0


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("impl", PATHS)
def test_paths_equal_reference_fp32(router, capacity_factor, impl):
    kw = dict(router=router, capacity_factor=capacity_factor, bias_update_rate=0.0)
    kw.update(importance_weight=0.1, local_entropy_weight=0.1, global_entropy_weight=0.1)
    if router == "noisy":
        kw["load_weight"] = 0.1
    moe = make(**kw, num_shared_experts=1, jitter=0.1)
    moe.train()
    x = torch.randn(2, 13, 16)
    ref, gx_ref, g_ref = run_impl(moe, x, "reference")
    out, gx, g = run_impl(moe, x, impl)
    torch.testing.assert_close(out.output, ref.output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    torch.testing.assert_close(out.routing.indices, ref.routing.indices)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], atol=1e-5, rtol=1e-5, msg=n)
    # the router gets gradient through the mixing weights
    assert g_ref["router.weight"].abs().sum() > 0


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("impl", PATHS)
def test_paths_equal_reference_bf16(router, impl):
    moe = make(router=router, capacity_factor=1.0, bias_update_rate=0.0).to(torch.bfloat16)
    moe.eval()
    x = torch.randn(32, 16, dtype=torch.bfloat16)
    ref, gx_ref, _ = run_impl(moe, x, "reference")
    out, gx, _ = run_impl(moe, x, impl)
    assert out.output.dtype == torch.bfloat16
    torch.testing.assert_close(out.output, ref.output, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gx, gx_ref, atol=3e-2, rtol=3e-2)


def test_sum_backward_expanded_grad():
    """``out.sum().backward()`` hands grouped_mm a stride-0 gradient; it must still work."""
    moe = make(d_model=32, d_ff=32, impl="grouped")
    x = torch.randn(20, 32, requires_grad=True)
    moe(x).output.sum().backward()
    assert torch.isfinite(x.grad).all() and moe.experts.w_in_EDH.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ("reference", "grouped", "capacity"))
@pytest.mark.parametrize("activation", ("swiglu", "gelu"))
def test_single_expert_equals_dense_ffn(impl, activation):
    moe = make(num_experts=1, top_k=1, activation=activation, impl=impl)
    dense = DenseFFN(16, 24, activation)
    with torch.no_grad():
        dense.w_in_DH.copy_(moe.experts.w_in_EDH[0])
        dense.w_out_FD.copy_(moe.experts.w_out_EFD[0])
    x = torch.randn(4, 7, 16)
    torch.testing.assert_close(moe(x).output, dense(x), atol=1e-6, rtol=1e-5)


def test_odd_sizes_use_fallback():
    """D·4 bytes not a multiple of 16 → grouped_mm cannot run; the loop fallback must match."""
    moe = make(d_model=6, d_ff=5, num_experts=3)
    x = torch.randn(11, 6)
    ref, gx_ref, g_ref = run_impl(moe, x, "reference")
    out, gx, g = run_impl(moe, x, "grouped")
    torch.testing.assert_close(out.output, ref.output)
    torch.testing.assert_close(g["experts.w_in_EDH"], g_ref["experts.w_in_EDH"])


def test_grouped_ffn_empty_experts_and_grads():
    torch.manual_seed(0)
    E, D, F = 4, 8, 8
    w_in = torch.randn(E, D, 2 * F, requires_grad=True)
    w_out = torch.randn(E, F, D, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 0])
    x = torch.randn(8, D)
    y = grouped_ffn(x, counts, w_in, w_out)
    # tokens 0..2 → expert 0, 3..7 → expert 2
    idx = torch.tensor([0] * 3 + [2] * 5)[:, None]
    y_ref = reference_experts(x, idx, torch.ones(8, 1), w_in, w_out)
    torch.testing.assert_close(y, y_ref)
    y.pow(2).sum().backward()
    assert w_in.grad[1].abs().sum() == 0 and w_in.grad[3].abs().sum() == 0
    assert w_in.grad[0].abs().sum() > 0


def test_param_counts():
    moe = make(num_shared_experts=2)
    total, active = moe.param_counts()
    per_expert = 16 * 48 + 24 * 16
    router = 6 * 16
    shared = 2 * per_expert
    assert total == router + 6 * per_expert + shared
    assert active == router + shared + 2 * per_expert
    assert make(router="dense").param_counts()[1] == router + 6 * per_expert


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(top_k=7), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(d_model=0), "d_model"),
        (dict(d_ff=-3), "d_ff"),
        (dict(num_experts=0), "num_experts"),
        (dict(router="hash"), "router"),
        (dict(activation="relu"), "activation"),
        (dict(impl="fast"), "impl"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(jitter=1.5), "jitter"),
        (dict(z_loss_weight=-1.0), "z_loss_weight"),
        (dict(load_weight=0.1), "load_weight"),
        (dict(bias_update_rate=-0.1), "bias_update_rate"),
    ],
)
def test_bad_config_names_field(kw, field):
    base = dict(d_model=16, d_ff=24, num_experts=6, top_k=2)
    base.update(kw)
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        MoEConfig(**base)


def test_sigmoid_bias_updates_in_training_only():
    moe = make(router="sigmoid", bias_update_rate=0.01)
    x = torch.randn(40, 16)
    moe.eval()
    moe(x)
    assert moe.router.bias_E.abs().sum() == 0
    moe.train()
    out = moe(x)
    tpe = out.stats.tokens_per_expert
    expected = 0.01 * torch.sign(tpe.mean() - tpe)
    torch.testing.assert_close(moe.router.bias_E, expected)
    assert not moe.router.bias_E.requires_grad


@pytest.mark.parametrize("activation", ("swiglu", "gelu"))
def test_grouped_ffn_grads_match_reference(activation):
    """The EP building block: sorted tokens, no routing weights, grads for x and weights."""
    torch.manual_seed(3)
    E, D, F = 5, 8, 12
    H = 2 * F if activation == "swiglu" else F
    counts = torch.tensor([4, 0, 7, 1, 0])
    x = torch.randn(12, D, requires_grad=True)
    w_in = (torch.randn(E, D, H) * 0.3).requires_grad_(True)
    w_out = (torch.randn(E, F, D) * 0.3).requires_grad_(True)
    idx = torch.repeat_interleave(torch.arange(E), counts)[:, None]
    g = torch.randn(12, D)
    y = grouped_ffn(x, counts, w_in, w_out, activation)
    grads = torch.autograd.grad((y * g).sum(), (x, w_in, w_out))
    y_ref = reference_experts(x, idx, torch.ones(12, 1), w_in, w_out, activation)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), (x, w_in, w_out))
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_aux_losses_respect_mask_and_groups():
    moe = make(local_entropy_weight=1.0, global_entropy_weight=1.0)
    x = torch.randn(2, 6, 16)
    full = moe(x)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0] = True
    masked = moe(x, token_mask=mask)
    alone = moe(x[0])
    # routing/output are unaffected; the losses equal those of the kept tokens alone
    torch.testing.assert_close(masked.output, full.output)
    for k in full.aux_losses:
        torch.testing.assert_close(masked.aux_losses[k], alone.aux_losses[k])
    groups = torch.tensor([[0] * 6, [1] * 6])
    split = moe(x, group_ids=groups)
    b = moe(x[1])
    expected = (alone.aux_losses["global_entropy"] + b.aux_losses["global_entropy"]) / 2
    torch.testing.assert_close(split.aux_losses["global_entropy"], expected)


def test_keep_freed_memory_is_safe():
    from vlmoe.moe import keep_freed_memory

    assert keep_freed_memory() in (True, False)
    moe = make(impl="grouped")
    assert torch.isfinite(moe(torch.randn(8, 16)).output).all()
