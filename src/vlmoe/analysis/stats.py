"""Routing analysis, the numbers: record what every MoE FFN chose, then measure load and
specialisation.

Two halves:

* `collect_routing(model, split, ...)` runs the model over a split in batches and keeps, for
  every MoE FFN (layer × modality), one small integer array per token: the top-1 expert, the
  question row, the position (patch index or word position) and, for text, the word id; plus
  running sums (all top-k assignments per expert, router entropy, dropped assignments). The
  result is an `FFNTrace` per FFN — plain numpy, no model needed afterwards.
* Pure functions over those arrays: `load_stats` (shares, entropy, imbalance, dead experts)
  and `specialization` (normalised mutual information between the top-1 expert and a token
  label, beside a permutation baseline). Tests feed them constructed assignments.

Legend: T routed tokens of one FFN, E experts, K top-k slots, Q questions, V label values.

Conventions:
* A token's top-1 expert is `RoutingDecision.indices[t, 0]`; -1 there means capacity dropped
  the token's first choice. Dropped tokens count in `dropped` but are left out of the
  specialisation numbers (they went to no expert).
* Shares count every kept top-k assignment ("share") or only first choices ("share_top1");
  each sums to 1 over the experts of one FFN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlmoe.data import VQASplit, WordTokenizer

DEAD_SHARE = 0.01  #: an expert with less than this share of assignments is "dead"


@dataclass
class FFNTrace:
    """Everything recorded for one MoE FFN over a split (numpy, CPU).

    top1 int16 [T] (-1 = dropped), question int32 [T] (row in the split), position int16 [T]
    (vision: patch index, row-major over the patch grid; text: word position, [CLS] = 0),
    word int32 [T] (text: token id; vision: None). assignments int64 [E]: kept top-k
    assignments per expert; prob_sum float64 [E]: Σ router probabilities (importance);
    entropy_sum: Σ over tokens of H(probs) in nats; dropped_sum: Σ over batches of
    dropped_fraction · tokens (so dropped_sum / tokens is the token-weighted dropped fraction).
    """

    name: str
    layer: int
    modality: str
    num_experts: int
    top_k: int
    top1: np.ndarray
    question: np.ndarray
    position: np.ndarray
    word: np.ndarray | None
    assignments: np.ndarray
    prob_sum: np.ndarray
    entropy_sum: float
    dropped_sum: float

    @property
    def tokens(self) -> int:
        return int(self.top1.shape[0])


@dataclass
class _Acc:
    """Per-FFN accumulator while batches stream by."""

    layer: int
    modality: str
    num_experts: int
    top_k: int
    top1: list[np.ndarray] = field(default_factory=list)
    question: list[np.ndarray] = field(default_factory=list)
    position: list[np.ndarray] = field(default_factory=list)
    word: list[np.ndarray] = field(default_factory=list)
    assignments: torch.Tensor | None = None
    prob_sum: torch.Tensor | None = None
    entropy_sum: float = 0.0
    dropped_sum: float = 0.0


def _record_batch(accs: dict[str, _Acc], batch: Any, out: Any) -> None:
    """Add one batch's routing records to the per-FFN accumulators."""
    qidx_B = batch.question_index.cpu()
    for rec in out.routing:
        d = rec.routing
        E = d.probs.shape[-1]
        acc = accs.get(rec.name)
        if acc is None:
            acc = accs[rec.name] = _Acc(rec.layer, rec.modality, E, int(d.indices.shape[-1]))
        idx_TK = d.indices.cpu()
        tok_T2 = rec.token_index.cpu()
        T = idx_TK.shape[0]
        acc.top1.append(idx_TK[:, 0].to(torch.int16).numpy())
        acc.question.append(qidx_B[tok_T2[:, 0]].to(torch.int32).numpy())
        acc.position.append(tok_T2[:, 1].to(torch.int16).numpy())
        if rec.modality == "text":
            ids = batch.input_ids.cpu()
            acc.word.append(ids[tok_T2[:, 0], tok_T2[:, 1]].to(torch.int32).numpy())
        flat = idx_TK.reshape(-1)
        counts = torch.bincount(flat[flat >= 0], minlength=E)
        psum = d.probs.float().sum(0).cpu().double()
        acc.assignments = counts if acc.assignments is None else acc.assignments + counts
        acc.prob_sum = psum if acc.prob_sum is None else acc.prob_sum + psum
        acc.entropy_sum += float(rec.stats.router_entropy) * T
        acc.dropped_sum += float(rec.stats.dropped_fraction) * T


