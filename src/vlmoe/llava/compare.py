"""`vlmoe compare --family generative --from DIR`: sparse upcycling against dense continuation
of one dense MoE-LLaVA checkpoint, over seeds, with error bars — what upcycling buys.

    dense   continue DIR's dense model: its FFNs train, nothing is upcycled
    moe     upcycle as DIR's config says (`LlavaConfig.num_experts`, ``top_k``,
            ``moe_layers``, ``load_balance_weight``: for `moe-llava` every other FFN → 4
            copies, top-2, Switch balance loss 0.01) and train FFNs and routers

Both start from DIR's weights (`StageConfig.init_from`; upcycling copies each dense FFN
into every expert, so at step 0 the two models compute the same function) and run one stage
through the normal trainer (`vlmoe.train.train`, so the measured step is `train_step`): the
same steps, batch, data order, lr, schedule and trainable patterns (DIR's MoE stage's,
``lm.layers.*.ffn.*``: FFNs, and routers where there are any). The seed sets the data order
and the new routers' init; the validation split stays DIR's (`TrainConfig.split_seed`), so no
validation image was ever trained on. Validation (answer-token cross-entropy and exact match
on the first ``--val-questions`` validation questions) runs at step 0
(`TrainConfig.eval_on_start`), every ``--eval-every`` steps and after the last step.

Outputs in --out, as the other modes: ``compare.json`` (everything), ``compare.md`` (the
table and how it was made), ``curves.png`` (validation loss and exact match against step,
band = ±1 std over seeds) and ``runs/VARIANT/seedN/`` (each run's weights, config, tokenizer
and metrics.jsonl, readable by `vlmoe eval` / `inspect`; the optimiser state is dropped —
GBs per run for SmolLM2, and a compare run is never resumed).

Default budget (sized for a 2-core CPU, one torch thread per run): DEFAULT_STEPS = 40 steps
of DIR's batch (16 for `moe-llava`: 640 questions, ~2% of an epoch), validation on
DEFAULT_VAL_QUESTIONS = 160 questions at steps 0, 20 and 40. On the real `moe-llava` the
training step costs ~0.30 s per question for the dense model and ~0.47 s for the upcycled one
(top-2 of full-size copies in half the layers; FFNs trainable, AdamW; measured with batch 16 of
28 tokens, 1 thread, on a busy 2-core machine). One seed is then ~8 min of training, ~2 min of
validation and ~1 min of loading and saving: ``--seeds 3`` ≈ 35 min (an estimate from those
step costs, not yet timed end to end), plus ~2 min once where the encoder features of the
training images are not cached yet (the dense stage on the same machine caches them).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmoe.checkpoint import CheckpointError, resolve_checkpoint_dir, saved_run_config
from vlmoe.compare_runs import (
    add_paired_deltas,
    aggregate_runs,
    finite,
    fmt_params,
    median,
    plot_band,
    run_one,
)
from vlmoe.config import ConfigError, StageConfig
from vlmoe.validate import UsageError

from .config import LlavaRunConfig

VARIANTS = ("dense", "moe")
DEFAULT_STEPS = 40
DEFAULT_EVAL_EVERY = 20
DEFAULT_VAL_QUESTIONS = 160
#: what trains when DIR's config names no MoE stage (the `moe-llava` presets' MoE stage)
DEFAULT_TRAINABLE = ("lm.layers.*.ffn.*",)
#: the upcycling settings `--num-experts`, `--top-k`, `--load-balance-weight` override
MOE_OPTIONS = ("num_experts", "top_k", "load_balance_weight")
HOW = "give a dense MoE-LLaVA checkpoint, e.g. OUT-dense of vlmoe train --preset moe-llava"


@dataclass(frozen=True)
class Budget:
    """What every run of a comparison shares besides DIR: steps, validation, peak lr."""

    steps: int = DEFAULT_STEPS  #: optimiser steps per run
    eval_every: int = DEFAULT_EVAL_EVERY  #: steps between validations (also: step 0, last)
    val_questions: int = DEFAULT_VAL_QUESTIONS  #: the first N validation questions
    lr: float | None = None  #: peak lr (None = DIR's MoE stage's)


def dense_source(path: str) -> tuple[LlavaRunConfig, dict[str, Any]]:
    """(run config, config.json) of checkpoint ``path``, checked to be a dense checkpoint of
    the MoE-LLaVA family with its weights and tokenizer; anything else raises a one-line
    UsageError / CheckpointError starting with ``--from``."""
    from vlmoe.checkpoint import REQUIRED
    from vlmoe.families import family_of_checkpoint, is_pretrained_lm

    if is_pretrained_lm(path):
        raise UsageError(f"--from {path}: a pretrained language model, not a vlmoe checkpoint "
                         f"(no projector to continue); {HOW}")  # fmt: skip
    try:
        family, meta = family_of_checkpoint(path)
        d = resolve_checkpoint_dir(path)
        if family.kind != "llava":
            raise UsageError(f"--from {path}: a {family.kind} checkpoint, not a generative "
                             f"(MoE-LLaVA) one; {HOW}")  # fmt: skip
        moe = meta.get("lm", {}).get("moe") if isinstance(meta.get("lm"), dict) else None
        if moe:
            raise UsageError(f"--from {path}: already upcycled (MoE FFNs in layers "
                             f"{moe.get('layers')}); give the dense checkpoint it came "
                             "from, e.g. OUT-dense of vlmoe train --preset moe-llava")  # fmt: skip
        for name in REQUIRED:  # checked now: nothing is written before the first run
            if not (d / name).is_file():
                raise CheckpointError(f"{d / name}: missing (expected a vlmoe checkpoint "
                                      f"with {', '.join(REQUIRED)})")  # fmt: skip
        return saved_run_config(meta, d / "config.json", LlavaRunConfig.from_dict), meta
    except CheckpointError as e:
        raise CheckpointError(f"--from: {e}") from None


def comparison_config(src: LlavaRunConfig, from_dir: str, b: Budget,
                      moe: dict[str, Any]) -> LlavaRunConfig:  # fmt: skip
    """DIR's run config made into the comparison's one-stage run (stage named "dense"; the
    variant, seed and epochs are set by `variant_config`). ``moe``: overrides of the
    upcycling (MOE_OPTIONS fields of `LlavaConfig`; ConfigError if invalid)."""
    t = src.train
    moe_stage = next((s for s in src.stages() if s.name in src.model.moe_stages), None)
    trainable = moe_stage.trainable if moe_stage else DEFAULT_TRAINABLE
    lr = b.lr or (moe_stage.lr if moe_stage else t.lr)
    stage = StageConfig("dense", lr=lr, trainable=trainable, init_from=str(from_dir))
    train = dataclasses.replace(
        t, lr=lr, stages=(stage,), split_seed=t.data_seed, eval_subset=b.val_questions,
        eval_every=b.eval_every, eval_on_start=True, log_every=1, routing_every=10,
        # a fresh AdamW needs a few steps of warm-up; DIR's (50 for moe-llava) would be
        # most of a short budget
        warmup_steps=min(t.warmup_steps, b.steps // 10), save_every=0, save_minutes=0.0,
        tensorboard=False,
    )  # fmt: skip
    # a stage named "moe" is upcycled; both variants (stages "dense" and "moe") see the
    # questions and captions DIR's MoE stage would have seen
    share = src.model.captions.get(moe_stage.name, 0.0) if moe_stage else 0.0
    model = dataclasses.replace(src.model, moe_stages=("moe",),
                                captions={"dense": share, "moe": share}, **moe)  # fmt: skip
    return dataclasses.replace(src, model=model, train=train, preset=f"compare-{src.preset}")


def variant_config(base: LlavaRunConfig, name: str, seed: int, steps: int,
                   per_epoch: int) -> LlavaRunConfig:  # fmt: skip
    """The run of variant ``name`` ("dense" or "moe") with seed ``seed``: exactly ``steps``
    optimiser steps (epochs (steps - 0.5) / per_epoch → the trainer runs ceil(...) = steps)."""
    stage = dataclasses.replace(base.train.stages[0], name=name)
    train = dataclasses.replace(base.train, seed=seed, epochs=(steps - 0.5) / per_epoch,
                                stages=(stage,))  # fmt: skip
    return dataclasses.replace(base, train=train, preset=f"{base.preset}:{name}")


def _with_config(task: Any, cfg: LlavaRunConfig) -> Any:
    """The loaded task (data, tokenizer, cached features: the same for every run, as the
    split, subsets and tokenizer are DIR's) with one run's config."""
    t = copy.copy(task)
    t.cfg = cfg
    return t


def _param_counts(task: Any, cfg: LlavaRunConfig) -> tuple[int, int]:
    """(total, active per token) parameters of the run ``cfg``'s model, as built."""
    return _with_config(task, cfg).build_model(cfg.train.stages[0]).param_counts()


def _drop_trainer_state(folder: Path) -> None:
    """Remove what only resuming needs (optimiser state: GBs for SmolLM2)."""
    shutil.rmtree(folder / "trainer_state", ignore_errors=True)
    (folder / "trainer_state.json").unlink(missing_ok=True)


def _first_train_loss(folder: Path) -> float | None:
    """The training loss of step 1 (before any update: the same for both variants of a
    seed, as they see the same first batch with the same function)."""
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("kind") == "train" and m.get("step") == 1:
            return float(m["loss"])
    return None


def compare_generative(src: LlavaRunConfig, from_dir: str, out: Path, b: Budget, seeds: int,
                       variants: list[str], moe: dict[str, Any] | None = None,
                       log: Any = None) -> dict[str, Any]:  # fmt: skip
    """Train every (seed, variant) for ``b.steps`` steps from DIR (``src`` its run config),
    seed-major (whatever else loads the machine falls on both variants alike); return the
    summary dict (compare.json without the command)."""
    from .family import make_task

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.time()
    base = comparison_config(src, from_dir, b, moe or {})
    task = make_task(base, None, None)  # DIR's tokenizer; the data loads once, here
    per_epoch = task.batches_per_epoch(base.train.batch_size)
    cfgs = {n: variant_config(base, n, 0, b.steps, per_epoch) for n in variants}
    info: dict[str, dict[str, Any]] = {}
    for name, cfg in cfgs.items():
        total, active = _param_counts(task, cfg)
        info[name] = {"params_total": total, "params_active": active, "runs": []}
    log(f"vlmoe compare (generative): {len(variants)} variants × {seeds} seeds from {from_dir}, "
        f"{b.steps} steps of {base.train.batch_size} ({b.steps / per_epoch:.3f} epochs of "
        f"{len(task.train_data)} questions), validation on {len(task.val_data)} questions")  # fmt: skip
    for seed in range(seeds):
        for name in variants:
            cfg = variant_config(base, name, seed, b.steps, per_epoch)
            folder = out / "runs" / name / f"seed{seed}"
            r = run_one(cfg, folder, task=_with_config(task, cfg))
            _drop_trainer_state(folder)
            r["first_train_loss"] = _first_train_loss(folder)
            r["samples_per_s"] = round(cfg.train.batch_size / r["step_seconds"], 3)
            info[name]["runs"].append(r)
            log(f"  {name:<5} seed {seed}: val loss {r['curve'][0]['loss']:.4f} → "
                f"{r['final_val_loss']:.4f}, exact match {r['final_val_accuracy']:.2%}, "
                f"{r['samples_per_s']:.2f} samples/s ({r['seconds']:.0f} s, "
                f"{time.time() - t0:.0f} s total)")  # fmt: skip
    _finish(info)
    return _summary(base, from_dir, b, seeds, per_epoch, task, info, time.time() - t0)


def _finish(info: dict[str, dict[str, Any]]) -> None:
    """Per variant: the runs' aggregate, the step-0 validation loss, the median samples/s;
    with both variants, the paired Δ loss (moe − dense, same seed)."""
    for v in info.values():
        v.update(aggregate_runs(v["runs"]))
        v["step0_val_loss"] = v["curve"][0]["loss_mean"] if v["curve"][0]["step"] == 0 else None
        v["samples_per_s_median"] = median([r["samples_per_s"] for r in v["runs"]])
    add_paired_deltas(info, "dense")


def _summary(base: LlavaRunConfig, from_dir: str, b: Budget, seeds: int, per_epoch: int,
             task: Any, info: dict[str, dict[str, Any]], wall: float) -> dict[str, Any]:  # fmt: skip
    t, m = base.train, base.model
    return {
        "from": str(from_dir), "preset": base.preset.removeprefix("compare-"), "data": base.data,
        "steps": b.steps, "epochs": round(b.steps / per_epoch, 4), "seeds": list(range(seeds)),
        "batch_size": t.batch_size, "lr": t.lr, "train_questions": len(task.train_data),
        "val_questions": len(task.val_data), "eval_every": b.eval_every,
        "optimizer": f"AdamW lr={t.lr:g} wd={t.weight_decay:g} warmup={t.warmup_steps} "
                     f"cosine→{t.min_lr_ratio:g}·lr, grad clip {t.grad_clip:g}",
        "trainable": list(t.stages[0].trainable),
        "upcycling": {k: getattr(m, k) for k in ("num_experts", "top_k", "moe_layers",
                                                 "load_balance_weight", "router_std")},
        "wall_seconds": round(wall, 1), "variants": info,
    }  # fmt: skip


def table(summary: dict[str, Any]) -> str:
    """The results table in Markdown (mean ± sample std over seeds)."""
    rows = ["| variant | params (total / active) | samples/s (median) | val loss, step 0 | "
            "val loss, final | Δ loss vs dense (paired) | exact match, final |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, v in summary["variants"].items():
        delta = "—"
        if name != "dense" and "delta_vs_dense_mean" in v:
            delta = f"{v['delta_vs_dense_mean']:+.4f} ± {v['delta_vs_dense_std']:.4f}"
        step0 = "—" if v["step0_val_loss"] is None else f"{v['step0_val_loss']:.4f}"
        rows.append(
            f"| {name} | {fmt_params(v['params_total'])} / {fmt_params(v['params_active'])} | "
            f"{v['samples_per_s_median']:.2f} | {step0} | "
            f"{v['val_loss_mean']:.4f} ± {v['val_loss_std']:.4f} | {delta} | "
            f"{v['val_accuracy_mean']:.2%} ± {v['val_accuracy_std']:.2%} |"
        )  # fmt: skip
    return "\n".join(rows)


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    """compare.md: the command, the table, and how the numbers were made."""
    s, u = summary, summary["upcycling"]
    n = len(s["seeds"])
    text = f"""# vlmoe compare — upcycled MoE vs dense continuation (MoE-LLaVA)

Command: `{s["command"]}` (wall time {s["wall_seconds"] / 60:.1f} min, {s["threads"]} torch
thread(s) per run)

{table(s)}

Mean ± sample std over {n} seed(s) ({", ".join(map(str, s["seeds"]))}). "Δ loss vs dense" is
the per-seed difference moe − dense of the final validation loss (same seed = same data
order), mean ± std. Validation loss is the answer-token cross-entropy and exact match the
normalised greedy answer, both on the first {s["val_questions"]} validation questions of the
checkpoint's own split; samples/s is the median training step's, measured on whatever else
the machine was running.

**Setup.** Both variants start from `{s["from"]}` (preset `{s["preset"]}`, data
`{s["data"]}`, {s["train_questions"]} training questions) and run {s["steps"]} steps of batch
{s["batch_size"]} ({s["epochs"]:.3f} epochs) with {s["optimizer"]}, training
{", ".join(f"`{p}`" for p in s["trainable"])}; validation every {s["eval_every"]} steps,
at step 0 and after the last step. The seed sets the data order and the routers' init.

- `dense`: the dense model continued, nothing upcycled.
- `moe`: `moe_layers={u["moe_layers"]}` FFNs upcycled to {u["num_experts"]} copies of the
  dense FFN, top-{u["top_k"]} router (init std {u["router_std"]}), Switch balance loss
  {u["load_balance_weight"]}: at step 0 it computes the dense model's function (the column
  "val loss, step 0" shows both).

![validation curves](curves.png)
"""
    path.write_text(text)


def plot(summary: dict[str, Any], path: Path) -> None:
    """curves.png: validation loss and exact match against step, mean ± 1 std band."""
    from vlmoe.analysis.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, v in summary["variants"].items():
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            plot_band(ax, v["runs"], key, name)
    axes[0].set_ylabel("validation answer-token cross-entropy")
    axes[1].set_ylabel("validation exact match")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"vlmoe compare (generative) from {Path(summary['from']).name}: "
                 f"mean ± std over {len(summary['seeds'])} seeds")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _options(args: argparse.Namespace) -> tuple[Budget, list[str], dict[str, Any]]:
    """(budget, variants, upcycling overrides) from `vlmoe compare`'s arguments; options of
    the other families raise UsageError."""
    if args.init_from is None:
        raise UsageError(f"--family generative: expected --from DIR ({HOW})")
    for dest, why in (("quick", "the checkpoint sets the model; use --steps"),
                      ("moe_layers", "the checkpoint's moe_layers are used"),
                      ("capacity_factor", "the upcycled FFNs are dropless")):  # fmt: skip
        if getattr(args, dest, None):
            flag = "--" + dest.replace("_", "-")
            raise UsageError(f"{flag}: not with --family generative ({why})")
    if args.data not in (None, "easy-vqa"):
        raise UsageError("--data: not with --family generative (both variants train on the "
                         "data and split of the --from checkpoint)")  # fmt: skip
    variants = list(dict.fromkeys(args.variants or VARIANTS))
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"--variants: unknown {bad}, expected some of {', '.join(VARIANTS)}")
    b = Budget(args.steps or DEFAULT_STEPS, args.eval_every or DEFAULT_EVAL_EVERY,
               args.val_questions or DEFAULT_VAL_QUESTIONS, args.lr)  # fmt: skip
    moe = {k: getattr(args, k) for k in MOE_OPTIONS if getattr(args, k, None) is not None}
    return b, variants, moe


