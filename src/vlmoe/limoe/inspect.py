"""`vlmoe inspect` on contrastive (LIMoE) checkpoints: the modality picture of the paper.

The model is run over image–text pairs (default: the easy-VQA test images with their
captions, then the held-out test emoji with their names); every MoE block routes both
modalities' tokens in one pool, and per block this reports, per expert, how many image patches
and how many words it takes (first choices), the share of its tokens that are text, the words
it takes most and example patches; per modality the mean routing entropy (each token's, the
"local" entropy the LIMoE loss lowers), the entropy of the mean load (the "global" one it
keeps above log S) and how many experts take ≥ 5% of the modality's tokens (text collapse).

Files in --out: modality.png (bars per expert and block), patches.png (example patches per
expert), report.md, report.html (pictures inline) and routing.json.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmoe.data.pairs import PairSet, concat_pairs, iterate_pair_batches

#: an expert "takes" a modality when it gets at least this share of the modality's tokens
TAKES_SHARE = 0.05
PATCHES_PER_EXPERT = 8


def load_summary(counts_E: list[float] | np.ndarray) -> dict[str, Any]:
    """Of one modality's tokens per expert [E]: "share" [E], "experts_taking" (experts with
    ≥ 5% of the tokens: 1 = collapsed onto one expert), "load_entropy" (nats, of the share;
    log E = uniform) and "top_share" (the largest share)."""
    c = np.asarray(counts_E, dtype=np.float64)
    share = c / max(c.sum(), 1e-12)
    nz = share[share > 0]
    return {
        "share": [round(float(s), 4) for s in share],
        "experts_taking": int((share >= TAKES_SHARE).sum()),
        "load_entropy": round(float(-(nz * np.log(nz)).sum()), 4),
        "top_share": round(float(share.max()) if len(share) else 0.0, 4),
    }


class _Layer:
    """What one MoE block did over all batches: first-choice counts per modality and expert,
    the sum of per-token entropies, words per expert and example patches per expert."""

    def __init__(self, E: int) -> None:
        self.E = E
        self.counts = {"vision": np.zeros(E), "text": np.zeros(E)}
        self.entropy = {"vision": 0.0, "text": 0.0}
        self.words: list[Counter[str]] = [Counter() for _ in range(E)]
        self.patches: list[list[tuple[int, int]]] = [[] for _ in range(E)]

    def add(self, rec: Any, batch: Any, words: list[str], offset: int) -> None:
        """One `RoutingRecord` of a batch whose rows start at pair ``offset``."""
        first = rec.routing.indices[:, 0].cpu()
        probs = rec.routing.probs.float().cpu()
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(1)
        keep = first >= 0  # dropped tokens (capacity) have no expert
        m = rec.modality
        self.counts[m] += np.bincount(first[keep].numpy(), minlength=self.E)
        self.entropy[m] += float(ent.sum())
        where = rec.token_index.cpu()
        if m == "text":
            ids = batch.input_ids.cpu()[where[:, 0], where[:, 1]]
            for e, i in zip(first[keep].tolist(), ids[keep].tolist(), strict=True):
                self.words[e][words[i]] += 1
            return
        for e, (b, p) in zip(first[keep].tolist(), where[keep].tolist(), strict=True):
            if len(self.patches[e]) < 50_000:  # the examples are picked evenly from these
                self.patches[e].append((offset + b, p))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in ("vision", "text"):
            n = self.counts[m].sum()
            out[m] = {"tokens": int(n), "mean_token_entropy": round(self.entropy[m] / max(n, 1), 4),
                      **load_summary(self.counts[m])}  # fmt: skip
        tot = self.counts["vision"] + self.counts["text"]
        out["experts"] = [
            {"expert": e, "image_tokens": int(self.counts["vision"][e]),
             "text_tokens": int(self.counts["text"][e]),
             "text_share_of_expert": round(float(self.counts["text"][e] / max(tot[e], 1)), 4),
             "top_words": [w for w, _ in self.words[e].most_common(8)]}
            for e in range(self.E)
        ]  # fmt: skip
        return out


def route_pairs(model: torch.nn.Module, tokenizer: Any, pairs: PairSet, max_len: int,
                batch_size: int, device: str) -> dict[int, _Layer]:  # fmt: skip
    """Run ``model`` over ``pairs`` (both modalities, joint routing); {block: _Layer}."""
    words = [""] * tokenizer.vocab_size
    for w, i in tokenizer.vocab().items():
        words[i] = w
    layers: dict[int, _Layer] = {}
    offset = 0
    model.eval()
    with torch.no_grad():
        for b in iterate_pair_batches(pairs, tokenizer, batch_size, shuffle=False, max_len=max_len):
            out = model(b.to(device))
            for rec in out.routing:
                E = rec.routing.probs.shape[1]
                layers.setdefault(rec.layer, _Layer(E)).add(rec, b, words, offset)
            offset += len(b)
    return layers


def _inspect_pairs(ck: Any, data: str | None, split: str, limit: int | None) -> PairSet:
    """The pairs to route: a JSONL file's, or the split's easy-VQA captions + emoji."""
    from vlmoe.data.pairs import contrastive_splits, load_pairs_jsonl
    from vlmoe.validate import EASYVQA_NAMES

    cfg = ck.config
    spec = data or cfg.data
    if spec.lower() not in EASYVQA_NAMES:
        pairs = load_pairs_jsonl(spec, cfg.model.image_size)
    else:
        sets = contrastive_splits(cfg.pairs, cfg.model.image_size, cfg.train.data_seed, cfg.train.val_fraction)  # fmt: skip
        split = "val" if split == "train" else split
        pairs = concat_pairs(*[sets[k] for k in (f"{split}_zero_shot", f"{split}_retrieval") if k in sets])  # fmt: skip
    return pairs.subset(range(min(len(pairs), limit))) if limit else pairs


def inspect_contrastive(checkpoint: str | Path, data: str | None = None, split: str = "test",
                        out: str | Path | None = None, limit: int | None = None,
                        batch_size: int = 256, device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Analyse a contrastive checkpoint's routing and write the files of this module's
    docstring into ``out`` (default CHECKPOINT/inspect); returns routing.json's content.
    A checkpoint without MoE blocks (the dense twin) raises CheckpointError."""
    from vlmoe.checkpoint import CheckpointError
    from vlmoe.limoe.task import load_contrastive

    ck = load_contrastive(checkpoint, device)
    if not ck.config.model.moe_layers:
        raise CheckpointError(f"{ck.path}: a dense model (no MoE block): no routing to inspect")
    pairs = _inspect_pairs(ck, data, split, limit)
    layers = route_pairs(ck.model, ck.tokenizer, pairs, ck.config.model.max_text_len, batch_size, device)  # fmt: skip
    folder = Path(out) if out is not None else ck.path / "inspect"
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": {"checkpoint": str(ck.path), "data": pairs.source, "pairs": len(pairs),
                 "out": str(folder), "takes_share": TAKES_SHARE},
        "layers": {f"layer{i}": layers[i].summary() for i in sorted(layers)},
    }  # fmt: skip
    result["findings"] = findings(result["layers"])
    plot_modality(result["layers"], folder / "modality.png")
    plot_expert_patches(layers, pairs, ck.config.model.patch_size, folder / "patches.png")
    _write_reports(result, folder)
    return result


