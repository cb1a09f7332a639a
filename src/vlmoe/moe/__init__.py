"""vlmoe.moe — a sparse Mixture-of-Experts FFN layer, usable in any PyTorch model.

Shape legend: T tokens, D model dim, F expert FFN dim, H = 2F (SwiGLU) or F (GELU),
E experts, K slots per token, S sorted token-expert assignments, C capacity.

Quick use::

    from vlmoe.moe import MoE, MoEConfig
    moe = MoE(MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2))
    out = moe(x)                 # x [..., 64]
    loss = task_loss + out.aux_loss
    out.output, out.aux_losses, out.stats, out.routing

Pieces (each importable on its own):
    MoEConfig, MoE, MoEOutput, MoEStats        layer.py
    RoutingDecision, Router, *_route,          routing.py
      apply_capacity
    Experts, grouped_ffn, gmm,                 experts.py
      reference_experts, grouped_experts,
      capacity_experts, sort_by_expert, DenseFFN
    load_balance_loss, z_loss, importance_loss, load_loss,
      local_entropy_loss, global_entropy_loss, sigmoid_bias_update     losses.py
    from_hf_mixtral, to_hf_mixtral, mixtral_block                     hf.py (needs transformers)
    keep_freed_memory (opt-in glibc setting for fast large CPU tensors) cpu.py

For expert parallelism (``vlmoe.moe.parallel``):
    * ``moe.route(x_TD) -> (decision, chosen_TK, noisy_logits)`` gives the routing (with
      capacity drops applied; ``decision.weights`` carries the router gradient).
    * ``moe.experts`` holds all routed-expert weights stacked: ``w_in_EDH [E, D, H]`` and
      ``w_out_EFD [E, F, D]``; expert e computes ``act(x @ w_in_EDH[e]) @ w_out_EFD[e]``.
      Shard along dim 0.
    * ``moe.experts(x_TD, indices_TK, weights_TK, impl=...) -> y_TD`` is the whole routed
      computation on one device (indices -1 are skipped); an EP version replaces it.
    * ``grouped_ffn(x_SD, counts_E, w_in_EDH, w_out_EFD, activation) -> y_SD`` runs the FFN of
      each expert on tokens already sorted by expert (``counts_E`` rows each, no routing
      weights applied) — what a rank runs on the tokens it received from all_to_all.
      ``sort_by_expert(indices_TK, E) -> (order_S, counts_E, n)`` produces that order.
    * ``moe.aux_losses(...)`` and ``moe.stats(...)`` finish the forward given the routing.
"""

from .cpu import keep_freed_memory
from .experts import (
    DenseFFN,
    Experts,
    capacity_experts,
    capacity_of,
    dense_ffn,
    ffn_act,
    gmm,
    grouped_experts,
    grouped_ffn,
    reference_experts,
    sort_by_expert,
)
from .hf import from_hf_mixtral, mixtral_block, to_hf_mixtral
from .layer import IMPLS, MoE, MoEConfig, MoEOutput, MoEStats, model_param_counts
from .losses import (
    global_entropy_loss,
    importance_loss,
    load_balance_loss,
    load_loss,
    local_entropy_loss,
    sigmoid_bias_update,
    z_loss,
)
from .routing import (
    ROUTERS,
    Router,
    RoutingDecision,
    apply_capacity,
    dense_route,
    expert_choice_route,
    sigmoid_route,
    softmax_route,
    topk_route,
)

__all__ = [
    "IMPLS",
    "ROUTERS",
    "DenseFFN",
    "Experts",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MoEStats",
    "Router",
    "RoutingDecision",
    "apply_capacity",
    "capacity_experts",
    "capacity_of",
    "dense_ffn",
    "dense_route",
    "expert_choice_route",
    "ffn_act",
    "from_hf_mixtral",
    "global_entropy_loss",
    "gmm",
    "grouped_experts",
    "grouped_ffn",
    "importance_loss",
    "keep_freed_memory",
    "model_param_counts",
    "load_balance_loss",
    "load_loss",
    "local_entropy_loss",
    "mixtral_block",
    "reference_experts",
    "sigmoid_bias_update",
    "sigmoid_route",
    "softmax_route",
    "sort_by_expert",
    "to_hf_mixtral",
    "topk_route",
    "z_loss",
]
