"""Training loop: AdamW, warm-up + cosine schedule, aux losses, routing statistics, resume.

`train(cfg, out_dir)` is what `vlmoe train` calls. Determinism: the data order is a function of
(seed, epoch) and the model init of the seed, so a run stopped (`stop_after`) and resumed from
its checkpoint reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vlmoe.checkpoint import load_checkpoint, load_trainer_state
from vlmoe.config import RunConfig
from vlmoe.data import VQASplit, WordTokenizer, iterate_batches, load_data, num_batches
from vlmoe.data.augment import augment_generator, augment_images
from vlmoe.distributed import Dist
from vlmoe.evaluate import EvalResult
from vlmoe.models import VLMoE, build_model
from vlmoe.models.blocks import RoutingRecord


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    out_dir: Path
    step: int
    total_steps: int
    val: EvalResult | None
    test: EvalResult | None
    seconds: float
    metrics: list[dict[str, Any]]


class CollapseMonitor:
    """Warns when routing collapses: an expert that stays dead (< 1% of tokens) or takes more
    than `share` of the tokens for `patience` consecutive routing checks. Each sustained span
    warns once; `warnings` accumulates the messages."""

    def __init__(self, share: float, patience: int) -> None:
        self.share, self.patience = share, patience
        self.streak: dict[tuple[str, int, str], int] = {}
        self.warnings: list[str] = []

    def update(self, step: int, name: str, share_E: list[float]) -> list[str]:
        new = []
        for e, s in enumerate(share_E):
            for kind, bad in (("dead", s < 0.01), ("flooded", s > self.share)):
                key = (name, e, kind)
                self.streak[key] = self.streak.get(key, 0) + 1 if bad else 0
                if self.streak[key] == self.patience:
                    what = "< 1%" if kind == "dead" else f"> {self.share:.0%}"
                    new.append(
                        f"step {step}: {name} expert {e} has taken {what} of tokens for "
                        f"{self.patience} routing checks in a row ({s:.1%} now): routing collapse"
                    )
        self.warnings += new
        return new


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # norms, biases, embeddings and position tables are not decayed (GPT-2 / timm practice)
        if p.ndim < 2 or "pos_" in name or "tok_" in name or "type_" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def routing_summary(
    tokens: dict[str, torch.Tensor], recs: dict[str, list[torch.Tensor]]
) -> dict[str, Any]:
    """Per MoE FFN: share of tokens per expert, mean entropy, dropped fraction, imbalance."""
    out = {}
    for name, t in tokens.items():
        share = (t / t.sum().clamp_min(1)).tolist()
        ent, drop = recs[name][0], recs[name][1]
        out[name] = {
            "share": [round(s, 4) for s in share],
            "entropy": round(float(ent), 4),
            "dropped": round(float(drop), 4),
            "imbalance": round(float(t.max() / t.mean().clamp_min(1e-9)), 3),
        }
    return out


def prepare_data(
    cfg: RunConfig, tokenizer: WordTokenizer | None = None
) -> tuple[VQASplit, VQASplit, WordTokenizer, list[str]]:
    """Load train and validation splits; build the tokenizer and answer list from train."""
    t = cfg.train
    train_split = load_data(cfg.data, "train", cfg.model.image_size, t.val_fraction, t.seed)
    val_split = load_data(cfg.data, "val", cfg.model.image_size, t.val_fraction, t.seed)
    if t.train_subset:
        # a seeded random subset: easy-VQA lists ~10 questions per image, so the first N
        # questions would cover only ~N/10 images
        g = torch.Generator().manual_seed(t.seed)
        keep = torch.randperm(len(train_split), generator=g)[: t.train_subset].sort().values
        train_split = train_split.subset(keep)
    if t.eval_subset:
        val_split = val_split.subset(range(min(t.eval_subset, len(val_split))))
    if tokenizer is None:
        tokenizer = WordTokenizer.build(train_split.questions)
    answers = sorted(set(train_split.answers))
    return train_split, val_split, tokenizer, answers


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
    log: Callable[[str], None] | None = None,
    dist: Dist | None = None,
) -> TrainResult:
    """Train `cfg` and save checkpoints to `out_dir`.

    resume: continue from the checkpoint in `out_dir` (its config wins over `cfg`).
    stop_after: stop (and save) after this many optimiser steps in total, as if interrupted.
    Returns the final validation (and, for easy-VQA, test) results.
    dist: the process group (default: whatever torch.distributed runs, else one process);
    with several processes, see `vlmoe.distributed` — batch_size stays the global batch.
    """
    dist = dist or Dist.current(device)
    log = log or (lambda s: print(s, file=sys.stderr))
    if not dist.is_main:
        log = lambda s: None  # noqa: E731 — rank 0 logs for the run
    out = Path(out_dir)
    t0 = time.time()
    state: dict[str, Any] | None = None
    if resume:
        ck = load_checkpoint(out)
        state = load_trainer_state(out)
        cfg = ck.config
        tokenizer, answers = ck.tokenizer, ck.answers
        train_split, val_split, _, _ = prepare_data(cfg, tokenizer)
    else:
        train_split, val_split, tokenizer, answers = prepare_data(cfg)
    tc = cfg.train
    mcfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size, num_answers=len(answers))
    cfg = dataclasses.replace(cfg, model=mcfg)

    torch.manual_seed(tc.seed)
    model: VLMoE = dist.parallelize(build_model(mcfg).to(device))
    opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.98))
    per_epoch = num_batches(len(train_split), tc.batch_size, drop_last=True)
    if per_epoch == 0:
        raise ValueError(
            f"train.batch_size: {tc.batch_size} is larger than the training split ({len(train_split)} questions)"
        )
    total = max(1, math.ceil(tc.epochs * per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(tc.warmup_steps, total, tc.min_lr_ratio)
    )
    step, metrics = 0, []
    monitor = CollapseMonitor(tc.collapse_share, tc.collapse_patience)
    if state is not None:
        model.load_state_dict(ck.model.state_dict())
        opt.load_state_dict(dist.shard_optimizer_state(state["optimizer"], opt, model))
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, metrics = state["step"], ck.metrics
        monitor.streak = state.get("monitor", {})
        log(f"resuming from {out} at step {step}/{total}")

    def save() -> None:
        ts = {
            "step": step,
            "optimizer": dist.full_optimizer_state(opt, model),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "monitor": monitor.streak,
        }
        dist.save_checkpoint(out, cfg, model, tokenizer, answers, metrics, ts)

    n_params, n_active = model.param_counts()
    if state is None:
        log(
            f"vlmoe train: preset={cfg.preset} data={cfg.data} train={len(train_split)} val={len(val_split)} "
            f"params={n_params / 1e6:.2f}M active={n_active / 1e6:.2f}M steps={total}"
        )
    model.train()
    bar = tqdm(
        total=total,
        initial=step,
        disable=not progress or not dist.is_main,
        desc="train",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    win = {"loss": 0.0, "aux": 0.0, "correct": 0, "n": 0, "steps": 0, "t": time.time()}
    route_tokens: dict[str, torch.Tensor] = {}
    route_other: dict[str, list[torch.Tensor]] = {}
    last_imbalance = float("nan")
    val_res: EvalResult | None = None
    stop = min(total, stop_after) if stop_after is not None else total
    while step < stop:
        epoch, start = divmod(step, per_epoch)
        for batch in iterate_batches(
            train_split,
            tokenizer,
            answers,
            dist.local_batch_size(tc.batch_size),
            shuffle=True,
            seed=tc.seed,
            epoch=epoch,
            drop_last=True,
            max_len=mcfg.max_text_len,
            start_batch=start,
            rank=dist.rank,
            world_size=dist.world_size,
        ):
            batch = batch.to(device)
            images = batch.images
            if tc.hflip:  # easy-VQA answers (colour, shape, yes/no) do not change under a mirror
                # drawn for the global batch, each rank keeps its rows: same flips at any W
                flip = dist.rank_slice(torch.rand(images.shape[0] * dist.world_size)) < 0.5
                images = torch.where(
                    flip.to(images.device)[:, None, None, None], images.flip(-1), images
                )
            if tc.augment.enabled:  # answer-preserving, never hue; a function of (seed, step)
                gen = augment_generator(tc.seed, step)
                images = augment_images(images, tc.augment, gen, dist.world_size, dist.rank)
            outp = model(images, batch.input_ids, batch.attention_mask, batch.labels)
            opt.zero_grad(set_to_none=True)
            outp.loss.backward()
            dist.sync_gradients(model)
            if tc.grad_clip > 0:
                dist.clip_grad_norm_(model, tc.grad_clip)
            opt.step()
            sched.step()
            step += 1
            _accumulate(win, outp, batch.labels)
            _accumulate_routing(route_tokens, route_other, outp.routing)
            bar.update(1)
            if step % tc.log_every == 0 or step == stop:
                dist.reduce_window(win)
                dt = time.time() - win["t"]
                line = {
                    "step": step,
                    "epoch": round(step / per_epoch, 3),
                    "kind": "train",
                    "loss": round(win["loss"] / win["steps"], 5),
                    "aux_loss": round(win["aux"] / win["steps"], 6),
                    "accuracy": round(win["correct"] / max(1, win["n"]), 4),
                    "samples_per_s": round(win["n"] / max(dt, 1e-9), 1),
                    "lr": sched.get_last_lr()[0],
                }
                metrics.append(line)
                bar.set_postfix(
                    loss=f"{line['loss']:.3f}",
                    acc=f"{line['accuracy']:.3f}",
                    sps=f"{line['samples_per_s']:.0f}",
                    aux=f"{line['aux_loss']:.4f}",
                    bal=f"{last_imbalance:.2f}",
                )
                win.update(loss=0.0, aux=0.0, correct=0, n=0, steps=0, t=time.time())
            if route_tokens and (step % tc.routing_every == 0 or step == stop):
                summary = routing_summary(route_tokens, route_other)
                metrics.append({"step": step, "kind": "routing", "layers": summary})
                last_imbalance = max(v["imbalance"] for v in summary.values())
                for name, v in summary.items():
                    for msg in monitor.update(step, name, v["share"]):
                        if dist.is_main:
                            warnings.warn(msg, stacklevel=1)
                        metrics.append({"step": step, "kind": "warning", "message": msg})
                route_tokens.clear()
                route_other.clear()
            end_epoch = step % per_epoch == 0
            if end_epoch or step == stop or (tc.eval_every and step % tc.eval_every == 0):
                val_res = dist.evaluate(
                    model,
                    val_split,
                    tokenizer,
                    answers,
                    batch_size=tc.eval_batch_size,
                    device=device,
                    warn_unknown=False,
                )
                metrics.append(
                    {
                        "step": step,
                        "epoch": round(step / per_epoch, 3),
                        "kind": "val",
                        "loss": round(val_res.loss, 5),
                        "accuracy": round(val_res.accuracy, 5),
                    }
                )
                msg = f"step {step}: val loss {val_res.loss:.4f} accuracy {val_res.accuracy:.4f}"
                if progress and dist.is_main:
                    bar.write(msg, file=sys.stderr)  # above the bar; stdout stays for results
                else:
                    log(msg)
                model.train()
            if end_epoch or step == stop or (tc.save_every and step % tc.save_every == 0):
                save()
            if step >= stop:
                break
    bar.close()
    test_res = None
    if step >= total and evaluate_test and cfg.data == "easy-vqa":
        test_split = load_data("easy-vqa", "test", mcfg.image_size, tc.val_fraction, tc.seed)
        if tc.eval_subset:
            test_split = test_split.subset(range(min(tc.eval_subset, len(test_split))))
        test_res = dist.evaluate(
            model, test_split, tokenizer, answers, batch_size=tc.eval_batch_size, device=device
        )
        metrics.append(
            {
                "step": step,
                "kind": "test",
                "loss": round(test_res.loss, 5),
                "accuracy": round(test_res.accuracy, 5),
                "per_kind": test_res.per_kind,
            }
        )
        save()
    return TrainResult(out, step, total, val_res, test_res, time.time() - t0, metrics)


def _accumulate(win: dict[str, Any], outp: Any, labels: torch.Tensor) -> None:
    win["loss"] += float(outp.task_loss.detach())
    win["aux"] += float(outp.aux_loss.detach())
    known = labels >= 0
    win["correct"] += int(((outp.logits.argmax(-1) == labels) & known).sum())
    win["n"] += int(labels.numel())
    win["steps"] += 1


def _accumulate_routing(
    tokens: dict[str, torch.Tensor], other: dict[str, list[torch.Tensor]], recs: list[RoutingRecord]
) -> None:
    for r in recs:
        t = r.stats.tokens_per_expert.detach().float().cpu()
        if r.name in tokens:
            tokens[r.name] += t
            # running means of entropy and dropped fraction over the window (equal weights)
            o = other[r.name]
            o[2] += 1
            o[0] += (r.stats.router_entropy.cpu() - o[0]) / o[2]
            o[1] += (r.stats.dropped_fraction.cpu() - o[1]) / o[2]
        else:
            tokens[r.name] = t.clone()
            other[r.name] = [
                r.stats.router_entropy.cpu().clone(),
                r.stats.dropped_fraction.cpu().clone(),
                1,
            ]
