"""Routers: token representations → ``RoutingDecision(indices, weights, probs, logits)``.

Shape legend:
    T  tokens (flattened over all leading dims)
    D  model dim
    E  routed experts
    K  routing slots per token (top-k; router-dependent, see ``RoutingDecision``)
    C  per-expert capacity

Every router returns the same ``RoutingDecision`` so the expert paths never care which router
ran. Slots are ordered by decreasing weight, so ``indices[t, 0]`` is token t's top-1 expert
for every router; unused slots hold index -1 and weight 0.

Routers (Zoph et al. 2022 recommend computing routing in fp32; all of these do):
    softmax        p = softmax(x W_r^T); top-k of p (Shazeer 2017 / Switch / Mixtral).
    noisy          V-MoE: Gaussian noise (std ``noise_std``, default 1/E) added to the logits
                   while training, then softmax and top-k.
    sigmoid        DeepSeek-V3: s = sigmoid(logits); experts chosen by top-k of s + b where
                   the bias b (a buffer, no gradient) only steers selection; weights come from
                   s. b is nudged towards balance by ``sigmoid_bias_update``.
    expert_choice  Zhou et al. 2022: each expert picks its C = ceil(cf·T·k/E) highest-scoring
                   tokens, so a token may get 0..E experts. K = the largest number of experts
                   any token got in this batch; padded slots are -1 / weight 0.
    dense          every expert, weighted by the full softmax (K = E, slots sorted by p).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTERS = ("softmax", "noisy", "sigmoid", "expert_choice", "dense")


class RoutingDecision(NamedTuple):
    """Which experts each token goes to and with what weight.

    indices  [T, K] long   expert ids, slots sorted by decreasing weight; -1 = unused/dropped
    weights  [T, K]        mixing weights (0 at -1 slots); differentiable inside the layer
    probs    [T, E] fp32   router probabilities (softmax; for ``sigmoid``: the sigmoid
                           affinities normalised to sum 1 over experts)
    logits   [T, E] fp32   raw router logits (before noise)

    ``MoEOutput.routing`` holds a detached copy.
    """

    indices: Tensor
    weights: Tensor
    probs: Tensor
    logits: Tensor

    def detach(self) -> RoutingDecision:
        return RoutingDecision(*(t.detach() for t in self))


def topk_route(scores_TE: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Top-k of ``scores_TE`` → ``(indices_TK, weights_TK)``, weights renormalised if asked.

    Ties are broken by ``torch.topk`` (lowest index on CPU in practice); slots are sorted by
    decreasing score.
    """
    weights_TK, indices_TK = torch.topk(scores_TE, top_k, dim=-1, sorted=True)
    if normalize:
        # the clamp keeps a token whose k probabilities all underflowed from producing NaN
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return indices_TK, weights_TK


def softmax_route(logits_TE: Tensor, top_k: int, normalize: bool) -> RoutingDecision:
    """Softmax top-k routing (Switch/Mixtral). ``logits_TE`` fp32."""
    probs_TE = logits_TE.softmax(-1)
    indices_TK, weights_TK = topk_route(probs_TE, top_k, normalize)
    return RoutingDecision(indices_TK, weights_TK, probs_TE, logits_TE)


def sigmoid_route(
    logits_TE: Tensor, bias_E: Tensor, top_k: int, normalize: bool, scale: float = 1.0
) -> RoutingDecision:
    """DeepSeek-V3 routing: select top-k of ``sigmoid(logits) + bias``, weight by the sigmoid.

    The bias only affects which experts are chosen, never the weights or the gradient.
    ``scale`` is DeepSeek-V3's ``routed_scaling_factor`` applied after normalisation.
    """
    scores_TE = torch.sigmoid(logits_TE)
    _, indices_TK = torch.topk(scores_TE.detach() + bias_E, top_k, dim=-1, sorted=True)
    if normalize:
        # s_i / Σ s_j computed as a softmax of log-sigmoids: identical value and gradient, but
        # it stays normalised when every selected sigmoid underflows to 0 (very negative logits)
        weights_TK = F.logsigmoid(logits_TE).gather(1, indices_TK).softmax(-1)
    else:
        weights_TK = scores_TE.gather(1, indices_TK)
    # re-sort slots by weight so that slot 0 is the highest-weighted expert even when the bias
    # reordered the selection
    weights_TK, perm_TK = torch.sort(weights_TK, dim=-1, descending=True, stable=True)
    indices_TK = indices_TK.gather(1, perm_TK)
    probs_TE = F.logsigmoid(logits_TE).softmax(-1)  # = s / Σ s, underflow-safe
    return RoutingDecision(indices_TK, weights_TK * scale, probs_TE, logits_TE)


