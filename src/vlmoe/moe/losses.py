"""Auxiliary losses of MoE routers (and the sigmoid router's bias rule): one implementation each.

Shape legend:
    T  tokens      E  experts      K  routing slots per token      G  token groups

Every loss is written as a function of *sums over tokens* (``*_from`` finishers: token counts,
probability sums, entropy sums …). The plain functions (``load_balance_loss`` …) compute those
sums over the tokens they are given; ``aux_losses`` computes all of them at once and, under
expert parallelism, sums them over every process holding tokens (one differentiable
all-reduce, ``reduce=``) before finishing — so the loss a W-process run optimises is the loss
the 1-process run computes on the concatenated batch, from the same code.

Every loss takes an optional boolean ``mask_T`` (True = token counts, e.g. not padding, or
"is an image token") so a caller can apply it to a subset of tokens; the entropy losses also
take ``group_ids_T`` (e.g. 0 = image, 1 = text) and then average the per-group losses over the
groups present, as LIMoE applies them per modality. All return a 0-dim fp32 tensor and are
unweighted; ``aux_losses`` multiplies them by the config weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: sums a 1-D tensor over the processes that hold tokens (identity for one process)
Reduce = Callable[[Tensor], Tensor]


def _select(mask_T: Tensor | None, *ts: Tensor) -> tuple[Tensor, ...]:
    if mask_T is None:
        return ts
    return tuple(t[mask_T] for t in ts)


def _cv_squared(v_E: Tensor) -> Tensor:
    # squared coefficient of variation, population std (V-MoE / Shazeer 2017)
    return v_E.var(unbiased=False) / v_E.mean().pow(2).clamp_min(1e-20)


def _entropy(p_XE: Tensor) -> Tensor:
    # 0·log 0 = 0: clamp inside the log only, so exact zeros contribute nothing
    return -(p_XE * p_XE.clamp_min(1e-30).log()).sum(-1)


def _counts(indices_TK: Tensor, E: int, dtype: torch.dtype) -> Tensor:
    flat = indices_TK.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=E).to(dtype)


def _load_probs(clean_TE: Tensor, noisy_TE: Tensor, noise_std: float, top_k: int) -> Tensor:
    """P(e ∈ top-k of token t under fresh noise) [T, E] (Riquelme et al. 2021, A.2.2)."""
    threshold_T1 = torch.topk(noisy_TE.float(), top_k, dim=-1).values[:, -1:]
    z_TE = (threshold_T1 - clean_TE.float()) / noise_std
    return 1.0 - 0.5 * (1.0 + torch.erf(z_TE / math.sqrt(2.0)))


# ---------------------------------------------------------------- finishers over token sums


def load_balance_from(counts_E: Tensor, psum_E: Tensor, T: Tensor) -> Tensor:
    """``E · Σ_e f_e · P_e`` from assignment counts (no gradient) and probability sums."""
    f_E = counts_E.detach() / counts_E.detach().sum().clamp_min(1)
    return counts_E.shape[0] * (f_E * psum_E / T.clamp_min(1)).sum()


def importance_from(psum_E: Tensor) -> Tensor:
    """``CV(Σ_t p[t, :])²``."""
    return _cv_squared(psum_E)


def z_loss_from(zsum: Tensor, T: Tensor) -> Tensor:
    """Mean of ``logsumexp(logits)²`` from its sum."""
    return zsum / T.clamp_min(1)


def load_from(load_sum_E: Tensor, T: Tensor) -> Tensor:
    """``CV(mean_t P(e ∈ top-k))²`` from the per-expert sums of those probabilities."""
    return _cv_squared(load_sum_E / T.clamp_min(1))


def local_entropy_from(hsum_G: Tensor, count_G: Tensor) -> Tensor:
    """Mean token entropy per group, averaged over the groups that have tokens."""
    present = count_G.detach() > 0
    return (hsum_G[present] / count_G.detach()[present]).mean()


def global_entropy_from(psum_GE: Tensor, count_G: Tensor, threshold: float | None) -> Tensor:
    """``−min(H(mean_t p), threshold)`` per group, averaged over groups with tokens."""
    present = count_G.detach() > 0
    h_G = _entropy(psum_GE[present] / count_G.detach()[present, None])
    if threshold is not None:
        h_G = h_G.clamp_max(threshold)
    return -h_G.mean()


# ---------------------------------------------------------------- the plain functions


def load_balance_loss(probs_TE: Tensor, indices_TK: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Switch Transformer load-balance loss ``E · Σ_e f_e · P_e``.

    ``f_e`` = fraction of the (non -1) token-expert assignments that go to e (a count, no
    gradient), ``P_e`` = mean router probability of e. Normalising f over assignments makes a
    perfectly balanced router score exactly 1.0 for any top-k (Switch's top-1 definition).
    Pass the router's choice *before* capacity drops, as Switch does.
    """
    probs_TE, indices_TK = _select(mask_T, probs_TE, indices_TK)
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    p = probs_TE.float()
    T = p.new_tensor(float(p.shape[0]))
    return load_balance_from(_counts(indices_TK, p.shape[-1], p.dtype), p.sum(0), T)


