"""Interop with the Mixtral-format MoE block of ``transformers`` (optional dependency).

Mixtral / Qwen-MoE / OLMoE-style checkpoints store, per MoE block:
    gate.weight              [E, D]      router (softmax → top-k → renormalise)
    experts.gate_up_proj     [E, 2F, D]  gate rows first, then up rows
    experts.down_proj        [E, D, F]
vlmoe stores the transposes (``w_in_EDH [E, D, 2F]`` with the same gate-first order,
``w_out_EFD [E, F, D]``) so the grouped matmul reads them without a transpose.

In ``transformers`` 5.x the experts module is decorated with ``use_experts_implementation``:
its forward is picked by ``config._experts_implementation`` among ``"eager"`` (loop over hit
experts), ``"batched_mm"`` (gathers one weight matrix per token-expert pair, then bmm) and
``"grouped_mm"`` (sort + ``torch.nn.functional.grouped_mm``); ``"deepgemm"`` and
``"sonicmoe"`` need CUDA kernels. ``mixtral_block(..., experts_implementation=...)`` builds a
block with one of them selected.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import MoE, MoEConfig


def mixtral_block(
    d_model: int,
    d_ff: int,
    num_experts: int,
    top_k: int,
    experts_implementation: str = "eager",
) -> nn.Module:
    """A fresh ``transformers`` ``MixtralSparseMoeBlock`` with the given experts implementation."""
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )
    cfg._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(cfg)
    # transformers leaves these uninitialised (torch.empty) until a PreTrainedModel inits them
    with torch.no_grad():
        for p in block.parameters():
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    return block


def from_hf_mixtral(block: nn.Module, **overrides) -> MoE:
    """Build an ``MoE`` computing the same function as a ``MixtralSparseMoeBlock``.

    Copies the router and expert weights (transposed into vlmoe's layout). The config mirrors
    Mixtral: softmax top-k, renormalised, SwiGLU, dropless, no z-loss, and a load-balance
    weight of ``router_aux_loss_coef · k`` (transformers sums its f over the k slots, vlmoe
    normalises f over assignments, so this makes the two loss values equal). ``overrides`` are
    passed to ``MoEConfig`` (e.g. ``impl="reference"``).
    """
    experts = block.experts
    E, two_f, D = experts.gate_up_proj.shape
    hf_cfg = getattr(experts, "config", None)
    act = getattr(hf_cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"activation: only SwiGLU (hidden_act='silu') maps to vlmoe, got {act!r}")
    top_k = int(getattr(block, "top_k", None) or block.gate.top_k)
    coef = float(getattr(hf_cfg, "router_aux_loss_coef", 0.0) or 0.0)
    kwargs = dict(
        d_model=D,
        d_ff=two_f // 2,
        num_experts=E,
        top_k=top_k,
        router="softmax",
        normalize_top_k=True,
        activation="swiglu",
        jitter=float(getattr(block, "jitter_noise", 0.0) or 0.0),
        load_balance_weight=coef * top_k,
        z_loss_weight=0.0,
    )
    kwargs.update(overrides)
    moe = MoE(MoEConfig(**kwargs)).to(
        device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype
    )
    with torch.no_grad():
        moe.router.weight.copy_(block.gate.weight)
        moe.experts.w_in_EDH.copy_(experts.gate_up_proj.transpose(1, 2))
        moe.experts.w_out_EFD.copy_(experts.down_proj.transpose(1, 2))
    return moe


def to_hf_mixtral(moe: MoE, block: nn.Module | None = None) -> nn.Module:
    """Write ``moe``'s weights into a ``MixtralSparseMoeBlock`` (a new one if ``block`` is None).

    Only MoEs whose function Mixtral can express convert: softmax router, renormalised top-k,
    SwiGLU, no shared experts, dropless. Returns the block.
    """
    c = moe.config
    problems = {
        "router": c.router != "softmax",
        "normalize_top_k": not c.normalize_top_k,
        "activation": c.activation != "swiglu",
        "num_shared_experts": c.num_shared_experts != 0,
        "capacity_factor": c.capacity_factor is not None,
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise ValueError(f"{bad[0]}: a Mixtral block cannot express this MoE ({c})")
    if block is None:
        block = mixtral_block(c.d_model, c.d_ff, c.num_experts, c.top_k).to(
            device=moe.router.weight.device, dtype=moe.experts.w_in_EDH.dtype
        )
    ex = block.experts
    want = (c.num_experts, 2 * c.d_ff, c.d_model)
    if tuple(ex.gate_up_proj.shape) != want or int(block.gate.top_k) != c.top_k:
        raise ValueError(
            f"block: shape {tuple(ex.gate_up_proj.shape)} / top_k {block.gate.top_k} does not "
            f"match the MoE's {want} / {c.top_k}"
        )
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        ex.gate_up_proj.copy_(moe.experts.w_in_EDH.transpose(1, 2))
        ex.down_proj.copy_(moe.experts.w_out_EFD.transpose(1, 2))
    return block
