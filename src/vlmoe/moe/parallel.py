"""Expert parallelism over ``torch.distributed``: experts sharded, tokens moved by all-to-all.

Shape legend:
    T  local tokens (this rank's, flattened)      D  model dim      H  2F (SwiGLU) or F
    E  routed experts (global)                    El experts held by this rank (E / W)
    W  ranks in the expert-parallel group         K  routing slots per token
    S  token-expert assignments this rank sends   R  assignments this rank receives

Layout: rank r of the EP group holds experts ``[r·El, (r+1)·El)``. The router, the shared
experts and everything outside the MoE layer are data parallel (replicated or sharded with
FSDP2, see ``vlmoe.parallel_engine``).

One forward of ``ExpertParallelMoE`` (GShard / DeepSpeed-MoE / torchtitan dropless EP):

    1. route locally (replicated router)                      → indices_TK, weights_TK
    2. sort the kept assignments by global expert             → x_SD (grouped by dest rank)
    3. all_to_all the per-expert counts [E]                   → recv counts [W, El]
    4. all_to_all the token rows, variable splits             → x_RD (grouped by source rank)
    5. permute to local-expert order, ``grouped_ffn`` on El experts, permute back
    6. all_to_all the results back (reverse splits)           → y_SD
    7. combine with the router weights (index_add), exactly as ``grouped_experts`` does

Steps 4 and 6 are differentiable (``_AllToAll``: the backward is the reverse all-to-all), so
an expert's weight gradient collects the contributions of every rank's tokens.

Gradient convention. Every collective here differentiates the *sum over ranks* of the ranks'
losses, J = Σ_r L_r. With data-parallel ranks each computing a mean loss on its shard,
L_global = J / W, so the caller must scale every gradient by 1/W: the replicated parameters
get that from the usual DP all-reduce-mean, the expert parameters (never all-reduced: each
exists once) by a plain ``grad /= W`` — ``vlmoe.parallel_engine.Engine`` (FSDP2 +
``finish_gradients``) does both.

Auxiliary losses and statistics use *global* batch statistics (Megatron-LM's and torchtitan's
choice): the token counts, probability sums and log-sum-exps that the balancing losses average
over tokens are summed over the EP group first (one small differentiable all-reduce per
layer), so every rank gets the value the single-process layer computes on the concatenated
batch, and the gradient (after the 1/W above) equals the single-process gradient. The
alternative — balancing each rank's micro-batch on its own — is a different, stricter loss
whose value depends on the number of processes.

Dropless semantics are unchanged: nothing is dropped by the parallel path. With a
``capacity_factor`` the capacity (and the drop order) is computed per rank on its local T
tokens, i.e. each rank's batch is one GShard "group"; ``expert_choice`` likewise picks tokens
within each rank's batch. Only dropless token-choice routing is process-count invariant.

Works with no process group at all (W = 1: every collective is skipped), on gloo (CPU
tensors) and on NCCL (CUDA tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .experts import grouped_ffn, sort_by_expert
from .layer import MoE, MoEConfig, MoEStats
from .routing import RoutingDecision

__all__ = [
    "A2AStats",
    "ExpertParallelMoE",
    "ShardedExperts",
    "all_reduce_sum",
    "all_to_all",
    "expert_parallel",
    "gather_experts",
]


# --------------------------------------------------------------------------------------------
# process-group helpers
# --------------------------------------------------------------------------------------------


def _local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (differentiable), else ``t``.

    ``vlmoe.parallel_engine`` turns expert weights into DTensor parameters (Shard(0) on the
    expert-parallel mesh) so that checkpoints reshard; the dispatch below works on the shard.
    """
    return t.to_local() if isinstance(t, DTensor) else t


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class A2AStats:
    """Bytes this rank sent through all-to-all (forward and backward), and the number of calls.

    Tokens sent to experts on the same rank are counted too (they go through the collective);
    ``remote_bytes`` leaves them out. Reset with ``reset()``.
    """

    bytes: int = 0
    remote_bytes: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes = self.remote_bytes = self.calls = 0

    def add(self, t: Tensor, splits: list[int], rank: int) -> None:
        row = t[0].numel() * t.element_size() if t.shape[0] else 0
        self.bytes += sum(splits) * row
        self.remote_bytes += (sum(splits) - splits[rank]) * row
        self.calls += 1


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; the backward sends gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats):  # type: ignore[override]
        ctx.group, ctx.out_splits, ctx.in_splits, ctx.stats = group, out_splits, in_splits, stats
        return _a2a(x, out_splits, in_splits, group, stats)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        gx = _a2a(g, ctx.in_splits, ctx.out_splits, ctx.group, ctx.stats)
        return gx, None, None, None, None