def expert_choice_route(logits_TE: Tensor, capacity: int) -> RoutingDecision:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-``capacity`` tokens.

    Scores are the softmax over experts; token t's weight for expert e is ``p[t, e]`` if e
    picked t. The token-major result has K = max experts per token (at least 1) with -1 / 0
    padding, slots sorted by weight.
    """
    T, E = logits_TE.shape
    probs_TE = logits_TE.softmax(-1)
    C = min(capacity, T)
    _, tok_EC = torch.topk(probs_TE.detach().t(), C, dim=-1)
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=logits_TE.device)
    chosen_TE[tok_EC.reshape(-1), torch.arange(E, device=logits_TE.device).repeat_interleave(C)] = (
        True
    )
    K = max(1, int(chosen_TE.sum(-1).max()))
    # unchosen experts score -1 (< any probability) so topk puts them after every chosen one
    masked_TE = torch.where(chosen_TE, probs_TE.detach(), -1.0)
    _, indices_TK = torch.topk(masked_TE, K, dim=-1, sorted=True)
    valid_TK = chosen_TE.gather(1, indices_TK)
    weights_TK = torch.where(valid_TK, probs_TE.gather(1, indices_TK), 0.0)
    indices_TK = torch.where(valid_TK, indices_TK, -1)
    return RoutingDecision(indices_TK, weights_TK, probs_TE, logits_TE)


def dense_route(logits_TE: Tensor) -> RoutingDecision:
    """Every expert, weighted by the full softmax; slots sorted by probability (K = E)."""
    probs_TE = logits_TE.softmax(-1)
    weights_TK, indices_TK = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    return RoutingDecision(indices_TK, weights_TK, probs_TE, logits_TE)


def apply_capacity(
    indices_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    capacity: int,
    priority_T: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Drop assignments past each expert's ``capacity`` (GShard/Switch; BPR with a priority).

    Assignments are served slot-major: every token's first choice before any second choice
    (GShard). Within a slot, tokens go in index order, or in decreasing ``priority_T`` order
    when given (Batch Prioritized Routing, V-MoE: priority = the token's top routing weight).
    Returns new ``(indices_TK, weights_TK)`` with dropped slots set to -1 / 0. Dropped slots
    stay in place (slot order is not re-sorted), so ``indices[t, 0] == -1`` means token t lost
    its first choice.
    """
    T, K = indices_TK.shape
    device = indices_TK.device
    tok_order_T = (
        torch.arange(T, device=device)
        if priority_T is None
        else torch.argsort(priority_T, descending=True, stable=True)
    )
    # service order: (slot k, token in priority order) → flat index into [T, K]
    serve_A = (tok_order_T[None, :] * K + torch.arange(K, device=device)[:, None]).reshape(-1)
    e_A = indices_TK.reshape(-1).index_select(0, serve_A)
    key_A = torch.where(e_A < 0, num_experts, e_A)
    sort_A = torch.argsort(key_A, stable=True)
    counts = torch.bincount(key_A, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted_A = torch.arange(key_A.numel(), device=device) - starts.index_select(
        0, key_A[sort_A]
    )
    pos_A = torch.empty_like(pos_sorted_A).scatter_(0, sort_A, pos_sorted_A)
    drop_A = (pos_A >= capacity) & (e_A >= 0)
    drop_TK = torch.zeros(T * K, dtype=torch.bool, device=device)
    drop_TK[serve_A] = drop_A
    drop_TK = drop_TK.view(T, K)
    return (
        indices_TK.masked_fill(drop_TK, -1),
        weights_TK.masked_fill(drop_TK, 0.0),
    )


class Router(nn.Module):
    """Linear router ``W_r [E, D]`` (no bias) plus the sigmoid router's selection bias.

    The projection runs in fp32 whatever the input dtype (router stability, ST-MoE §2).
    """

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        # DeepSeek-V3 selection bias: a buffer (saved in checkpoints, never trained by grads)
        self.register_buffer("bias_E", torch.zeros(num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, x_TD: Tensor) -> Tensor:
        """``x [T, D] -> logits [T, E]`` in fp32."""
        return F.linear(x_TD.float(), self.weight.float())
