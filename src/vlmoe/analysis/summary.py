"""Routing analysis, assembled: turn the per-FFN traces into the numbers of `routing.json` and
a few plain-language findings.

Specialisation variables (token labels the top-1 expert is compared with):

    modality       per layer: vision vs text token, against the layer's combined choice
                   "(expert set, expert)". VL-MoE gives each modality its own experts, so the
                   choice determines the modality *by construction* — reported, flagged
                   `by_construction`, and not read as a finding.
    question kind  yes/no, color, shape, … of the token's question
    answer         the token's question's gold answer
    answer within kind   the same, beyond what the question kind already tells (conditional
                   mutual information I(expert; answer | kind)): a yes/no question implies a
                   yes/no answer, so `answer` alone also credits specialisation by kind
    word           text tokens: the word itself ([CLS] included)
    position       vision: patch index in the grid; text: word position
    patch content  vision: background / edge / object patch (`stats.patch_content`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmoe.analysis.stats import (
    PATCH_CONTENT_NAMES,
    FFNTrace,
    conditional_specialization,
    contingency,
    encode_labels,
    load_stats,
    patch_content,
    specialization,
)
from vlmoe.data import VQASplit, WordTokenizer

VARIABLES = (
    "modality",
    "question kind",
    "answer",
    "answer within kind",
    "word",
    "position",
    "patch content",
)
#: NMI above its random baseline by at least this much is called a finding
MEANINGFUL = 0.05


def analyse(
    traces: dict[str, FFNTrace],
    split: VQASplit,
    tokenizer: WordTokenizer,
    *,
    patch_size: int,
    permutations: int = 5,
    seed: int = 0,
    top_words: int = 8,
) -> dict[str, Any]:
    """All numbers of the report (JSON-ready): {"ffns": {name: …}, "modality": {layer: …},
    "text_experts": {name: [...]}, "position_mode": {name: …}, "findings": [str]}."""
    split_labels = _SplitLabels.of(split, tokenizer, patch_size)
    ffns: dict[str, Any] = {}
    text_experts: dict[str, Any] = {}
    position_mode: dict[str, Any] = {}
    for name, tr in traces.items():
        expert, labels = _token_labels(tr, split_labels)
        ffns[name] = _ffn_entry(tr, expert, labels, split_labels, permutations, seed)
        E = tr.num_experts
        if tr.modality == "vision":
            P = int(split_labels.content_NP.shape[1])
            position_mode[name] = _position_mode(expert, labels["position"], E, P)
        if "word" in labels:
            text_experts[name] = _text_experts(
                expert, labels["word"], E, split_labels.id_to_word, top_words
            )
    modality = _modality_by_construction(traces, ffns, permutations, seed)
    return {
        "ffns": ffns,
        "modality": modality,
        "text_experts": text_experts,
        "position_mode": position_mode,
        "findings": findings(ffns),
    }


@dataclass(frozen=True)
class _SplitLabels:
    """The split's labels, encoded once and shared by every FFN (Q questions, N images,
    P patches per image)."""

    kind_Q: np.ndarray  # int64 [Q]: code of each question's kind
    kind_names: list[str]  # the kinds, indexed by code
    answer_Q: np.ndarray  # int64 [Q]: code of each question's gold answer
    content_NP: np.ndarray  # int8 [N, P]: 0 background, 1 edge, 2 object (`patch_content`)
    image_Q: np.ndarray  # [Q]: row of each question's image in split.images
    id_to_word: dict[int, str]  # token id → word

    @classmethod
    def of(cls, split: VQASplit, tokenizer: WordTokenizer, patch_size: int) -> _SplitLabels:
        """Encode `split`'s kinds and answers, its images' patch content at `patch_size`, and
        the tokenizer's vocabulary."""
        kind_Q, kind_names = encode_labels(split.kinds)
        # the answer strings are in the split; their codes suffice for the numbers
        answer_Q, _ = encode_labels(split.answers)
        return cls(
            kind_Q=kind_Q,
            kind_names=kind_names,
            answer_Q=answer_Q,
            content_NP=patch_content(split.images, patch_size),
            image_Q=split.image_index.numpy(),
            id_to_word={i: w for w, i in tokenizer.vocab().items()},
        )


