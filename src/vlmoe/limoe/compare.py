"""`vlmoe compare --family contrastive`: LIMoE with and without its entropy losses against the
dense two-tower twin, over seeds, with error bars and a text-collapse measure.

    dense         two towers (image, text), dense FFNs: CLIP at equal active compute
    limoe-noent   one tower, shared expert pool, balance + z-loss only (no entropy losses)
    limoe         the same with the LIMoE per-modality local / global entropy losses

Every variant runs the same steps, data order (a function of the seed), optimiser and
schedule (`vlmoe.compare.run_one` trains each). Reported per variant, mean ± sample std over
seeds: validation contrastive loss, validation zero-shot accuracy (easy-VQA val images over
the 24 captions) and, per MoE block, how the *validation* text tokens spread over the experts
(experts taking ≥ 5% of them, entropy of their load) — text collapse, measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

from vlmoe.compare_runs import mean_std, plot_band, run_one
from vlmoe.config import ConfigError
from vlmoe.limoe.config import LIMoERunConfig, limoe, limoe_dense, limoe_tiny

VARIANTS = ("dense", "limoe-noent", "limoe")
DEFAULT_STEPS = 150
QUICK_STEPS = 6


def compare_base() -> LIMoERunConfig:
    """The `limoe` architecture made small enough for 9 runs on a shared 2-core machine:
    32×32 images (16 patches), D=64, 4 blocks, 8 experts top-1 in blocks 1 and 3, batch 64,
    lr 2e-3, validation every 25 steps."""
    cfg = limoe()
    D = 64
    moe = dataclasses.replace(cfg.model.moe, d_model=D, d_ff=2 * D)
    cfg.model = dataclasses.replace(cfg.model, image_size=32, patch_size=8, stem_channels=16,
                                    d_model=D, d_ff=2 * D, embed_dim=D, moe=moe)  # fmt: skip
    cfg.train = dataclasses.replace(cfg.train, batch_size=64, warmup_steps=20, eval_every=25,
                                    log_every=1, routing_every=25, save_minutes=0)  # fmt: skip
    cfg.preset = "compare-limoe"
    return cfg


def quick_base() -> LIMoERunConfig:
    """`--quick`: `limoe-tiny`, a few steps (tests)."""
    cfg = limoe_tiny()
    cfg.train = dataclasses.replace(cfg.train, eval_every=3, log_every=1, routing_every=3,
                                    warmup_steps=2, save_minutes=0)  # fmt: skip
    cfg.preset = "compare-limoe-quick"
    return cfg


def variant_configs(base: LIMoERunConfig, names: list[str]) -> dict[str, LIMoERunConfig]:
    """One config per variant name (ConfigError for an unknown one)."""
    out = {}
    for name in names:
        if name == "dense":
            cfg = limoe_dense(base)
        elif name in ("limoe", "limoe-noent"):
            cfg = dataclasses.replace(base)
            if name == "limoe-noent":
                moe = dataclasses.replace(base.model.moe, local_entropy_weight=0.0,
                                          global_entropy_weight=0.0)  # fmt: skip
                cfg.model = dataclasses.replace(base.model, moe=moe)
        else:
            raise ConfigError(f"--variants: unknown {name!r}, expected some of {', '.join(VARIANTS)}")  # fmt: skip
        cfg.preset = f"{base.preset}:{name}"
        out[name] = cfg
    return out


def text_spread(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """Per MoE block of a run's checkpoint: the validation text tokens' spread over experts
    (`vlmoe.limoe.inspect.load_summary`) and their mean routing entropy; {} when dense."""
    from vlmoe.data.pairs import concat_pairs
    from vlmoe.limoe.inspect import load_summary, route_pairs
    from vlmoe.limoe.task import load_contrastive, load_pair_sets

    ck = load_contrastive(checkpoint)
    if not ck.config.model.moe_layers:
        return {}
    sets = load_pair_sets(ck.config)
    val = concat_pairs(*[sets[k] for k in ("val_zero_shot", "val_retrieval") if k in sets])
    layers = route_pairs(ck.model, ck.tokenizer, val, ck.config.model.max_text_len, 256, "cpu")
    out = {}
    for i, layer in sorted(layers.items()):
        s = layer.summary()["text"]
        out[f"layer{i}"] = {k: s[k] for k in ("experts_taking", "load_entropy", "top_share",
                                              "mean_token_entropy")}  # fmt: skip
        out[f"layer{i}"]["image_experts_taking"] = load_summary(layer.counts["vision"])["experts_taking"]  # fmt: skip
    return out


def compare_contrastive(base: LIMoERunConfig, out: Path, steps: int, seeds: int,
                        variants: list[str], log: Any) -> dict[str, Any]:  # fmt: skip
    """Train every (seed, variant) for ``steps`` steps; the summary dict (compare.json)."""
    from vlmoe.limoe.task import ContrastiveTask

    t0 = time.time()
    task = ContrastiveTask(base)  # loads the data once: a bad --data fails before training
    per_epoch = task.batches_per_epoch(base.train.batch_size)
    base = dataclasses.replace(task.cfg, train=dataclasses.replace(base.train, epochs=(steps - 0.5) / per_epoch))  # fmt: skip
    cfgs = variant_configs(base, variants)
    log(f"vlmoe compare (contrastive): {len(variants)} variants × {seeds} seeds, {steps} steps of "
        f"{base.train.batch_size} ({steps / per_epoch:.2f} epochs of {len(task.sets['train'])} pairs)")  # fmt: skip
    info: dict[str, dict[str, Any]] = {n: {"runs": []} for n in variants}
    for seed in range(seeds):
        for name, cfg in cfgs.items():
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            folder = out / "runs" / name / f"seed{seed}"
            r = run_one(c, folder)
            r["text_spread"] = text_spread(folder)
            info[name]["runs"].append(r)
            log(f"  {name:<12} seed {seed}: val loss {r['final_val_loss']:.4f} zero-shot "
                f"{r['final_val_accuracy']:.2%}  ({r['seconds']:.0f} s, {time.time() - t0:.0f} s total)")  # fmt: skip
    for name in variants:
        _aggregate(info[name])
    return {"base": base.preset, "steps": steps, "seeds": list(range(seeds)),
            "batch_size": base.train.batch_size, "train_pairs": len(task.sets["train"]),
            "model": dataclasses.asdict(base.model), "wall_seconds": round(time.time() - t0, 1),
            "variants": info}  # fmt: skip


def _aggregate(v: dict[str, Any]) -> None:
    """Mean ± std over a variant's runs of the final validation numbers and text spread."""
    runs = v["runs"]
    v["val_loss_mean"], v["val_loss_std"] = mean_std([r["final_val_loss"] for r in runs])
    v["zero_shot_mean"], v["zero_shot_std"] = mean_std([r["final_val_accuracy"] for r in runs])
    v["step_seconds_median"] = statistics.median(r["step_seconds"] for r in runs)
    v["text_spread"] = {}
    for layer in runs[0]["text_spread"]:
        for k in ("experts_taking", "load_entropy", "mean_token_entropy", "image_experts_taking"):
            m, s = mean_std([float(r["text_spread"][layer][k]) for r in runs])
            v["text_spread"].setdefault(layer, {})[k] = {"mean": m, "std": s}


