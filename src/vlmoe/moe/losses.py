"""Auxiliary losses of MoE routers, as plain functions (and the sigmoid router's bias rule).

Shape legend:
    T  tokens      E  experts      K  routing slots per token      G  token groups

Every loss takes an optional boolean ``mask_T`` (True = token counts, e.g. not padding, or
"is an image token") so a caller can apply it to a subset of tokens; the entropy losses also
take ``group_ids_T`` (e.g. 0 = image, 1 = text) and then average the per-group losses over the
groups present, as LIMoE applies them per modality. All return a 0-dim fp32 tensor and are
unweighted; ``MoE`` multiplies them by the config weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _select(mask_T: Tensor | None, *ts: Tensor) -> tuple[Tensor, ...]:
    if mask_T is None:
        return ts
    return tuple(t[mask_T] for t in ts)


def _cv_squared(v_E: Tensor) -> Tensor:
    # squared coefficient of variation, population std (V-MoE / Shazeer 2017)
    return v_E.var(unbiased=False) / v_E.mean().pow(2).clamp_min(1e-20)


def load_balance_loss(probs_TE: Tensor, indices_TK: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Switch Transformer load-balance loss ``E · Σ_e f_e · P_e``.

    ``f_e`` = fraction of the (non -1) token-expert assignments that go to e (a count, no
    gradient), ``P_e`` = mean router probability of e. Normalising f over assignments makes a
    perfectly balanced router score exactly 1.0 for any top-k (Switch's top-1 definition).
    Pass the router's choice *before* capacity drops, as Switch does.
    """
    probs_TE, indices_TK = _select(mask_T, probs_TE, indices_TK)
    E = probs_TE.shape[-1]
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    flat = indices_TK.reshape(-1)
    counts_E = torch.bincount(flat[flat >= 0], minlength=E).to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    P_E = probs_TE.float().mean(0)
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)²``."""
    (logits_TE,) = _select(mask_T, logits_TE)
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


def importance_loss(probs_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """V-MoE importance loss: ``CV(Σ_t p[t, :])²`` (population std / mean, squared)."""
    (probs_TE,) = _select(mask_T, probs_TE)
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros((), dtype=torch.float32)
    return _cv_squared(probs_TE.float().sum(0))


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
    threshold_T1 = torch.topk(noisy_logits_TE.float(), top_k, dim=-1).values[:, -1:]
    z_TE = (threshold_T1 - clean_logits_TE.float()) / noise_std
    p_TE = 1.0 - 0.5 * (1.0 + torch.erf(z_TE / math.sqrt(2.0)))
    return _cv_squared(p_TE.mean(0))


def _entropy(p_XE: Tensor) -> Tensor:
    # 0·log 0 = 0: clamp inside the log only, so exact zeros contribute nothing
    return -(p_XE * p_XE.clamp_min(1e-30).log()).sum(-1)


def _groups(group_ids_T: Tensor) -> tuple[Tensor, int]:
    uniq, inv_T = torch.unique(group_ids_T, return_inverse=True)
    return inv_T, uniq.numel()


def local_entropy_loss(
    probs_TE: Tensor, mask_T: Tensor | None = None, group_ids_T: Tensor | None = None
) -> Tensor:
    """LIMoE local entropy: mean over tokens of ``H(p[t, :])`` (low = confident routing).

    With ``group_ids_T`` the mean is taken per group, then averaged over groups present.
    """
    probs_TE, *g = _select(mask_T, probs_TE, *(() if group_ids_T is None else (group_ids_T,)))
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros((), dtype=torch.float32)
    h_T = _entropy(probs_TE.float())
    if not g:
        return h_T.mean()
    inv_T, G = _groups(g[0])
    sums_G = h_T.new_zeros(G).index_add(0, inv_T, h_T)
    return (sums_G / torch.bincount(inv_T, minlength=G)).mean()


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
    p = probs_TE.float()
    if not g:
        marg_GE = p.mean(0, keepdim=True)
    else:
        inv_T, G = _groups(g[0])
        marg_GE = p.new_zeros(G, p.shape[1]).index_add(0, inv_T, p)
        marg_GE = marg_GE / torch.bincount(inv_T, minlength=G)[:, None]
    h_G = _entropy(marg_GE)
    if threshold is not None:
        h_G = h_G.clamp_max(threshold)
    return -h_G.mean()


@torch.no_grad()
def sigmoid_bias_update(bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3 auxiliary-loss-free balancing: ``b_e += rate · sign(mean load − load_e)``.

    Overloaded experts get their selection bias lowered, underloaded ones raised. Returns the
    new bias (the input is not modified); ``MoE`` applies it in place to its buffer after
    every training forward.
    """
    load_E = tokens_per_expert_E.to(bias_E.dtype)
    return bias_E + rate * torch.sign(load_E.mean() - load_E)
