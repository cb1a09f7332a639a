"""Each auxiliary loss on a small hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from vlmoe.moe import (
    global_entropy_loss,
    importance_loss,
    load_balance_loss,
    load_loss,
    local_entropy_loss,
    sigmoid_bias_update,
    z_loss,
)

LN2 = math.log(2.0)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_load_balance_loss():
    probs = t([[0.7, 0.3], [0.4, 0.6]])
    # balanced choice: f = [.5, .5], P = [.55, .45] → 2·(.275 + .225) = 1
    assert load_balance_loss(probs, torch.tensor([[0], [1]])).item() == pytest.approx(1.0)
    # both tokens on expert 0: f = [1, 0] → 2·0.55
    assert load_balance_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(1.1)
    # -1 slots are ignored; the mask drops token 1 (P = [.7, .3], f = [1, 0] → 1.4)
    assert load_balance_loss(probs, torch.tensor([[0, -1], [0, -1]])).item() == pytest.approx(1.1)
    m = torch.tensor([True, False])
    assert load_balance_loss(probs, torch.tensor([[0], [1]]), m).item() == pytest.approx(1.4)
    # gradient flows to the probabilities only: d/dP = E·f
    p = probs.clone().requires_grad_(True)
    load_balance_loss(p, torch.tensor([[0], [0]])).backward()
    torch.testing.assert_close(p.grad, t([[1.0, 0.0], [1.0, 0.0]]))


def test_z_loss():
    logits = t([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (LN2**2 + math.log(4.0) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert z_loss(logits, torch.tensor([False, True])).item() == pytest.approx(math.log(4.0) ** 2)


def test_importance_loss():
    probs = t([[0.7, 0.3], [0.4, 0.6]])
    # importance [1.1, 0.9]: mean 1, population variance 0.01
    assert importance_loss(probs).item() == pytest.approx(0.01, rel=1e-5)
    assert importance_loss(t([[0.5, 0.5]])).item() == pytest.approx(0.0)


def test_load_loss():
    clean = t([[1.0, 0.0], [0.0, 0.0]])
    noisy = t([[1.0, 0.0], [0.0, 0.0]])

    def phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    # token 0: threshold 1 → P = [1-Φ(0), 1-Φ(1)]; token 1: threshold 0 → P = [.5, .5]
    p = [(0.5 + 0.5) / 2, ((1 - phi(1.0)) + 0.5) / 2]
    mean = sum(p) / 2
    var = sum((v - mean) ** 2 for v in p) / 2
    got = load_loss(clean, noisy, noise_std=1.0, top_k=1)
    assert got.item() == pytest.approx(var / mean**2, rel=1e-5)
    # differentiable in the clean logits
    c = clean.clone().requires_grad_(True)
    load_loss(c, noisy, 1.0, 1).backward()
    assert c.grad.abs().sum() > 0


def test_local_entropy_loss():
    probs = t([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    assert local_entropy_loss(probs).item() == pytest.approx(LN2 / 3)
    # per group (0: two confident tokens, 1: one uniform token) then averaged over groups
    g = torch.tensor([0, 0, 1])
    assert local_entropy_loss(probs, group_ids_T=g).item() == pytest.approx(LN2 / 2)
    m = torch.tensor([False, False, True])
    assert local_entropy_loss(probs, mask_T=m).item() == pytest.approx(LN2)


def test_global_entropy_loss():
    probs = t([[1.0, 0.0], [0.0, 1.0]])
    assert global_entropy_loss(probs).item() == pytest.approx(-LN2)
    # each group routes to a single expert → zero marginal entropy per group
    g = torch.tensor([0, 1])
    assert global_entropy_loss(probs, group_ids_T=g).item() == pytest.approx(0.0, abs=1e-6)
    assert global_entropy_loss(probs, threshold=0.5).item() == pytest.approx(-0.5)
    m = torch.tensor([True, False])
    assert global_entropy_loss(probs, mask_T=m).item() == pytest.approx(0.0, abs=1e-6)


def test_sigmoid_bias_update():
    bias = t([0.0, 0.0, 0.1])
    new = sigmoid_bias_update(bias, t([3.0, 1.0, 2.0]), rate=0.01)
    torch.testing.assert_close(new, t([-0.01, 0.01, 0.1]))
    assert bias[0] == 0  # not in place


def test_empty_selection_is_zero():
    probs = t([[0.5, 0.5]])
    none = torch.tensor([False])
    for loss in (
        load_balance_loss(probs, torch.tensor([[0]]), none),
        z_loss(probs, none),
        importance_loss(probs, none),
        local_entropy_loss(probs, none),
        global_entropy_loss(probs, none),
    ):
        assert loss.item() == 0.0