def collect_routing(
    model: torch.nn.Module,
    split: VQASplit,
    tokenizer: WordTokenizer,
    answers: list[str],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, FFNTrace], np.ndarray]:
    """Run `model` over every question of `split` (through ``vlmoe.evaluate.run_split``, the
    one evaluation loop); return ({ffn name: FFNTrace}, predicted answer index int64 [Q]).
    FFN names are "layer{i}.{modality}", in model order. One process."""
    from vlmoe.evaluate import run_split

    accs: dict[str, _Acc] = {}
    pred_Q, _, _, _ = run_split(model, split, tokenizer, answers, batch_size=batch_size,
                                device=device, on_batch=lambda b, o: _record_batch(accs, b, o))  # fmt: skip
    traces = {}
    for name, a in accs.items():
        traces[name] = FFNTrace(
            name=name,
            layer=a.layer,
            modality=a.modality,
            num_experts=a.num_experts,
            top_k=a.top_k,
            top1=np.concatenate(a.top1),
            question=np.concatenate(a.question),
            position=np.concatenate(a.position),
            word=np.concatenate(a.word) if a.word else None,
            assignments=a.assignments.numpy().astype(np.int64),
            prob_sum=a.prob_sum.numpy(),
            entropy_sum=a.entropy_sum,
            dropped_sum=a.dropped_sum,
        )
    return traces, pred_Q.numpy()


# ----------------------------------------------------------------------------- load


def load_stats(trace: FFNTrace) -> dict[str, Any]:
    """Load numbers of one FFN (all plain Python, JSON-ready).

    share / share_top1: [E] fractions of kept assignments / first choices (each sums to 1);
    importance: [E] mean router probability; entropy: mean router entropy (nats) with its
    maximum log E; dropped: token-weighted dropped fraction; imbalance: max/mean of share;
    effective_experts: exp(entropy of share) (E = perfectly even, 1 = one expert takes all);
    dead: experts under 1% of share.
    """
    E, T = trace.num_experts, max(trace.tokens, 1)
    a = trace.assignments.astype(np.float64)
    share = a / max(a.sum(), 1.0)
    kept = trace.top1[trace.top1 >= 0].astype(np.int64)
    t1 = np.bincount(kept, minlength=E).astype(np.float64)
    share_top1 = t1 / max(t1.sum(), 1.0)
    nz = share[share > 0]
    return {
        "tokens": trace.tokens,
        "share": share.tolist(),
        "share_top1": share_top1.tolist(),
        "importance": (trace.prob_sum / T).tolist(),
        "entropy": trace.entropy_sum / T,
        "entropy_max": math.log(E),
        "dropped": trace.dropped_sum / T,
        "imbalance": float(share.max() / share.mean()) if share.sum() > 0 else float("nan"),
        "effective_experts": float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0,
        "dead": [int(e) for e in np.flatnonzero(share < DEAD_SHARE)],
    }


# ----------------------------------------------------------------------------- information


def _entropy_bits(counts: np.ndarray) -> float:
    n = counts.sum()
    if n <= 0:
        return 0.0
    p = counts[counts > 0] / n
    return float(-(p * np.log2(p)).sum())


def mutual_information(
    x: np.ndarray, y: np.ndarray, nx: int | None = None, ny: int | None = None
) -> tuple[float, float, float]:
    """(I(X;Y), H(X), H(Y)) in bits of two equally long arrays of codes in [0, nx), [0, ny)."""
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    if x.size == 0:
        return 0.0, 0.0, 0.0
    nx = int(x.max()) + 1 if nx is None else nx
    ny = int(y.max()) + 1 if ny is None else ny
    joint = np.bincount(x * ny + y, minlength=nx * ny).reshape(nx, ny).astype(np.float64)
    hx, hy = _entropy_bits(joint.sum(1)), _entropy_bits(joint.sum(0))
    hxy = _entropy_bits(joint.ravel())
    return max(hx + hy - hxy, 0.0), hx, hy