def findings(layers: dict[str, Any]) -> list[str]:
    """One line per block: text spread, image spread, and modality-specialised experts."""
    out = []
    for name, s in layers.items():
        v, t = s["vision"], s["text"]
        mostly_text = sum(e["text_share_of_expert"] >= 0.5 for e in s["experts"])
        out.append(
            f"{name}: text on {t['experts_taking']} of {len(t['share'])} experts (load entropy "
            f"{t['load_entropy']:.2f} nats of max {math.log(len(t['share'])):.2f}), images on "
            f"{v['experts_taking']}; {mostly_text} expert(s) take more words than patches"
        )
    return out


def plot_modality(layers: dict[str, Any], path: Path) -> Path:
    """modality.png: per block, each expert's share of all image tokens and of all text
    tokens (side-by-side bars), the uniform share dashed."""
    from vlmoe.analysis.plots import DPI, plt

    fig, axes = plt.subplots(len(layers), 1, figsize=(7.5, 2.6 * len(layers)), squeeze=False)
    for ax, (name, s) in zip(axes[:, 0], layers.items(), strict=True):
        E = len(s["vision"]["share"])
        x = np.arange(E)
        ax.bar(x - 0.2, s["vision"]["share"], 0.4, label="image patches", color="#4c78a8")
        ax.bar(x + 0.2, s["text"]["share"], 0.4, label="words", color="#f58518")
        ax.axhline(1 / E, ls="--", color="gray", lw=1)
        ax.set_xticks(x)
        ax.set_ylabel("share of modality")
        ax.set_title(f"{name}: where each modality's tokens go (first choice)")
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return path


