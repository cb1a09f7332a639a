"""The MoE layer: router + routed experts (+ shared experts) → ``MoEOutput``.

Shape legend:
    T  tokens (all leading dims of the input flattened)
    D  model dim      F  expert FFN dim      E  routed experts      K  slots per token
    C  per-expert capacity

``MoE.forward`` is ``route`` → ``experts`` (one of three paths) → ``+ shared`` → aux losses
and stats. Each step is a public method so expert-parallel code (``vlmoe.moe.parallel``) can
replace only the middle one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import losses as L
from .experts import ACTIVATIONS, DenseFFN, Experts, capacity_of
from .routing import (
    ROUTERS,
    Router,
    RoutingDecision,
    apply_capacity,
    dense_route,
    expert_choice_route,
    sigmoid_route,
    softmax_route,
)

IMPLS = ("auto", "reference", "grouped", "capacity")


@dataclass
class MoEConfig:
    """Configuration of one MoE layer. Every field is validated in ``__post_init__``."""

    d_model: int
    """Model (token) dimension D."""
    d_ff: int
    """Hidden dimension F of each routed (and each shared) expert."""
    num_experts: int
    """Number of routed experts E."""
    top_k: int = 2
    """Experts per token k. For ``expert_choice`` it sets the average: C = ceil(cf·T·k/E)."""
    router: str = "softmax"
    """``"softmax"`` top-k (default) | ``"noisy"`` top-k (V-MoE noise) | ``"sigmoid"``
    (DeepSeek-V3, bias-balanced) | ``"expert_choice"`` (experts pick tokens) | ``"dense"``
    (every expert, full softmax weights)."""
    normalize_top_k: bool = True
    """Renormalise the k selected weights to sum to 1 (Mixtral, DeepSeek-V3). Softmax, noisy
    and sigmoid routers only."""
    capacity_factor: float | None = None
    """``None`` = dropless. Else each expert takes at most C = ceil(cf·T·k/E) assignments and
    the rest are dropped (contribute zero; the caller's residual carries them). For
    ``expert_choice`` it scales the experts' capacity instead (None means 1.0)."""
    batch_prioritized: bool = False
    """Batch Prioritized Routing (V-MoE): when dropping, serve tokens in decreasing order of
    their top router probability instead of position order."""
    num_shared_experts: int = 0
    """DeepSeekMoE shared experts, applied to every token with weight 1 (stored as one dense
    FFN of hidden ``num_shared_experts · d_ff``)."""
    activation: str = "swiglu"
    """Expert FFN: ``"swiglu"`` (silu(x W_g) · x W_u) W_d, default | ``"gelu"``."""
    jitter: float = 0.0
    """Switch jitter: while training, the router input is multiplied by U(1−j, 1+j)."""
    noise_std: float | None = None
    """Std of the logit noise of the ``noisy`` router while training; None = 1/E (V-MoE)."""
    route_scale: float = 1.0
    """``sigmoid`` router: factor on the routed weights (DeepSeek-V3 routed_scaling_factor)."""
    bias_update_rate: float = 1e-3
    """``sigmoid`` router: step γ of the selection-bias update after every training forward
    (DeepSeek-V3 uses 1e-3); 0 disables it."""
    load_balance_weight: float = 0.01
    """Weight of the Switch load-balance loss (not applied to ``expert_choice``)."""
    z_loss_weight: float = 1e-3
    """Weight of the ST-MoE router z-loss."""
    importance_weight: float = 0.0
    """Weight of the V-MoE importance loss."""
    load_weight: float = 0.0
    """Weight of the V-MoE load loss (needs ``router="noisy"``)."""
    local_entropy_weight: float = 0.0
    """Weight of the LIMoE local (per-token) entropy loss."""
    global_entropy_weight: float = 0.0
    """Weight of the LIMoE global (marginal) entropy loss."""
    global_entropy_threshold: float | None = None
    """Entropy cap (nats) of the global entropy loss; None = no cap."""
    impl: str = "auto"
    """Execution path: ``"reference"`` (loop over experts; the ground truth for tests) |
    ``"grouped"`` (sort by expert + grouped matmul, no loop over experts) | ``"capacity"``
    (fixed C-slot buffer per expert, static shapes) | ``"auto"`` (= ``"grouped"``, the fastest
    on CPU whether or not tokens are dropped). All paths compute the same function."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: must be a positive int, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k: must be <= num_experts ({self.num_experts}), got {self.top_k}"
            )
        if self.router not in ROUTERS:
            raise ValueError(f"router: unknown {self.router!r}, expected one of {ROUTERS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: unknown {self.activation!r}, expected one of {ACTIVATIONS}"
            )
        if self.impl not in IMPLS:
            raise ValueError(f"impl: unknown {self.impl!r}, expected one of {IMPLS}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor: must be > 0 or None, got {self.capacity_factor}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(
                f"num_shared_experts: must be an int >= 0, got {self.num_shared_experts!r}"
            )
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter: must be in [0, 1), got {self.jitter}")
        if self.noise_std is not None and self.noise_std < 0:
            raise ValueError(f"noise_std: must be >= 0 or None, got {self.noise_std}")
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate: must be >= 0, got {self.bias_update_rate}")
        for f in dataclasses.fields(self):
            if f.name.endswith("_weight") and getattr(self, f.name) < 0:
                raise ValueError(f"{f.name}: must be >= 0, got {getattr(self, f.name)}")
        if self.load_weight > 0 and self.router != "noisy":
            raise ValueError(
                f"load_weight: the load loss needs router='noisy', not {self.router!r}"
            )


@dataclass
class MoEStats:
    """Routing statistics of one forward, all detached.

    tokens_per_expert  [E] float  kept token-expert assignments per expert (after drops)
    dropped_fraction   0-dim      dropped / routed assignments (capacity); for
                                  ``expert_choice``: fraction of tokens no expert picked
    router_entropy     0-dim      mean over tokens of H(probs[t, :]) in nats
    load_imbalance     0-dim      max / mean of tokens_per_expert (1 = perfectly balanced)
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    router_entropy: Tensor
    load_imbalance: Tensor


@dataclass
class MoEOutput:
    """What an MoE layer returns.

    output      [..., D]  same leading dims and dtype as the input
    aux_loss    0-dim fp32, Σ of ``aux_losses`` (already weighted); differentiable; zeros if none
    aux_losses  dict name → weighted 0-dim loss, one entry per loss with a non-zero weight
    stats       ``MoEStats``
    routing     ``RoutingDecision`` flattened over leading dims ([T, K] / [T, E]), detached,
                after capacity drops
    """

    output: Tensor
    aux_loss: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: MoEStats | None = None
    routing: RoutingDecision | None = None


class MoE(nn.Module):
    """A sparse Mixture-of-Experts FFN: ``x [..., D] -> MoEOutput``.

    Submodules: ``router`` (``Router``, weight [E, D], fp32 logits; ``router.bias_E`` is the
    sigmoid router's selection bias), ``experts`` (``Experts``, stacked ``w_in_EDH``,
    ``w_out_EFD``), ``shared`` (``DenseFFN`` or None).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.router = Router(c.d_model, c.num_experts)
        self.experts = Experts(c.num_experts, c.d_model, c.d_ff, c.activation)
        self.shared = (
            DenseFFN(c.d_model, c.num_shared_experts * c.d_ff, c.activation)
            if c.num_shared_experts
            else None
        )

    # ---------------------------------------------------------------- routing
    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity C for ``num_tokens`` tokens, or None when dropless."""
        c = self.config
        if c.router == "expert_choice":
            return capacity_of(num_tokens, c.top_k, c.num_experts, c.capacity_factor or 1.0)
        if c.capacity_factor is None:
            return None
        k = c.num_experts if c.router == "dense" else c.top_k
        return capacity_of(num_tokens, k, c.num_experts, c.capacity_factor)

    def route(self, x_TD: Tensor) -> tuple[RoutingDecision, Tensor, Tensor | None]:
        """Route ``x_TD [T, D]``.

        Returns ``(decision, chosen_TK, noisy_logits_TE)``: the decision after capacity drops
        (weights carry gradient), the router's choice before drops (for the load-balance loss),
        and the noisy router's noisy logits (None for other routers).
        """
        c = self.config
        r_in_TD = x_TD
        if self.training and c.jitter > 0:
            r_in_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - c.jitter, 1.0 + c.jitter)
        logits_TE = self.router(r_in_TD)
        noisy_TE = None
        if c.router == "softmax":
            d = softmax_route(logits_TE, c.top_k, c.normalize_top_k)
        elif c.router == "noisy":
            std = (1.0 / c.num_experts) if c.noise_std is None else c.noise_std
            noisy_TE = logits_TE
            if self.training and std > 0:
                noisy_TE = logits_TE + std * torch.randn_like(logits_TE)
            d = softmax_route(noisy_TE, c.top_k, c.normalize_top_k)
            d = d._replace(logits=logits_TE)
        elif c.router == "sigmoid":
            d = sigmoid_route(
                logits_TE, self.router.bias_E, c.top_k, c.normalize_top_k, c.route_scale
            )
        elif c.router == "expert_choice":
            d = expert_choice_route(logits_TE, self.capacity(x_TD.shape[0]))
        else:
            d = dense_route(logits_TE)
        chosen_TK = d.indices
        cap = self.capacity(x_TD.shape[0])
        if cap is not None and c.router != "expert_choice":
            # V-MoE BPR: priority = the token's top router probability (not the renormalised
            # weight, which is 1 for every token when k = 1)
            prio_T = d.probs.detach().amax(-1) if c.batch_prioritized else None
            idx, w = apply_capacity(d.indices, d.weights, c.num_experts, cap, prio_T)
            d = d._replace(indices=idx, weights=w)
        return d, chosen_TK, noisy_TE

    # ---------------------------------------------------------------- losses & stats
    def aux_losses(
        self,
        d: RoutingDecision,
        chosen_TK: Tensor,
        noisy_logits_TE: Tensor | None = None,
        mask_T: Tensor | None = None,
        group_ids_T: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The enabled auxiliary losses, each multiplied by its config weight (on this
        process's tokens; ``ExpertParallelMoE`` sums the same statistics over processes)."""
        return L.aux_losses(
            self.config, d.probs, d.logits, chosen_TK, noisy_logits_TE, mask_T, group_ids_T
        )

    @torch.no_grad()
    def stats(self, d: RoutingDecision, chosen_TK: Tensor) -> MoEStats:
        """Cheap detached statistics of a routing decision (see ``MoEStats``)."""
        E = self.config.num_experts
        flat = d.indices.reshape(-1)
        tpe_E = torch.bincount(flat[flat >= 0], minlength=E).float()
        if self.config.router == "expert_choice":
            dropped = (d.indices[:, 0] < 0).float().mean()
        else:
            routed = (chosen_TK >= 0).sum().clamp_min(1)
            dropped = 1.0 - tpe_E.sum() / routed
        p = d.probs.float()
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
        imbalance = tpe_E.max() / tpe_E.mean().clamp_min(1e-20)
        return MoEStats(tpe_E, dropped, entropy, imbalance)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        group_ids: Tensor | None = None,
    ) -> MoEOutput:
        """``x [..., D] -> MoEOutput`` (output ``[..., D]``).

        ``token_mask [...]`` bool and ``group_ids [...]`` int (optional, same leading dims as
        x) only restrict / split the auxiliary losses (e.g. skip padding, apply the LIMoE
        entropy losses per modality); every token is still routed and computed.
        """
        c = self.config
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, c.d_model)
        d, chosen_TK, noisy_TE = self.route(x_TD)
        impl = "grouped" if c.impl == "auto" else c.impl
        y_TD = self.experts(
            x_TD, d.indices, d.weights, impl=impl, capacity=self.capacity(x_TD.shape[0])
        )
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        mask_T = None if token_mask is None else token_mask.reshape(-1).bool()
        gid_T = None if group_ids is None else group_ids.reshape(-1)
        aux = self.aux_losses(d, chosen_TK, noisy_TE, mask_T, gid_T)
        aux_loss = (
            torch.stack(list(aux.values())).sum()
            if aux
            else torch.zeros((), device=x.device, dtype=torch.float32)
        )
        st = self.stats(d, chosen_TK)
        if c.router == "sigmoid" and self.training and c.bias_update_rate > 0:
            # DeepSeek-V3: the bias follows the load of the batch just routed, outside autograd
            with torch.no_grad():
                self.router.bias_E.copy_(
                    L.sigmoid_bias_update(
                        self.router.bias_E, st.tokens_per_expert, c.bias_update_rate
                    )
                )
        return MoEOutput(y_TD.reshape(*lead, c.d_model), aux_loss, aux, st, d.detach())

    # ---------------------------------------------------------------- accounting
    def param_counts(self) -> tuple[int, int]:
        """``(total, active_per_token)`` parameter counts.

        Active = router + shared experts + k routed experts, where k = ``top_k`` for the
        top-k routers and for ``expert_choice`` (its average experts per token when the
        capacity factor is 1), and k = E for ``dense``.
        """
        total = sum(p.numel() for p in self.parameters())
        per_expert = (self.experts.w_in_EDH.numel() + self.experts.w_out_EFD.numel()) // max(
            1, self.config.num_experts
        )
        k = self.config.num_experts if self.config.router == "dense" else self.config.top_k
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared else 0
        return total, self.router.weight.numel() + shared + k * per_expert

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"D={c.d_model}, F={c.d_ff}, E={c.num_experts}, k={c.top_k}, router={c.router}, "
            f"capacity_factor={c.capacity_factor}, shared={c.num_shared_experts}, impl={c.impl}"
        )


__all__ = ["MoEConfig", "MoE", "MoEOutput", "MoEStats", "IMPLS"]


def model_param_counts(model: nn.Module) -> tuple[int, int]:
    """``(total, active per token)`` parameters of any model holding ``MoE`` layers.

    Each MoE layer reports its own whole-layer counts (router + shared + top-k experts
    active), so under expert parallelism — each rank holding a slice of the experts — this
    still counts the full model; every other parameter is active.
    """
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    local = sum(p.numel() for p in model.parameters())
    rest = local - sum(p.numel() for m in moes for p in m.parameters())
    counts = [m.param_counts() for m in moes]
    return rest + sum(t for t, _ in counts), rest + sum(a for _, a in counts)