def _command(args: argparse.Namespace, b: Budget, variants: list[str], lr: float) -> str:
    cmd = (f"vlmoe compare --family generative --from {args.init_from} --steps {b.steps} "
           f"--seeds {args.seeds} --eval-every {b.eval_every} --val-questions "
           f"{b.val_questions} --lr {lr:g} --variants {' '.join(variants)}")  # fmt: skip
    for k in MOE_OPTIONS:
        if getattr(args, k, None) is not None:
            cmd += f" --{k.replace('_', '-')} {getattr(args, k)}"
    return cmd


def run_generative(args: argparse.Namespace) -> int:
    """`vlmoe compare --family generative` (the arguments of `vlmoe.compare`)."""
    import torch

    b, variants, moe = _options(args)
    src, _ = dense_source(args.init_from)
    comparison_config(src, args.init_from, b, moe)  # a bad override fails before any write
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        summary = compare_generative(src, args.init_from, out, b, args.seeds, variants, moe)
    finally:
        torch.set_num_threads(prev)
    summary["command"] = _command(args, b, variants, summary["lr"])
    summary["threads"] = args.threads
    (out / "compare.json").write_text(json.dumps(finite(summary), indent=1))
    write_markdown(summary, out / "compare.md")
    plot(summary, out / "curves.png")
    print(table(summary))
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'curves.png'}")
    return 0