def plot_expert_patches(layers: dict[int, _Layer], pairs: PairSet, patch: int, path: Path) -> Path:  # fmt: skip
    """patches.png: per block and expert, up to 8 image patches it took (spread over the
    pairs routed), enlarged; an empty row is an expert that took no patch."""
    from vlmoe.analysis.plots import DPI, expert_colors, plt

    rows = [(i, e) for i in sorted(layers) for e in range(layers[i].E)]
    g = pairs.images.shape[-1] // patch
    fig, axes = plt.subplots(len(rows), PATCHES_PER_EXPERT, squeeze=False,
                             figsize=(PATCHES_PER_EXPERT * 0.8, len(rows) * 0.85))  # fmt: skip
    for r, (i, e) in enumerate(rows):
        pool = layers[i].patches[e]
        step = len(pool) / PATCHES_PER_EXPERT
        picks = [pool[int(k * step)] for k in range(PATCHES_PER_EXPERT)] if step >= 1 else pool
        for c in range(PATCHES_PER_EXPERT):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_color(expert_colors(layers[i].E)[e])
            if c < len(picks):
                n, p = picks[c]
                y, x = divmod(p, g)
                tile = pairs.images[n, :, y * patch : (y + 1) * patch, x * patch : (x + 1) * patch]
                ax.imshow(tile.permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(f"L{i} e{e}", rotation=0, ha="right", va="center", fontsize=8)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def _write_reports(result: dict[str, Any], folder: Path) -> None:
    """report.md, report.html (the PNGs inline) and routing.json."""
    from vlmoe.analysis.report import to_html, to_markdown

    m = result["meta"]
    doc: list[tuple] = [("h1", "vlmoe inspect: LIMoE routing by modality"),
                        ("p", f"`{m['checkpoint']}` on {m['data']} ({m['pairs']} pairs)."),
                        ("ul", result["findings"])]  # fmt: skip
    for name, s in result["layers"].items():
        v, t = s["vision"], s["text"]
        doc.append(("h2", name))
        doc.append(("p", f"images: {v['tokens']} tokens, mean token entropy "
                    f"{v['mean_token_entropy']:.3f}, load entropy {v['load_entropy']:.3f}; text: "
                    f"{t['tokens']} tokens, mean token entropy {t['mean_token_entropy']:.3f}, "
                    f"load entropy {t['load_entropy']:.3f} (nats)."))  # fmt: skip
        rows = [[str(e["expert"]), f"{v['share'][e['expert']]:.1%}", f"{t['share'][e['expert']]:.1%}",
                 f"{e['text_share_of_expert']:.1%}", ", ".join(e["top_words"])]
                for e in s["experts"]]  # fmt: skip
        doc.append(("table", ["expert", "of image tokens", "of text tokens", "text share of expert", "top words"], rows))  # fmt: skip
    doc += [("img", "modality.png", "share of each modality per expert"),
            ("img", "patches.png", "example patches per expert")]  # fmt: skip
    (folder / "report.md").write_text(to_markdown(doc))
    (folder / "report.html").write_text(to_html(doc, folder, "vlmoe LIMoE routing report"))
    (folder / "routing.json").write_text(json.dumps(result, indent=1))


def run_inspect(args: argparse.Namespace) -> int:
    """`vlmoe inspect` for a contrastive checkpoint (the arguments of `vlmoe.inspect`)."""
    from vlmoe.cli import parse_device

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    res = inspect_contrastive(args.checkpoint, args.data, args.split, args.out,
                              args.max_questions, args.batch_size, parse_device(args.device))  # fmt: skip
    m = res["meta"]
    if args.json:
        print(json.dumps({"out": m["out"], "pairs": m["pairs"], "layers": res["layers"],
                          "findings": res["findings"]}))  # fmt: skip
        return 0
    print(f"{m['data']}: {m['pairs']} pairs, {len(res['layers'])} MoE blocks")
    for line in res["findings"]:
        print("  - " + line)
    print(f"report: {Path(m['out']) / 'report.html'} (and report.md, modality.png, patches.png, routing.json)")  # fmt: skip
    return 0