def _token_labels(
    tr: FFNTrace, split_labels: _SplitLabels
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The kept (not dropped) tokens of one FFN: their top-1 expert, int64 [T], and their
    labels, each [T]: "question kind", "answer", "position", plus "word" (text FFNs that
    recorded words) or "patch content" (vision FFNs)."""
    keep = tr.top1 >= 0
    expert = tr.top1[keep].astype(np.int64)
    q = tr.question[keep]
    pos = tr.position[keep].astype(np.int64)
    labels: dict[str, np.ndarray] = {
        "question kind": split_labels.kind_Q[q],
        "answer": split_labels.answer_Q[q],
        "position": pos,
    }
    if tr.modality == "text" and tr.word is not None:
        labels["word"] = tr.word[keep]
    if tr.modality == "vision":
        image = split_labels.image_Q[q]
        labels["patch content"] = split_labels.content_NP[image, pos].astype(np.int64)
    return expert, labels


def _ffn_entry(
    tr: FFNTrace,
    expert: np.ndarray,
    labels: dict[str, np.ndarray],
    split_labels: _SplitLabels,
    permutations: int,
    seed: int,
) -> dict[str, Any]:
    """routing.json's entry of one FFN: its load numbers, the specialisation on each label (in
    VARIABLES order; "modality" is added later, per layer) and the top-1 expert's counts per
    question kind and, for vision, per patch content."""
    E = tr.num_experts
    spec = specialization(expert, labels, E, permutations=permutations, seed=seed)
    spec["answer within kind"] = conditional_specialization(
        expert, labels["answer"], labels["question kind"], permutations=permutations, seed=seed
    )
    kind_names = split_labels.kind_names
    entry: dict[str, Any] = {
        "layer": tr.layer,
        "modality": tr.modality,
        "num_experts": E,
        "top_k": tr.top_k,
        **load_stats(tr),
        "specialization": {v: spec[v] for v in VARIABLES if v in spec},
        "by_kind": {
            "values": kind_names,
            "counts": contingency(expert, labels["question kind"], E, len(kind_names)).tolist(),
        },
    }
    if "patch content" in labels:
        entry["by_content"] = {
            "values": list(PATCH_CONTENT_NAMES),
            "counts": contingency(expert, labels["patch content"], E, 3).tolist(),
        }
    return entry


def _modality_by_construction(
    traces: dict[str, FFNTrace], ffns: dict[str, Any], permutations: int, seed: int
) -> dict[str, Any]:
    """{"layerL": specialisation on modality} for each layer with both a vision and a text MoE
    FFN, measured on the layer's combined choice (expert set, expert) and flagged
    `by_construction`. The same entry is put first in both FFNs' "specialization" (in place,
    keeping VARIABLES order)."""
    modality: dict[str, Any] = {}
    for layer in sorted({tr.layer for tr in traces.values()}):
        v, t = traces.get(f"layer{layer}.vision"), traces.get(f"layer{layer}.text")
        if v is None or t is None:
            continue
        ev, et = v.top1[v.top1 >= 0].astype(np.int64), t.top1[t.top1 >= 0].astype(np.int64)
        combined = np.concatenate([ev, et + v.num_experts])
        mod = np.concatenate([np.zeros(ev.size, np.int64), np.ones(et.size, np.int64)])
        s = specialization(
            combined,
            {"modality": mod},
            v.num_experts + t.num_experts,
            permutations=permutations,
            seed=seed,
        )["modality"]
        s["by_construction"] = True
        s["note"] = (
            "vision and text tokens have separate expert sets in VL-MoE, so the chosen expert "
            "tells the modality completely (u_label = 1) by construction, not by learning"
        )
        modality[f"layer{layer}"] = s
        for name in (v.name, t.name):
            spec = {"modality": s, **ffns[name]["specialization"]}
            ffns[name]["specialization"] = {k: spec[k] for k in VARIABLES if k in spec}
    return modality


def _position_mode(expert: np.ndarray, pos: np.ndarray, E: int, P: int) -> dict[str, Any]:
    """The most common top-1 expert at each patch position, and the share it takes there."""
    c = contingency(expert, pos, E, P).astype(np.float64)  # [E, P]
    tot = c.sum(0)
    return {
        "expert": c.argmax(0).tolist(),
        "share": np.divide(c.max(0), tot, out=np.zeros(P), where=tot > 0).tolist(),
    }


def _text_experts(
    expert: np.ndarray, word: np.ndarray, E: int, id_to_word: dict[int, str], top: int
) -> list[dict[str, Any]]:
    """Per text expert: its share, the words it takes most often (count, and the share of all
    of that word's tokens that went to it), and the words most over-represented in it
    (lift = P(word | expert) / P(word), among words with at least 5 tokens and ≥ 1% of the
    expert's tokens)."""
    V = int(word.max(initial=-1)) + 1
    c = contingency(expert, word, E, V).astype(np.float64)  # [E, V]
    per_word = c.sum(0)
    total = max(per_word.sum(), 1.0)
    rows = []
    for e in range(E):
        ce = c[e]
        n_e = ce.sum()
        order = np.argsort(-ce, kind="stable")[:top]
        words = [
            {
                "word": id_to_word.get(int(w), f"#{w}"),
                "count": int(ce[w]),
                "of_word": ce[w] / per_word[w],
            }
            for w in order
            if ce[w] > 0
        ]
        over = []
        if n_e > 0:
            lift = (ce / n_e) / np.maximum(per_word / total, 1e-12)
            ok = (ce >= max(5.0, 0.01 * n_e)) & (lift > 1.0)
            cand = np.flatnonzero(ok)
            cand = cand[np.argsort(-lift[cand], kind="stable")][:top]
            over = [
                {
                    "word": id_to_word.get(int(w), f"#{w}"),
                    "count": int(ce[w]),
                    "lift": float(lift[w]),
                }
                for w in cand
            ]
        rows.append(
            {
                "expert": e,
                "tokens": int(n_e),
                "share": n_e / total,
                "top_words": words,
                "over_represented": over,
            }
        )
    return rows


def findings(ffns: dict[str, Any]) -> list[str]:
    """Plain-language bullets read off the numbers (load first, then specialisation)."""
    out = []
    for name, f in ffns.items():
        E = f["num_experts"]
        share = np.asarray(f["share"])
        busiest = int(share.argmax())
        load = (
            f"**{name}**: {E} experts, top-{f['top_k']}; busiest expert {busiest} takes "
            f"{share[busiest]:.1%} of assignments (uniform: {1 / E:.1%}; imbalance "
            f"{f['imbalance']:.2f}, {f['effective_experts']:.1f} effective experts)"
        )
        if f["dead"]:
            load += f"; dead (< 1%): experts {', '.join(map(str, f['dead']))}"
        else:
            load += "; no dead experts"
        if f["dropped"] > 0:
            load += f"; {f['dropped']:.1%} of assignments dropped by capacity"
        if share[busiest] > 0.5:
            load += " — **routing collapse**: one expert takes most tokens"
        spec = {k: v for k, v in f["specialization"].items() if not v.get("by_construction")}
        if "answer within kind" in spec and "question kind" in spec:
            spec.pop("answer")  # its kind part is already counted under "question kind"
        ranked = sorted(spec.items(), key=lambda kv: kv[1]["nmi"] - kv[1]["baseline"], reverse=True)
        if ranked and ranked[0][1]["nmi"] - ranked[0][1]["baseline"] >= MEANINGFUL:
            parts = [
                f"{k} (NMI {v['nmi']:.2f} vs {v['baseline']:.2f} random; "
                f"it explains {v['u_expert']:.0%} of the routing entropy)"
                for k, v in ranked[:3]
                if v["nmi"] - v["baseline"] >= MEANINGFUL
            ]
            load += ". Experts follow " + ", then ".join(parts) + "."
        else:
            load += ". No measured variable explains the routing (every NMI within "
            load += f"{MEANINGFUL} of random)."
        out.append(load)
    return out