def z_loss(logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)²``."""
    (logits_TE,) = _select(mask_T, logits_TE)
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros((), dtype=torch.float32)
    z = torch.logsumexp(logits_TE.float(), dim=-1).pow(2).sum()
    return z_loss_from(z, z.new_tensor(float(logits_TE.shape[0])))


def importance_loss(probs_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """V-MoE importance loss: ``CV(Σ_t p[t, :])²`` (population std / mean, squared)."""
    (probs_TE,) = _select(mask_T, probs_TE)
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros((), dtype=torch.float32)
    return importance_from(probs_TE.float().sum(0))


def load_loss(
    clean_logits_TE: Tensor,
    noisy_logits_TE: Tensor,
    noise_std: float,
    top_k: int,
    mask_T: Tensor | None = None,
) -> Tensor:
    """V-MoE load loss: ``CV(Σ_t P(e ∈ top-k of token t under fresh noise))²``.

    The threshold per token is its k-th largest *noisy* logit; expert e wins if its clean
    logit plus fresh noise exceeds it: ``P = 1 − Φ((threshold − clean_e) / noise_std)``
    (Riquelme et al. 2021, A.2.2). Differentiable in the clean logits.
    """
    clean_logits_TE, noisy_logits_TE = _select(mask_T, clean_logits_TE, noisy_logits_TE)
    if clean_logits_TE.shape[0] == 0 or noise_std <= 0:
        return clean_logits_TE.new_zeros((), dtype=torch.float32)
    p_TE = _load_probs(clean_logits_TE, noisy_logits_TE, noise_std, top_k)
    return load_from(p_TE.sum(0), p_TE.new_tensor(float(p_TE.shape[0])))


def _group_sums(probs_TE: Tensor, gid_T: Tensor, G: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per group: token count [G], entropy sum [G], probability sum [G, E]."""
    p = probs_TE.float()
    count_G = torch.bincount(gid_T, minlength=G).to(p.dtype)
    hsum_G = p.new_zeros(G).index_add(0, gid_T, _entropy(p))
    psum_GE = p.new_zeros(G, p.shape[1]).index_add(0, gid_T, p)
    return count_G, hsum_G, psum_GE


def _local_groups(probs_TE: Tensor, group_ids_T: Tensor | None) -> tuple[Tensor, int]:
    if group_ids_T is None:
        return torch.zeros(probs_TE.shape[0], dtype=torch.long, device=probs_TE.device), 1
    uniq, inv_T = torch.unique(group_ids_T, return_inverse=True)
    return inv_T, max(1, uniq.numel())


def local_entropy_loss(
    probs_TE: Tensor, mask_T: Tensor | None = None, group_ids_T: Tensor | None = None
) -> Tensor:
    """LIMoE local entropy: mean over tokens of ``H(p[t, :])`` (low = confident routing).

    With ``group_ids_T`` the mean is taken per group, then averaged over groups present.
    """
    probs_TE, *g = _select(mask_T, probs_TE, *(() if group_ids_T is None else (group_ids_T,)))
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros((), dtype=torch.float32)
    gid_T, G = _local_groups(probs_TE, g[0] if g else None)
    count_G, hsum_G, _ = _group_sums(probs_TE, gid_T, G)
    return local_entropy_from(hsum_G, count_G)


def global_entropy_loss(
    probs_TE: Tensor,
    mask_T: Tensor | None = None,
    group_ids_T: Tensor | None = None,
    threshold: float | None = None,
) -> Tensor:
    """LIMoE global entropy: ``−H(mean_t p[t, :])`` (low = experts used evenly overall).

    ``threshold`` (nats, e.g. ``log(min_experts)``) caps the entropy that is rewarded:
    ``−min(H, threshold)``, so the loss stops pushing once the marginal is spread enough
    (LIMoE's soft minimum number of experts). Per group + averaged with ``group_ids_T``.
    """
    probs_TE, *g = _select(mask_T, probs_TE, *(() if group_ids_T is None else (group_ids_T,)))
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros((), dtype=torch.float32)
    gid_T, G = _local_groups(probs_TE, g[0] if g else None)
    count_G, _, psum_GE = _group_sums(probs_TE, gid_T, G)
    return global_entropy_from(psum_GE, count_G, threshold)


# ---------------------------------------------------------------- all of them, reducible


def _token_sums(
    c: Any, probs_TE: Tensor, logits_TE: Tensor, chosen_TK: Tensor, noisy_TE: Tensor | None,
    gid_T: Tensor, G: int,
) -> dict[str, Tensor]:  # fmt: skip
    """Every sum over tokens that the enabled losses of config ``c`` need, 1-D each."""
    p = probs_TE.float()
    E = p.shape[-1]
    sums: dict[str, Tensor] = {"T": p.new_tensor([float(p.shape[0])])}
    if c.load_balance_weight > 0 or c.importance_weight > 0:
        sums["psum_E"] = p.sum(0)
    if c.load_balance_weight > 0 and c.router != "expert_choice":
        sums["counts_E"] = _counts(chosen_TK, E, p.dtype)
    if c.z_loss_weight > 0:
        sums["z"] = torch.logsumexp(logits_TE.float(), dim=-1).pow(2).sum().reshape(1)
    std = (1.0 / c.num_experts) if c.noise_std is None else c.noise_std
    if c.load_weight > 0 and std > 0:
        noisy = logits_TE if noisy_TE is None else noisy_TE
        sums["load_E"] = _load_probs(logits_TE, noisy, std, c.top_k).sum(0)
    if c.local_entropy_weight > 0 or c.global_entropy_weight > 0:
        count_G, hsum_G, psum_GE = _group_sums(p, gid_T, G)
        sums.update(count_G=count_G, hsum_G=hsum_G, psum_GE=psum_GE.reshape(-1))
    return sums