def _a2a(
    x: Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup | None,
    stats: A2AStats | None,
) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if stats is not None:
        stats.add(x, in_splits, _world(group)[0])
    return out


def all_to_all(
    x: Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup | None = None,
    stats: A2AStats | None = None,
) -> Tensor:
    """Differentiable ``all_to_all_single`` along dim 0: rows ``in_splits[j]`` go to rank j,
    ``out_splits[j]`` rows arrive from rank j. Identity when W = 1."""
    if _world(group)[1] == 1:
        return x
    return _AllToAll.apply(x, out_splits, in_splits, group, stats)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradients (J = Σ_r L_r convention)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable sum of ``x`` over the ranks of ``group`` (identity when W = 1)."""
    if _world(group)[1] == 1:
        return x
    return _AllReduceSum.apply(x, group)


# --------------------------------------------------------------------------------------------
# sharded experts: a drop-in for ``Experts`` whose forward runs the all-to-all dispatch
# --------------------------------------------------------------------------------------------


class ShardedExperts(nn.Module):
    """This rank's slice of E stacked experts: ``w_in_EDH [El, D, H]``, ``w_out_EFD [El, F, D]``.

    Same parameter names as ``Experts`` (so state-dict keys match the single-process layout)
    and the same ``forward(x_TD, indices_TK, weights_TK, impl=..., capacity=...)`` contract,
    but the forward is collective: every rank of ``group`` must call it, with any T (also 0).
    ``impl`` and ``capacity`` are accepted and ignored: drops, if any, were already applied by
    the router, and the local computation is always ``grouped_ffn``.

    ``load_state_dict`` accepts either the local slice or the full ``[E, ...]`` tensors (it
    keeps its own rows), so a single-process checkpoint loads into a sharded model.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "swiglu",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        rank, world = _world(group)
        if num_experts % world:
            raise ValueError(
                f"num_experts: {num_experts} experts cannot be split evenly over {world} "
                "expert-parallel processes"
            )
        self.group, self.ep_rank, self.ep_size = group, rank, world
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.num_local = num_experts // world
        self.first = rank * self.num_local
        self.activation = activation
        h = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in_EDH = nn.Parameter(torch.empty(self.num_local, d_model, h))
        self.w_out_EFD = nn.Parameter(torch.empty(self.num_local, d_ff, d_model))
        self.a2a = A2AStats()
        self._register_load_state_dict_pre_hook(self._slice_full)

    def _slice_full(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("w_in_EDH", "w_out_EFD"):
            t, p = state_dict.get(prefix + name), getattr(self, name)
            if t is None or isinstance(t, DTensor):
                continue  # a DTensor already says which rows are whose
            if t.shape[0] == self.num_experts != self.num_local:
                t = t[self.first : self.first + self.num_local]
            if isinstance(p, DTensor):  # plain rows into a DTensor parameter
                t = DTensor.from_local(t.to(p.dtype), p.device_mesh, p.placements, run_check=False)
            state_dict[prefix + name] = t

    def extra_repr(self) -> str:
        return (
            f"experts {self.first}..{self.first + self.num_local - 1} of {self.num_experts} "
            f"(rank {self.ep_rank}/{self.ep_size})"
        )

    def forward(
        self,
        x_TD: Tensor,
        indices_TK: Tensor,
        weights_TK: Tensor,
        impl: str = "grouped",
        capacity: int | None = None,
    ) -> Tensor:
        """``y_TD = Σ_k weights_TK[:, k] · FFN_{indices_TK[:, k]}(x_TD)`` with the FFNs spread
        over the group; -1 slots skipped. Collective."""
        del impl, capacity
        W, El, E = self.ep_size, self.num_local, self.num_experts
        K = indices_TK.shape[1]
        order_S, counts_E, _ = sort_by_expert(indices_TK, E)
        tok_S = order_S // K
        x_SD = x_TD.index_select(0, tok_S)
        w_in_EDH, w_out_EFD = _local(self.w_in_EDH), _local(self.w_out_EFD)
        if W == 1:
            y_SD = grouped_ffn(x_SD, counts_E, w_in_EDH, w_out_EFD, self.activation)
        else:
            # 3. counts first: rank j learns how many rows of each of its experts come from us
            recv_counts = torch.empty_like(counts_E)
            dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=self.group)
            recv_WL = recv_counts.view(W, El)
            # one host sync for all split sizes (a D2H copy on CUDA)
            in_splits, out_splits = torch.stack(
                [counts_E.view(W, El).sum(1), recv_WL.sum(1)]
            ).tolist()
            # 4. tokens out, grouped by destination rank
            x_RD = all_to_all(x_SD, out_splits, in_splits, self.group, self.a2a)
            # 5. source-major [W, El] blocks → expert-major [El, W] blocks for grouped_ffn
            perm_R = _block_transpose(recv_WL)
            y_RD = grouped_ffn(
                x_RD.index_select(0, perm_R),
                recv_WL.sum(0),
                w_in_EDH,
                w_out_EFD,
                self.activation,
            )
            y_RD = y_RD.index_select(0, torch.argsort(perm_R))
            # 6. results back to the ranks that own the tokens
            y_SD = all_to_all(y_RD, in_splits, out_splits, self.group, self.a2a)
        # 7. combine exactly as grouped_experts does (same order of accumulation)
        w_S = weights_TK.reshape(-1).index_select(0, order_S).to(y_SD.dtype)
        return torch.zeros_like(x_TD).index_add(0, tok_S, y_SD * w_S[:, None])


