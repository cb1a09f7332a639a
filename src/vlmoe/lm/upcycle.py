"""Sparse upcycling: turn dense SwiGLU/GELU FFNs of a ``CausalLM`` into ``vlmoe.moe.MoE``.

*Copy* upcycling (Komatsuzaki et al. 2023; MoE-LLaVA): every expert starts as an exact copy
of the layer's dense FFN and a new router is added with a small initialisation. With
renormalised top-k weights (Σ_k w = 1) and identical experts the MoE computes
``Σ_k w_k·FFN(x) = FFN(x)``: the upcycled model equals the dense one at step 0, whatever the
router says. Optional ``noise`` perturbs each copy (relative to the weight's std) so experts
can diverge from the first step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmoe.moe import DenseFFN, MoE

from .model import CausalLM, LMMoEConfig

__all__ = ["moe_layer_indices", "upcycle"]


def moe_layer_indices(n_layers: int, layers: str | Sequence[int]) -> list[int]:
    """Layer choice: ``"every_other"`` (0, 2, 4, … as MoE-LLaVA), ``"all"``, or a list."""
    if layers == "every_other":
        return list(range(0, n_layers, 2))
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, str):
        raise ValueError(f"layers: expected 'every_other', 'all' or a list, got {layers!r}")
    out = sorted(set(int(i) for i in layers))
    if not out or out[0] < 0 or out[-1] >= n_layers:
        raise ValueError(f"layers: {list(layers)} must be a non-empty subset of 0..{n_layers - 1}")
    return out


@torch.no_grad()
def upcycle(
    model: CausalLM,
    num_experts: int = 4,
    top_k: int = 2,
    layers: str | Sequence[int] = "every_other",
    load_balance_weight: float = 0.01,
    z_loss_weight: float = 0.0,
    router_std: float = 0.02,
    noise: float = 0.0,
    seed: int = 0,
) -> CausalLM:
    """Replace the dense FFN of the chosen layers by an ``MoE`` of ``num_experts`` copies.

    In place (also returned); ``model.config.moe`` records the choice so that a model rebuilt
    from the config has the same structure. Defaults are MoE-LLaVA's: top-2 of 4 experts in
    every other layer, balance loss 0.01. The router weight is ``N(0, router_std²)``; ``noise``
    adds ``N(0, (noise·std(W))²)`` to each expert copy (0 keeps step-0 outputs exact).
    """
    c = model.config
    idx = moe_layer_indices(c.n_layers, layers)
    spec = LMMoEConfig(
        layers=idx,
        num_experts=num_experts,
        top_k=top_k,
        load_balance_weight=load_balance_weight,
        z_loss_weight=z_loss_weight,
    )
    g = torch.Generator().manual_seed(seed)
    for i in idx:
        block = model.layers[i]
        dense = block.ffn
        if not isinstance(dense, DenseFFN):
            raise ValueError(
                f"layers: layer {i} has no dense FFN to upcycle ({type(dense).__name__})"
            )
        w_in, w_out = dense.w_in_DH, dense.w_out_FD
        moe = MoE(spec.moe_config(c.d_model, w_out.shape[0])).to(w_in.device, w_in.dtype)
        for dst, src in ((moe.experts.w_in_EDH, w_in), (moe.experts.w_out_EFD, w_out)):
            dst.copy_(src.expand_as(dst))
            if noise > 0:
                n = torch.randn(dst.shape, generator=g) * (noise * float(src.std()))
                dst.add_(n.to(dst.device, dst.dtype))
        w_r = torch.randn(moe.router.weight.shape, generator=g) * router_std
        moe.router.weight.copy_(w_r)
        moe.train(dense.training)
        block.ffn = moe
    c.moe = spec
    return model