def nmi(x: np.ndarray, y: np.ndarray, nx: int | None = None, ny: int | None = None) -> float:
    """Normalised mutual information 2·I(X;Y) / (H(X) + H(Y)) in [0, 1] (the arithmetic-mean
    normalisation, scikit-learn's default; also known as the V-measure). 1 = each determines
    the other; 0 = independent, or one of them constant. Both constant → 1 (one cluster each,
    scikit-learn's convention)."""
    i, hx, hy = mutual_information(x, y, nx, ny)
    if hx + hy == 0:
        return 1.0
    return min(1.0, 2.0 * i / (hx + hy))


def encode_labels(values: np.ndarray | list) -> tuple[np.ndarray, list]:
    """(codes int64 [N] in [0, V), the V distinct values in sorted order)."""
    uniq, codes = np.unique(np.asarray(values), return_inverse=True)
    return codes.reshape(-1).astype(np.int64), uniq.tolist()


def specialization(
    expert: np.ndarray,
    labels: Mapping[str, np.ndarray],
    num_experts: int,
    *,
    permutations: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """How much the chosen expert tells about each token label.

    expert int [T] (codes in [0, num_experts); drop dropped tokens before calling); labels:
    name → int codes [T]. For each label: nmi (see `nmi`), baseline (mean NMI over
    `permutations` random shuffles of the expert array — what random routing with the same
    expert loads gives on this many tokens; it is > 0 on finite data, most for labels with many
    values), mi_bits, h_expert_bits, h_label_bits, u_label = I/H(label) (share of the label's
    uncertainty the expert removes) and u_expert = I/H(expert) (share of the routing decision
    the label explains; 1 = routing is a function of the label).
    """
    expert = np.asarray(expert, dtype=np.int64)
    coded = {k: encode_labels(v)[0] for k, v in labels.items()}
    out: dict[str, dict[str, float]] = {}
    for k, y in coded.items():
        if y.shape != expert.shape:
            raise ValueError(f"label {k!r}: {y.shape[0]} values for {expert.shape[0]} tokens")
        i, hx, hy = mutual_information(expert, y, num_experts, int(y.max(initial=-1)) + 1)
        out[k] = {
            "nmi": 1.0 if hx + hy == 0 else min(1.0, 2 * i / (hx + hy)),
            "baseline": 0.0,
            "mi_bits": i,
            "h_expert_bits": hx,
            "h_label_bits": hy,
            "u_label": i / hy if hy > 0 else 0.0,
            "u_expert": i / hx if hx > 0 else 0.0,
            "tokens": int(expert.size),
        }
    if permutations > 0 and expert.size:
        rng = np.random.default_rng(seed)
        sums = dict.fromkeys(coded, 0.0)
        for _ in range(permutations):
            shuffled = rng.permutation(expert)  # one shuffle serves every label
            for k, y in coded.items():
                sums[k] += nmi(shuffled, y, num_experts, int(y.max(initial=-1)) + 1)
        for k in coded:
            out[k]["baseline"] = sums[k] / permutations
    return out


def _joint_entropy_bits(*codes: np.ndarray) -> float:
    """H(X1, …, Xn) in bits of equally long integer code arrays."""
    flat = np.zeros(codes[0].shape, dtype=np.int64)
    for c in codes:
        c = np.asarray(c, dtype=np.int64)
        flat = flat * (int(c.max(initial=0)) + 1) + c
    _, counts = np.unique(flat, return_counts=True)
    return _entropy_bits(counts)


def conditional_nmi(
    expert: np.ndarray, label: np.ndarray, given: np.ndarray
) -> tuple[float, float, float]:
    """(normalised I(E;Y|G), I(E;Y|G) bits, H(E|G) bits): what the expert tells about the
    label beyond what `given` already tells — e.g. the answer within a question kind.
    Normalised as 2·I(E;Y|G) / (H(E|G) + H(Y|G)); 0 when either is constant within every G."""
    e, y, g = (np.asarray(a, dtype=np.int64) for a in (expert, label, given))
    if e.size == 0:
        return 0.0, 0.0, 0.0
    hg = _joint_entropy_bits(g)
    heg, hyg, heyg = (
        _joint_entropy_bits(e, g),
        _joint_entropy_bits(y, g),
        _joint_entropy_bits(e, y, g),
    )
    i = max(heg + hyg - heyg - hg, 0.0)
    he, hy = heg - hg, hyg - hg
    return (min(1.0, 2 * i / (he + hy)) if he + hy > 1e-12 else 0.0), i, he


def conditional_specialization(
    expert: np.ndarray,
    label: np.ndarray,
    given: np.ndarray,
    *,
    permutations: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Like one entry of `specialization`, for I(E; label | given). The baseline shuffles the
    expert choices *within* each value of `given`, keeping the expert–given dependence (so it
    is chance given that dependence)."""
    expert = np.asarray(expert, dtype=np.int64)
    label, given = encode_labels(label)[0], encode_labels(given)[0]
    v, i, he = conditional_nmi(expert, label, given)
    base = 0.0
    if permutations > 0 and expert.size:
        rng = np.random.default_rng(seed)
        by_given = np.argsort(given, kind="stable")  # token slots grouped by `given`
        for _ in range(permutations):
            # a random order within each group of `given` (lexsort: last key is primary)
            within = np.lexsort((rng.random(expert.size), given))
            shuffled = np.empty_like(expert)
            shuffled[by_given] = expert[within]
            base += conditional_nmi(shuffled, label, given)[0]
        base /= permutations
    return {
        "nmi": v,
        "baseline": base,
        "mi_bits": i,
        "h_expert_bits": he,
        "u_expert": i / he if he > 0 else 0.0,
        "tokens": int(expert.size),
    }


def contingency(
    expert: np.ndarray, codes: np.ndarray, num_experts: int, num_values: int
) -> np.ndarray:
    """int64 [E, V]: how many tokens of each label value each expert took (top-1)."""
    flat = np.asarray(expert, np.int64) * num_values + np.asarray(codes, np.int64)
    return np.bincount(flat, minlength=num_experts * num_values).reshape(num_experts, num_values)


# ----------------------------------------------------------------------------- patch content


def patch_content(images_N3SS: np.ndarray | torch.Tensor, patch_size: int) -> np.ndarray:
    """int8 [N, P]: 0 = background, 1 = edge, 2 = object, per patch (row-major grid).

    A heuristic made for images of one object on a plain background (easy-VQA): a pixel is
    "object" when its colour differs (by more than 24 of 255 on some channel) from the image's
    most common border colour; a patch is background when none of its pixels is, object when
    all are, edge otherwise. On photos it degrades gracefully into "busy vs plain" patches.
    """
    x = torch.as_tensor(images_N3SS).to(torch.int16)
    N, _, S, _ = x.shape
    border = torch.cat(
        [x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2
    )  # [N,3,4S]
    # most common border colour: pack RGB into one int and take the mode per image
    border = border.to(torch.int64)
    packed = border[:, 0] * 65536 + border[:, 1] * 256 + border[:, 2]
    mode = packed.mode(dim=1).values
    bg = torch.stack([mode // 65536, (mode // 256) % 256, mode % 256], 1).to(torch.int16)  # [N,3]
    fg_NSS = ((x - bg[:, :, None, None]).abs() > 24).any(1)
    g = S // patch_size
    frac = fg_NSS.reshape(N, g, patch_size, g, patch_size).float().mean((2, 4)).reshape(N, g * g)
    content = torch.ones_like(frac, dtype=torch.int8)
    content[frac == 0] = 0
    content[frac == 1] = 2
    return content.numpy()


PATCH_CONTENT_NAMES = ("background", "edge", "object")
