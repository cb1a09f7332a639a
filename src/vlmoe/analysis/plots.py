"""Routing analysis, the pictures (matplotlib, Agg backend; one PNG per function).

Every expert has one colour everywhere (`expert_colors`): the bars of `load.png`, the patch
maps and word boxes of `patches.png`. Expert ids are per FFN — vision expert 3 of layer 1 and
text expert 3 of layer 1 are different experts that share a colour only by index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (also safe on machines without a display)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, to_rgba  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

DPI = 110


def expert_colors(num_experts: int) -> list[tuple[float, float, float, float]]:
    """A fixed qualitative colour per expert id (tab10 up to 10 experts, tab20 up to 20,
    then evenly spaced hues)."""
    if num_experts <= 10:
        base = plt.get_cmap("tab10").colors
    elif num_experts <= 20:
        base = plt.get_cmap("tab20").colors
    else:
        base = [plt.get_cmap("hsv")(i / num_experts) for i in range(num_experts)]
    return [to_rgba(c) for c in base[:num_experts]]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def plot_load(ffns: dict[str, Any], path: Path) -> Path:
    """load.png: per MoE FFN, bars of each expert's share of token assignments (all top-k),
    dots for its share of first choices, and the uniform share as a dashed line. Rows are
    layers, columns modalities."""
    layers = sorted({f["layer"] for f in ffns.values()})
    mods = [m for m in ("vision", "text") if any(f["modality"] == m for f in ffns.values())]
    mods += sorted({f["modality"] for f in ffns.values()} - set(mods))
    fig, axes = plt.subplots(
        len(layers), len(mods), figsize=(5.2 * len(mods), 2.9 * len(layers)), squeeze=False
    )
    for r, layer in enumerate(layers):
        for c, mod in enumerate(mods):
            ax = axes[r][c]
            f = ffns.get(f"layer{layer}.{mod}")
            if f is None:
                ax.axis("off")
                ax.text(0.5, 0.5, f"layer {layer} {mod}: dense FFN", ha="center", va="center")
                continue
            E = f["num_experts"]
            x = np.arange(E)
            share, top1 = np.asarray(f["share"]), np.asarray(f["share_top1"])
            ax.bar(x, share, color=expert_colors(E), edgecolor="black", linewidth=0.5)
            ax.plot(x, top1, "o", color="black", ms=4)
            ax.axhline(1 / E, ls="--", color="grey", lw=1)
            for e in f["dead"]:
                ax.annotate(
                    "dead",
                    (e, share[e]),
                    xytext=(0, 4),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                    color="red",
                )
            ax.set_xticks(x)
            ax.set_xlabel("expert")
            ax.set_ylabel("share of tokens")
            ax.set_ylim(0, max(0.3, float(max(share.max(), top1.max())) * 1.2))
            ax.set_title(
                f"layer {layer} · {mod}: imbalance {f['imbalance']:.2f}, "
                f"entropy {f['entropy']:.2f}/{f['entropy_max']:.2f} nats",
                fontsize=9,
            )
            ax.grid(axis="y", alpha=0.3)
    k = max(f["top_k"] for f in ffns.values())
    handles = [
        Patch(
            facecolor="lightgrey",
            edgecolor="black",
            label=f"all top-{k} assignments (bar colour = expert)",
        ),
        plt.Line2D([], [], marker="o", ls="", color="black", ms=4, label="first choices (top-1)"),
        plt.Line2D([], [], ls="--", color="grey", label="uniform share 1/E"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Expert load per MoE FFN (bars: share of all assignments; dots: of first choices)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def plot_specialization(ffns: dict[str, Any], variables: tuple[str, ...], path: Path) -> Path:
    """specialization.png: NMI between the top-1 expert and each variable, one bar per FFN,
    with the random-routing (permutation) baseline as a black tick on each bar."""
    names = list(ffns)
    present = [v for v in variables if any(v in f["specialization"] for f in ffns.values())]
    n = len(names)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(min(14.0, 2.0 + len(present) * (0.5 + 0.3 * n)), 4.6))
    palette = plt.get_cmap("Set2").colors
    for i, name in enumerate(names):
        spec = ffns[name]["specialization"]
        for j, var in enumerate(present):
            if var not in spec:
                continue
            s = spec[var]
            x = j - 0.4 + width * (i + 0.5)
            hatch = "//" if s.get("by_construction") else None
            ax.bar(
                x,
                s["nmi"],
                width * 0.92,
                color=palette[i % len(palette)],
                hatch=hatch,
                edgecolor="black",
                linewidth=0.4,
                alpha=0.55 if hatch else 1.0,
            )
            ax.plot([x - width * 0.45, x + width * 0.45], [s["baseline"]] * 2, color="black", lw=2)
            ax.text(
                x,
                s["nmi"] + 0.01,
                f"{s['nmi']:.2f}",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if n > 4 else 0,
            )
    ax.set_xticks(range(len(present)))
    ticks = [v.replace(" within ", "\nwithin ") for v in present]
    ax.set_xticklabels([t + ("\n(by construction)" if t == "modality" else "") for t in ticks])
    ax.set_ylabel("normalised mutual information")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.5, len(present) - 0.5)
    ax.grid(axis="y", alpha=0.3)
    handles = [
        Patch(facecolor=palette[i % len(palette)], edgecolor="black", label=nm)
        for i, nm in enumerate(names)
    ]
    handles.append(
        plt.Line2D([], [], color="black", lw=2, label="random routing (permutation baseline)")
    )
    ax.legend(handles=handles, fontsize=8, loc="upper right", ncol=2)
    ax.set_title("What the chosen (top-1) expert tells about each token property")
    fig.tight_layout()
    return _save(fig, path)


@dataclass
class Sample:
    """One example for patches.png: the image, the question, answers, and per MoE FFN the
    top-1 experts (vision: grid [g, g], -1 = dropped; text: list of (word, expert))."""

    image: np.ndarray  # uint8 [3, S, S]
    question: str
    answer: str
    predicted: str
    vision: dict[str, np.ndarray]
    text: dict[str, list[tuple[str, int]]]


def _expert_map(
    ax: plt.Axes,
    image: np.ndarray | None,
    grid: np.ndarray,
    E: int,
    alpha: float,
    numbers: bool,
    share: np.ndarray | None = None,
) -> None:
    g = grid.shape[0]
    if image is not None:
        gray = image.astype(np.float32).mean(0)
        ax.imshow(gray, cmap="gray", extent=(0, g, g, 0), vmin=0, vmax=255, interpolation="nearest")
    cmap = ListedColormap(expert_colors(E))
    rgba = cmap(
        np.clip(grid, 0, E - 1) / max(E - 1, 1) if E > 1 else np.zeros_like(grid, dtype=float)
    )
    rgba[..., 3] = alpha if share is None else alpha * np.clip(share, 0, 1)
    rgba[grid < 0] = (1, 1, 1, 0.9)  # dropped: white
    ax.imshow(rgba, extent=(0, g, g, 0), interpolation="nearest")
    if image is not None:
        # outline what differs from the border colour (the object), so it stays visible
        fg = (np.abs(image.astype(np.int16) - _border_color(image)[:, None, None]) > 24).any(0)
        if fg.any() and not fg.all():
            S = image.shape[-1]
            xs = (np.arange(S) + 0.5) * g / S
            ax.contour(xs, xs, fg.astype(float), levels=[0.5], colors="black", linewidths=1.0)
    if numbers and g <= 10:
        for (r, c), e in np.ndenumerate(grid):
            ax.text(
                c + 0.5, r + 0.5, "×" if e < 0 else str(e), ha="center", va="center", fontsize=6
            )
    ax.set_xticks([])
    ax.set_yticks([])


def _border_color(image: np.ndarray) -> np.ndarray:
    """The most common colour on the image border, int16 [3]."""
    b = np.concatenate([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], axis=1)
    colors, counts = np.unique(b.T.astype(np.int16), axis=0, return_counts=True)
    return colors[counts.argmax()]


def _word_boxes(ax: plt.Axes, rows: list[tuple[str, list[tuple[str, int]]]], E: int) -> None:
    """Draw each row 'label: word word …' with every word boxed in its expert's colour."""
    ax.axis("off")
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    colors = expert_colors(E)
    y = 0.92
    for label, words in rows:
        t = ax.text(0.0, y, label, transform=ax.transAxes, fontsize=7, va="top", weight="bold")
        y -= 0.1
        x = 0.02
        for word, e in words:
            fc = (1, 1, 1, 1) if e < 0 else colors[e]
            t = ax.text(
                x,
                y,
                word,
                transform=ax.transAxes,
                fontsize=7,
                va="top",
                bbox={
                    "boxstyle": "round,pad=0.2",
                    "facecolor": fc,
                    "alpha": 0.75,
                    "edgecolor": "none",
                },
            )
            bb = t.get_window_extent(renderer).transformed(ax.transAxes.inverted())
            x = bb.x1 + 0.03
            if x > 0.92:
                x, y = 0.02, y - 0.11
        y -= 0.15


