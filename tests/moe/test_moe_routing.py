"""Routers and capacity: exact drop counts, BPR, expert choice, dense, sigmoid bias."""

from __future__ import annotations

import pytest
import torch

from vlmoe.moe import (
    MoE,
    MoEConfig,
    apply_capacity,
    dense_route,
    expert_choice_route,
    sigmoid_route,
    softmax_route,
)


def test_apply_capacity_slot_major_order():
    # 4 tokens, top-2, 3 experts, capacity 2. First choices are served before second choices.
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    w = torch.full((4, 2), 0.5)
    new_idx, new_w = apply_capacity(idx, w, num_experts=3, capacity=2)
    # expert 0 gets first choices of tokens 0, 1; token 2's first choice and token 3's second
    # choice are dropped. expert 1: token 3 (first), token 0 (second); token 1's second dropped.
    expected = torch.tensor([[0, 1], [0, -1], [-1, 2], [1, -1]])
    torch.testing.assert_close(new_idx, expected)
    assert (new_w[expected < 0] == 0).all() and (new_w[expected >= 0] == 0.5).all()


def test_apply_capacity_bpr():
    idx = torch.tensor([[0], [0], [0], [0]])
    w = torch.ones(4, 1)
    prio = torch.tensor([0.1, 0.9, 0.3, 0.8])
    new_idx, _ = apply_capacity(idx, w, num_experts=2, capacity=2, priority_T=prio)
    torch.testing.assert_close(new_idx[:, 0], torch.tensor([-1, 0, -1, 0]))


def _skewed_moe(**kw) -> MoE:
    """Router that ranks experts 0 > 1 > 2 > 3 for any positive input."""
    moe = MoE(MoEConfig(d_model=4, d_ff=8, num_experts=4, **kw))
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([3.0, 2.0, 1.0, 0.0])[:, None].expand(4, 4))
    return moe


@pytest.mark.parametrize("impl", ["reference", "grouped", "capacity"])
def test_exact_drop_counts(impl):
    moe = _skewed_moe(top_k=2, capacity_factor=1.0, impl=impl)
    x = torch.rand(8, 4) + 0.1
    out = moe(x)
    # C = ceil(1.0·8·2/4) = 4: experts 0 and 1 each keep 4 of 8 tokens; 8 of 16 dropped
    torch.testing.assert_close(out.stats.tokens_per_expert, torch.tensor([4.0, 4.0, 0.0, 0.0]))
    assert out.stats.dropped_fraction.item() == pytest.approx(0.5)
    kept = out.routing.indices[:, 0] >= 0
    torch.testing.assert_close(kept, torch.arange(8) < 4)
    # dropped tokens get exactly zero output
    assert (out.output[4:] == 0).all() and (out.output[:4] != 0).any()


def test_exact_drop_counts_bpr():
    moe = _skewed_moe(top_k=1, capacity_factor=1.0, batch_prioritized=True)
    x = torch.rand(8, 4) + 0.1
    out = moe(x)
    # C = 2; BPR keeps the 2 tokens with the highest top-1 weight = the largest Σx
    keep = torch.zeros(8, dtype=torch.bool)
    keep[x.sum(-1).topk(2).indices] = True
    torch.testing.assert_close(out.routing.indices[:, 0] >= 0, keep)
    assert out.stats.dropped_fraction.item() == pytest.approx(0.75)


def test_expert_choice_route():
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 0.5]])
    d = expert_choice_route(logits, capacity=2)
    p = logits.softmax(-1)
    # expert 0 picks tokens 0, 1 (highest p[:,0]); expert 1 picks tokens 2, 3
    torch.testing.assert_close(d.indices[:, 0], torch.tensor([0, 0, 1, 1]))
    assert d.indices.shape[1] == 1
    torch.testing.assert_close(d.weights[:, 0], p[torch.arange(4), d.indices[:, 0]])
    # capacity 3 → a token is picked by both experts; K=2, padding -1 / 0, slot 0 = larger p
    d3 = expert_choice_route(logits, capacity=3)
    assert d3.indices.shape[1] == 2
    pad = d3.indices < 0
    assert pad.any() and (d3.weights[pad] == 0).all()
    assert (d3.weights[:, 0] >= d3.weights[:, 1]).all()


def test_dense_route_all_experts_sorted():
    logits = torch.randn(5, 4)
    d = dense_route(logits)
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(5))
    torch.testing.assert_close(d.indices.sort(-1).values, torch.arange(4).expand(5, 4))
    assert (d.weights[:, :-1] >= d.weights[:, 1:]).all()


def test_softmax_route_normalisation():
    logits = torch.randn(6, 5)
    d = softmax_route(logits, 2, normalize=False)
    torch.testing.assert_close(d.weights, logits.softmax(-1).topk(2).values)
    d = softmax_route(logits, 2, normalize=True)
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(6))


def test_sigmoid_route_bias_only_selects():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 5.0])
    d = sigmoid_route(logits, bias, top_k=2, normalize=False)
    # bias forces expert 2 into the selection, but weights stay sigmoid(logits)
    assert set(d.indices[0].tolist()) == {0, 2}
    s = torch.sigmoid(logits[0])
    torch.testing.assert_close(d.weights[0], torch.stack([s[0], s[2]]))
    assert d.indices[0, 0] == 0  # slot 0 = highest weight, not highest biased score


def test_sigmoid_bias_balances_load():
    torch.manual_seed(0)
    moe = MoE(
        MoEConfig(
            d_model=8, d_ff=8, num_experts=4, top_k=1, router="sigmoid", bias_update_rate=0.05
        )
    )
    with torch.no_grad():
        moe.router.weight[0] += 2.0  # expert 0 preferred by most tokens
    x = torch.randn(256, 8).abs()
    moe.train()
    first = moe(x).stats.load_imbalance
    for _ in range(60):
        last = moe(x).stats.load_imbalance
    assert last < first and last < 1.6


def test_noisy_router_noise_only_in_training():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, router="noisy", noise_std=1.0))
    x = torch.randn(64, 8)
    moe.eval()
    a, b = moe(x).routing, moe(x).routing
    torch.testing.assert_close(a.indices, b.indices)
    torch.testing.assert_close(a.indices[:, 0], a.logits.argmax(-1))
    moe.train()
    c = moe(x).routing
    assert (c.indices[:, 0] != a.indices[:, 0]).any()
    torch.testing.assert_close(c.logits, a.logits)  # logits are the clean ones