def _finish(c: Any, g: dict[str, Tensor], E: int) -> dict[str, Tensor]:
    """The weighted losses of config ``c`` from (reduced) token sums ``g``."""
    T = g["T"][0]
    out: dict[str, Tensor] = {}
    if T <= 0:
        return {n: T.new_zeros(()) for n in _enabled(c)}
    if "counts_E" in g:
        out["load_balance"] = c.load_balance_weight * load_balance_from(
            g["counts_E"], g["psum_E"], T
        )
    if c.z_loss_weight > 0:
        out["z_loss"] = c.z_loss_weight * z_loss_from(g["z"][0], T)
    if c.importance_weight > 0:
        out["importance"] = c.importance_weight * importance_from(g["psum_E"])
    if c.load_weight > 0:
        ld = load_from(g["load_E"], T) if "load_E" in g else T.new_zeros(())
        out["load"] = c.load_weight * ld
    if c.local_entropy_weight > 0:
        out["local_entropy"] = c.local_entropy_weight * local_entropy_from(
            g["hsum_G"], g["count_G"]
        )
    if c.global_entropy_weight > 0:
        psum_GE = g["psum_GE"].view(-1, E)
        h = global_entropy_from(psum_GE, g["count_G"], c.global_entropy_threshold)
        out["global_entropy"] = c.global_entropy_weight * h
    return out


def _enabled(c: Any) -> list[str]:
    names = {"load_balance": c.load_balance_weight > 0 and c.router != "expert_choice",
             "z_loss": c.z_loss_weight > 0, "importance": c.importance_weight > 0,
             "load": c.load_weight > 0, "local_entropy": c.local_entropy_weight > 0,
             "global_entropy": c.global_entropy_weight > 0}  # fmt: skip
    return [n for n, on in names.items() if on]


def aux_losses(
    c: Any,
    probs_TE: Tensor,
    logits_TE: Tensor,
    chosen_TK: Tensor,
    noisy_logits_TE: Tensor | None = None,
    mask_T: Tensor | None = None,
    group_ids_T: Tensor | None = None,
    reduce: Reduce | None = None,
    reduce_max: Callable[[int], int] | None = None,
) -> dict[str, Tensor]:
    """Every auxiliary loss enabled in ``c`` (an ``MoEConfig``), each times its weight.

    ``reduce`` sums the packed token sums over processes (expert parallelism; differentiable)
    and ``reduce_max`` takes the max of an int over them (the number of groups); with neither,
    this is the loss on this process's tokens. Under ``reduce`` group ids must be ints ≥ 0.
    """
    ts = (probs_TE, logits_TE, chosen_TK) + (() if noisy_logits_TE is None else (noisy_logits_TE,))
    ts += () if group_ids_T is None else (group_ids_T,)
    sel = list(_select(mask_T, *ts))
    probs_TE, logits_TE, chosen_TK = sel[:3]
    noisy = sel[3] if noisy_logits_TE is not None else None
    gids = sel[-1] if group_ids_T is not None else None
    if reduce is None:
        gid_T, G = _local_groups(probs_TE, gids)
    else:
        gid_T = torch.zeros_like(probs_TE[:, 0], dtype=torch.long) if gids is None else gids.long()
        if gid_T.numel() and int(gid_T.min()) < 0:
            raise ValueError("group_ids: expert-parallel entropy losses need ids >= 0")
        local_max = int(gid_T.max()) if gid_T.numel() else -1
        G = max(1, (reduce_max(local_max) if reduce_max else local_max) + 1)
    sums = _token_sums(c, probs_TE, logits_TE, chosen_TK, noisy, gid_T, G)
    if reduce is not None:
        names, sizes = list(sums), [v.numel() for v in sums.values()]
        flat = reduce(torch.cat([sums[n].reshape(-1) for n in names]))
        sums = dict(zip(names, torch.split(flat, sizes), strict=True))
    return _finish(c, sums, probs_TE.shape[-1])


@torch.no_grad()
def sigmoid_bias_update(bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3 auxiliary-loss-free balancing: ``b_e += rate · sign(mean load − load_e)``.

    Overloaded experts get their selection bias lowered, underloaded ones raised. Returns the
    new bias (the input is not modified); ``MoE`` applies it in place to its buffer after
    every training forward.
    """
    load_E = tokens_per_expert_E.to(bias_E.dtype)
    return bias_E + rate * torch.sign(load_E.mean() - load_E)