def table(summary: dict[str, Any]) -> str:
    """The results table in Markdown (mean ± std over seeds)."""
    rows = ["| variant | val contrastive loss | val zero-shot | text: experts taking ≥5% (per MoE block) | "
            "text load entropy, nats | text token entropy | images: experts taking ≥5% | ms/step |",
            "|---|---:|---:|---|---|---|---|---:|"]  # fmt: skip

    def per_layer(v: dict[str, Any], k: str, fmt: str) -> str:
        cells = [f"{lay}: {format(s[k]['mean'], fmt)} ± {format(s[k]['std'], fmt)}" for lay, s in v["text_spread"].items()]  # fmt: skip
        return "; ".join(cells) or "—"

    for name, v in summary["variants"].items():
        rows.append(
            f"| {name} | {v['val_loss_mean']:.4f} ± {v['val_loss_std']:.4f} | "
            f"{v['zero_shot_mean']:.2%} ± {v['zero_shot_std']:.2%} | {per_layer(v, 'experts_taking', '.1f')} | "
            f"{per_layer(v, 'load_entropy', '.2f')} | {per_layer(v, 'mean_token_entropy', '.2f')} | "
            f"{per_layer(v, 'image_experts_taking', '.1f')} | {v['step_seconds_median'] * 1000:.0f} |"
        )  # fmt: skip
    return "\n".join(rows)


def plot(summary: dict[str, Any], path: Path) -> None:
    """curves.png: validation loss and zero-shot accuracy against step, mean ± std band."""
    from vlmoe.analysis.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, v in summary["variants"].items():
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            plot_band(ax, v["runs"], key, name)
    axes[0].set_ylabel("validation contrastive loss")
    axes[1].set_ylabel("validation zero-shot accuracy")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"vlmoe compare (contrastive): mean ± std over {len(summary['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_contrastive(args: argparse.Namespace) -> int:
    """`vlmoe compare --family contrastive` (the arguments of `vlmoe.compare`)."""
    import sys

    import torch

    variants = list(dict.fromkeys(args.variants or VARIANTS))
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"--variants: unknown {bad}, expected some of {', '.join(VARIANTS)}")
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    base = quick_base() if args.quick else compare_base()
    if args.data not in (None, "easy-vqa"):
        base.data = args.data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        summary = compare_contrastive(base, out, steps, args.seeds, variants,
                                      lambda s: print(s, file=sys.stderr, flush=True))  # fmt: skip
    finally:
        torch.set_num_threads(prev)
    command = (f"vlmoe compare --family contrastive{' --quick' if args.quick else ''} "
               f"--steps {steps} --seeds {args.seeds} --variants {' '.join(variants)}")  # fmt: skip
    summary["command"], summary["threads"] = command, args.threads
    (out / "compare.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "compare.md").write_text(f"# vlmoe compare — LIMoE entropy losses\n\nCommand: `{command}` "
                                    f"(wall {summary['wall_seconds'] / 60:.1f} min)\n\n{table(summary)}\n\n"
                                    "Mean ± sample std over seeds; validation = easy-VQA val images "
                                    "(zero-shot over the 24 captions) + val emoji.\n\n"
                                    "![curves](curves.png)\n")  # fmt: skip
    plot(summary, out / "curves.png")
    print(table(summary))
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'curves.png'}")
    return 0