def _block_transpose(counts_WL: Tensor) -> Tensor:
    """Row permutation taking rows laid out in blocks (w, l) row-major (w outer) to blocks in
    (l, w) order (l outer), block (w, l) holding ``counts_WL[w, l]`` rows."""
    W, El = counts_WL.shape
    flat = counts_WL.reshape(-1)
    src_start = torch.cumsum(flat, 0) - flat  # start of block (w, l) in the received layout
    cnt_LW = counts_WL.t().reshape(-1)
    start_LW = src_start.view(W, El).t().reshape(-1)
    n = int(flat.sum())
    dst_start = torch.cumsum(cnt_LW, 0) - cnt_LW
    within = torch.arange(n, device=flat.device) - torch.repeat_interleave(dst_start, cnt_LW)
    return torch.repeat_interleave(start_LW, cnt_LW) + within


# --------------------------------------------------------------------------------------------
# the expert-parallel MoE layer
# --------------------------------------------------------------------------------------------


class ExpertParallelMoE(MoE):
    """An ``MoE`` whose routed experts are sharded over ``group`` (default: the whole world).

    Same forward contract as ``MoE`` (``x [..., D] -> MoEOutput``), and collective: every rank
    of the group calls it once per layer call, with its own tokens (T may differ per rank).
    ``aux_loss``/``aux_losses`` and ``stats`` are computed from global (group-wide) batch
    statistics, so they equal the single-process layer's on the concatenated batch and are
    identical on every rank. ``output`` holds this rank's tokens.

    Construction: ``ExpertParallelMoE(config, group)`` initialises like ``MoE(config)`` under
    the same RNG state and keeps this rank's expert rows; ``ExpertParallelMoE.from_moe(moe)``
    slices an existing layer. ``gather_experts()`` / ``to_moe()`` (collective) give back the
    full weights in the single-process layout.

    ``stats_group`` (default ``group``) is the group whose tokens the auxiliary losses and
    statistics are taken over: with data parallelism beside expert parallelism (several
    expert-parallel groups) set it to the whole world, so the losses stay global-batch ones.
    """

    def __init__(self, config: MoEConfig, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(config)
        full = self.experts
        self.group = self.stats_group = group
        c = config
        self.experts = ShardedExperts(c.num_experts, c.d_model, c.d_ff, c.activation, group)
        self.experts.load_state_dict(full.state_dict())

    @classmethod
    def from_moe(cls, moe: MoE, group: dist.ProcessGroup | None = None) -> ExpertParallelMoE:
        """Slice a single-process ``moe`` (same weights on every rank) into this rank's part.

        Router, selection bias and shared experts are copied; the new module is on the same
        device and dtype as ``moe`` and in the same train/eval mode. Consumes no RNG.
        """
        with torch.random.fork_rng(devices=[]):
            ep = cls.__new__(cls)
            MoE.__init__(ep, moe.config)  # cheap at any size that fits in one process
        ep.group = ep.stats_group = group
        c = moe.config
        ep.experts = ShardedExperts(c.num_experts, c.d_model, c.d_ff, c.activation, group)
        p = moe.experts.w_in_EDH
        ep.to(device=p.device, dtype=p.dtype)
        ep.load_state_dict(moe.state_dict())
        ep.train(moe.training)
        return ep

    @torch.no_grad()
    def gather_experts(self) -> dict[str, Tensor]:
        """The full ``{"w_in_EDH": [E, D, H], "w_out_EFD": [E, F, D]}`` on every rank.
        Collective."""
        return gather_experts(self.experts)

    def to_moe(self) -> MoE:
        """A single-process ``MoE`` with the full weights (collective; result on every rank)."""
        full = self.gather_experts()
        with torch.random.fork_rng(devices=[]):
            moe = MoE(self.config)
        p = _local(self.experts.w_in_EDH)
        moe.to(device=p.device, dtype=p.dtype)
        sd = {k: v for k, v in self.state_dict().items() if not k.startswith("experts.")}
        sd.update({f"experts.{k}": v for k, v in full.items()})
        moe.load_state_dict(sd)
        moe.train(self.training)
        return moe

    # ------------------------------------------------------------ global losses & stats
    def aux_losses(
        self,
        d: RoutingDecision,
        chosen_TK: Tensor,
        noisy_logits_TE: Tensor | None = None,
        mask_T: Tensor | None = None,
        group_ids_T: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The enabled auxiliary losses on global batch statistics (see the module docstring).

        Same definitions as ``vlmoe.moe.losses`` (tested equal at W = 1 and against the
        single-process layer at W = 2); one differentiable all-reduce for all of them.
        """
        return global_aux_losses(self.config, d, chosen_TK, noisy_logits_TE, mask_T,
                                 group_ids_T, self.stats_group)  # fmt: skip

    @torch.no_grad()
    def stats(self, d: RoutingDecision, chosen_TK: Tensor) -> MoEStats:
        """``MoEStats`` over the whole group's batch (one all-reduce)."""
        E = self.config.num_experts
        flat = d.indices.reshape(-1)
        tpe_E = torch.bincount(flat[flat >= 0], minlength=E).float()
        p = d.probs.float()
        ent_sum = -(p * p.clamp_min(1e-30).log()).sum(-1).sum()
        T = float(d.indices.shape[0])
        if self.config.router == "expert_choice":
            lost = (d.indices[:, 0] < 0).float().sum()
            denom = torch.tensor(T, device=tpe_E.device)
        else:
            lost = tpe_E.new_zeros(())
            denom = (chosen_TK >= 0).sum().float()
        v = torch.cat([tpe_E, torch.stack([ent_sum.float(), lost, denom, tpe_E.new_tensor(T)])])
        if _world(self.stats_group)[1] > 1:
            dist.all_reduce(v, group=self.stats_group)
        tpe_E, (ent_sum, lost, denom, T_all) = v[:E], v[E:]
        if self.config.router == "expert_choice":
            dropped = lost / denom.clamp_min(1)
        else:
            dropped = 1.0 - tpe_E.sum() / denom.clamp_min(1)
        entropy = ent_sum / T_all.clamp_min(1)
        imbalance = tpe_E.max() / tpe_E.mean().clamp_min(1e-20)
        return MoEStats(tpe_E, dropped, entropy, imbalance)

    def param_counts(self) -> tuple[int, int]:
        """``(total, active_per_token)`` of the whole (unsharded) layer."""
        total, _ = super().param_counts()  # counts a DTensor expert weight whole, else its rows
        w = (self.experts.w_in_EDH, self.experts.w_out_EFD)
        per_expert = sum(_local(p).numel() for p in w) // self.experts.num_local
        total += self.config.num_experts * per_expert - sum(p.numel() for p in w)
        k = self.config.num_experts if self.config.router == "dense" else self.config.top_k
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared else 0
        return total, self.router.weight.numel() + shared + k * per_expert


@torch.no_grad()
def gather_experts(experts: ShardedExperts) -> dict[str, Tensor]:
    """All-gather a ``ShardedExperts`` into full ``[E, ...]`` tensors (collective)."""
    out = {}
    for name in ("w_in_EDH", "w_out_EFD"):
        w = getattr(experts, name).detach()
        if isinstance(w, DTensor):
            out[name] = w.full_tensor()
            continue
        local = w.contiguous()
        if experts.ep_size == 1:
            out[name] = local.clone()
            continue
        parts = [torch.empty_like(local) for _ in range(experts.ep_size)]
        dist.all_gather(parts, local, group=experts.group)
        out[name] = torch.cat(parts, 0)
    return out


def expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every ``MoE`` submodule of ``model`` by its ``ExpertParallelMoE`` slice, in place
    (returns ``model``; a bare ``MoE`` is converted and returned). Call it on every rank with
    identical weights (same seed or same checkpoint), before creating the optimiser."""
    if isinstance(model, MoE) and not isinstance(model, ExpertParallelMoE):
        return ExpertParallelMoE.from_moe(model, group)
    for name, child in list(model.named_children()):
        if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
            setattr(model, name, ExpertParallelMoE.from_moe(child, group))
        else:
            expert_parallel(child, group)
    return model


# --------------------------------------------------------------------------------------------
# auxiliary losses on global statistics
# --------------------------------------------------------------------------------------------


def _cv_squared(v_E: Tensor) -> Tensor:
    return v_E.var(unbiased=False) / v_E.mean().pow(2).clamp_min(1e-20)


def _entropy(p_XE: Tensor) -> Tensor:
    return -(p_XE * p_XE.clamp_min(1e-30).log()).sum(-1)


def global_aux_losses(
    c: MoEConfig,
    d: RoutingDecision,
    chosen_TK: Tensor,
    noisy_logits_TE: Tensor | None,
    mask_T: Tensor | None,
    group_ids_T: Tensor | None,
    group: dist.ProcessGroup | None,
) -> dict[str, Tensor]:
    """``MoE.aux_losses`` with every mean over tokens taken over all ranks' tokens.

    Each loss is a function of per-expert or per-token sums; those sums are packed into one
    vector and summed over ``group`` by a differentiable all-reduce, then the loss is finished
    locally (identically on every rank). Group ids (LIMoE per-modality entropies) must be
    non-negative ints; groups absent on every rank are ignored, as in the 1-process loss.
    """
    probs_TE, logits_TE = d.probs.float(), d.logits.float()
    E = probs_TE.shape[-1]
    if mask_T is not None:
        probs_TE, logits_TE, chosen_TK = probs_TE[mask_T], logits_TE[mask_T], chosen_TK[mask_T]
        if noisy_logits_TE is not None:
            noisy_logits_TE = noisy_logits_TE[mask_T]
        if group_ids_T is not None:
            group_ids_T = group_ids_T[mask_T]
    T = probs_TE.shape[0]
    parts: dict[str, Tensor] = {"T": probs_TE.new_tensor([float(T)])}
    want_lb = c.load_balance_weight > 0 and c.router != "expert_choice"
    want_ent = c.local_entropy_weight > 0 or c.global_entropy_weight > 0
    if want_lb or c.importance_weight > 0:
        parts["psum_E"] = probs_TE.sum(0)
    if want_lb:
        flat = chosen_TK.reshape(-1)
        parts["counts_E"] = torch.bincount(flat[flat >= 0], minlength=E).to(probs_TE.dtype)
    if c.z_loss_weight > 0:
        parts["z"] = torch.logsumexp(logits_TE, dim=-1).pow(2).sum().reshape(1)
    std = (1.0 / c.num_experts) if c.noise_std is None else c.noise_std
    if c.load_weight > 0 and std > 0:
        noisy = logits_TE if noisy_logits_TE is None else noisy_logits_TE.float()
        thr_T1 = torch.topk(noisy, c.top_k, dim=-1).values[:, -1:]
        z_TE = (thr_T1 - logits_TE) / std
        parts["load_E"] = (1.0 - 0.5 * (1.0 + torch.erf(z_TE / 2**0.5))).sum(0)
    G = 1
    if want_ent:
        if group_ids_T is None:
            gid_T = torch.zeros(T, dtype=torch.long, device=probs_TE.device)
        else:
            gid_T = group_ids_T.long()
            if gid_T.numel() and int(gid_T.min()) < 0:
                raise ValueError("group_ids: expert-parallel entropy losses need ids >= 0")
            gmax = torch.tensor([int(gid_T.max()) if gid_T.numel() else -1],
                                device=probs_TE.device)  # fmt: skip
            if _world(group)[1] > 1:
                dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
            G = max(1, int(gmax) + 1)
        parts["gcount_G"] = torch.bincount(gid_T, minlength=G).to(probs_TE.dtype)
        if c.local_entropy_weight > 0:
            parts["hsum_G"] = probs_TE.new_zeros(G).index_add(0, gid_T, _entropy(probs_TE))
        if c.global_entropy_weight > 0:
            parts["gpsum_GE"] = probs_TE.new_zeros(G, E).index_add(0, gid_T, probs_TE).reshape(-1)
    names = list(parts)
    sizes = [parts[n].numel() for n in names]
    v = all_reduce_sum(torch.cat([parts[n].reshape(-1) for n in names]), group)
    g = dict(zip(names, torch.split(v, sizes), strict=True))
    T_all = g["T"][0]
    zero = probs_TE.new_zeros(())
    out: dict[str, Tensor] = {}
    if want_lb:
        f_E = g["counts_E"].detach() / g["counts_E"].detach().sum().clamp_min(1)
        lb = E * (f_E * g["psum_E"] / T_all.clamp_min(1)).sum() if T_all > 0 else zero
        out["load_balance"] = c.load_balance_weight * lb
    if c.z_loss_weight > 0:
        out["z_loss"] = c.z_loss_weight * (g["z"][0] / T_all if T_all > 0 else zero)
    if c.importance_weight > 0:
        out["importance"] = c.importance_weight * (_cv_squared(g["psum_E"]) if T_all > 0 else zero)
    if c.load_weight > 0:
        ld = _cv_squared(g["load_E"] / T_all) if T_all > 0 and "load_E" in g else zero
        out["load"] = c.load_weight * ld
    if want_ent:
        cnt_G = g["gcount_G"].detach()
        present = cnt_G > 0
        if c.local_entropy_weight > 0:
            ent = (g["hsum_G"][present] / cnt_G[present]).mean() if bool(present.any()) else zero
            out["local_entropy"] = c.local_entropy_weight * ent
        if c.global_entropy_weight > 0:
            if bool(present.any()):
                marg_GE = g["gpsum_GE"].view(G, E)[present] / cnt_G[present, None]
                h_G = _entropy(marg_GE)
                if c.global_entropy_threshold is not None:
                    h_G = h_G.clamp_max(c.global_entropy_threshold)
                ent = -h_G.mean()
            else:
                ent = zero
            out["global_entropy"] = c.global_entropy_weight * ent
    return out