def plot_patches(
    samples: list[Sample],
    dataset_maps: dict[str, dict[str, Any]],
    num_experts: dict[str, int],
    path: Path,
) -> Path:
    """patches.png: a first row with the whole data set's most common expert per patch (opacity
    = the share it takes there); then one row per sample: the image, per vision MoE FFN the
    image with each patch coloured by its top-1 expert, and the question's words boxed in the
    colour of their text expert (one line per text MoE FFN)."""
    vnames = [n for n in num_experts if n.endswith(".vision")]
    tnames = [n for n in num_experts if n.endswith(".text")]
    widths = [1.0] * (1 + len(vnames)) + ([2.2] if tnames else [])
    nrows = 1 + len(samples)
    fig, axes = plt.subplots(
        nrows,
        len(widths),
        figsize=(2.0 * sum(widths), 2.05 * nrows),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    _dataset_row(axes[0], dataset_maps, num_experts, vnames, tnames)
    for i, s in enumerate(samples, start=1):
        _sample_row(axes[i], i, s, num_experts, vnames, tnames)
    E = max(num_experts.values())
    handles = [
        Patch(facecolor=c, edgecolor="black", label=f"expert {e}")
        for e, c in enumerate(expert_colors(E))
    ]
    fig.legend(
        handles=handles, loc="lower center", ncol=min(E, 10), fontsize=8, bbox_to_anchor=(0.5, 0.0)
    )
    fig.suptitle(
        "Which expert each patch and word goes to (top-1; colour = expert id within its MoE FFN)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.035, 1, 0.98))
    return _save(fig, path)


def _dataset_row(
    head: np.ndarray,
    dataset_maps: dict[str, dict[str, Any]],
    num_experts: dict[str, int],
    vnames: list[str],
    tnames: list[str],
) -> None:
    """patches.png's first row (axes `head`: a caption, one map per vision FFN, the text
    column's key): each patch coloured by the data set's most common expert there, opaque in
    proportion to its share. A vision FFN missing from `dataset_maps` leaves a blank panel."""
    head[0].axis("off")
    head[0].text(
        0.5,
        0.5,
        "whole data set:\nmost common\nexpert per patch\n(opacity = its share)",
        ha="center",
        va="center",
        fontsize=8,
    )
    for j, name in enumerate(vnames, start=1):
        m = dataset_maps.get(name)
        if m is None:
            head[j].axis("off")
            continue
        _dataset_map(head[j], name, m, num_experts[name])
    if tnames:
        head[-1].axis("off")
        head[-1].text(
            0.0,
            0.5,
            "words boxed in the colour of their top-1 text expert\n"
            "(one line per text MoE layer; white = dropped)",
            fontsize=8,
            va="center",
        )


def _dataset_map(ax: plt.Axes, name: str, m: dict[str, Any], E: int) -> None:
    """One vision FFN's map of the whole data set, titled `name`: `m` holds, per patch position
    P = g·g, the most common top-1 expert ("expert") and the share it takes there ("share")."""
    P = len(m["expert"])
    g = int(round(P**0.5))
    _expert_map(
        ax,
        None,
        np.asarray(m["expert"]).reshape(g, g),
        E,
        1.0,
        numbers=True,
        share=np.asarray(m["share"]).reshape(g, g),
    )
    ax.set_title(f"{name}", fontsize=8)


def _sample_row(
    row: np.ndarray,
    i: int,
    s: Sample,
    num_experts: dict[str, int],
    vnames: list[str],
    tnames: list[str],
) -> None:
    """Row `i` (1-based) of patches.png for one sample, on axes `row`: the image titled with
    gold and predicted answers, per vision FFN its patches' top-1 experts over the image (FFN
    names as titles on row 1 only), and the question's words boxed by text expert."""
    row[0].imshow(np.transpose(s.image, (1, 2, 0)), interpolation="nearest")
    row[0].set_xticks([])
    row[0].set_yticks([])
    row[0].set_ylabel(f"#{i}", rotation=0, labelpad=12, fontsize=8)
    ok = "✓" if s.predicted == s.answer else "✗"
    row[0].set_title(f"gold {s.answer} · model {s.predicted} {ok}", fontsize=7)
    for j, name in enumerate(vnames, start=1):
        _expert_map(row[j], s.image, s.vision[name], num_experts[name], 0.6, numbers=True)
        if i == 1:
            row[j].set_title(f"{name} (top-1)", fontsize=8)
    if tnames:
        rows = [(n, s.text.get(n, [])) for n in tnames]
        _word_boxes(row[-1], rows, max(num_experts[n] for n in tnames))
        row[-1].set_title(f"“{s.question}”", fontsize=8, loc="left")
