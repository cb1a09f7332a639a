"""The training loop: stages, logging, validation, checkpoints, graceful stop, resume.

``train(cfg, out_dir)`` is what ``vlmoe train`` calls. Determinism: the data order and the
augmentation are functions of (seed, epoch, batch), the model init of the seed, so a run
stopped (``stop_after``, a signal) and resumed from its checkpoint follows the uninterrupted
run's losses step for step.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vlmoe.checkpoint import (
    commit,
    fresh_tmp,
    load_trainer_state,
    recover,
    resolve_checkpoint_dir,
    saved_run_config,
    write_run_files,
)
from vlmoe.config import StageConfig
from vlmoe.evaluate import EvalResult
from vlmoe.models.output import ModelOutput
from vlmoe.moe import keep_freed_memory
from vlmoe.train.metrics import CollapseMonitor, MetricsLog, RoutingWindow, Window
from vlmoe.train.optim import build_optimizer, no_decay_names, set_trainable
from vlmoe.train.parallel import Engine
from vlmoe.train.step import NonFiniteError, train_step
from vlmoe.train.task import Task


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
    stopped_by: str | None = None  #: "signal SIGTERM" etc. when a signal ended the run early


class StopSignals:
    """While active, SIGINT / SIGTERM only raise a flag: the loop finishes its step, saves a
    resumable checkpoint and stops. A second SIGINT aborts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay with their owner
            self._old = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class _Position:
    """Where the run is: stage index, optimiser steps in that stage, steps in all stages."""

    stage: int = 0
    stage_step: int = 0
    step: int = 0
    monitor: dict[str, int] = field(default_factory=dict)


class Trainer:
    """Runs a ``Task``'s stages; see ``train`` for the arguments."""

    def __init__(self, task: Task, out: Path, engine: Engine, log: Callable[[str], None],
                 progress: bool) -> None:  # fmt: skip
        self.task, self.cfg, self.out, self.engine = task, task.cfg, out, engine
        self.log, self.progress = log, progress
        self.stages = self.cfg.stages()
        self.per_epoch = task.batches_per_epoch(self.cfg.train.batch_size)
        engine.local_batch_size(self.cfg.train.batch_size)  # divisible over processes?
        self.totals = [max(1, math.ceil(s.epochs * self.per_epoch)) for s in self.stages]
        self.pos = _Position()
        t = self.cfg.train
        self.monitor = CollapseMonitor(t.collapse_share, t.collapse_patience)
        self.window, self.routing = Window(), RoutingWindow()
        self.val: EvalResult | None = None
        self.signals = StopSignals()
        self.metrics: MetricsLog | None = None
        self.last_save = time.time()
        self.skipped = 0

    # ------------------------------------------------------------------ stages
    def start_stage(self, i: int, init: dict[str, torch.Tensor] | None) -> None:
        """Build stage i's model (initialised from ``init`` or ``init_from``), freeze what it
        does not train, parallelise it and build its optimiser and schedule."""
        stage, t = self.stages[i], self.cfg.train
        torch.manual_seed(t.seed + i)
        model = self.task.build_model(stage)
        if stage.init_from:
            from vlmoe.checkpoint import read_weights

            init = read_weights(stage.init_from)
        if init is not None:
            self.task.load_weights(model, init)
        exempt = no_decay_names(model)
        n_train, n_all = set_trainable(model, stage.trainable)
        self.model = self.engine.parallelize(model.to(self.engine.device))
        schedule = (t.warmup_steps, self.totals[i], t.min_lr_ratio)
        self.opt, self.sched = build_optimizer(
            self.model, exempt, stage.lr, t.weight_decay, schedule, t.lr_scales
        )
        if len(self.stages) > 1:
            self.log(f"stage {i + 1}/{len(self.stages)} {stage.name}: {self.totals[i]} steps, "
                     f"lr {stage.lr:g}, training {n_train:,} of {n_all:,} parameters")  # fmt: skip

    def run_stage(self, stop: int) -> bool:
        """Train the current stage until it ends or the run's step reaches ``stop``, a signal
        arrives or a collective fails. Returns True when the stage ran to its end."""
        total = self.totals[self.pos.stage]
        t, e = self.cfg.train, self.engine
        self.model.train()
        while self.pos.stage_step < total and self.pos.step < stop:
            epoch, start = divmod(self.pos.stage_step, self.per_epoch)
            for batch in self.task.train_batches(t.batch_size, epoch, start, e.rank, e.world_size):
                out = self.step(batch)
                self.pos.stage_step += 1
                self.pos.step += 1
                self.bar.update(1)
                if out is not None:
                    self.window.add(out, len(batch))
                    self.routing.add(out.routing)
                if self.after_step(total, stop):
                    return False
                if self.pos.stage_step >= total or self.pos.step >= stop:
                    break
        return self.pos.stage_step >= total

    def step(self, batch: Any) -> ModelOutput | None:
        """``train_step`` on one batch; a non-finite step is an error naming the step, or
        (``train.nonfinite = "skip"``) skipped, logged and counted."""
        t, e = self.cfg.train, self.engine
        try:
            out = train_step(self.model, batch.to(e.device), self.opt, e, t.grad_clip, self.sched,
                             t.nonfinite)  # fmt: skip
        except NonFiniteError as err:
            raise NonFiniteError(f"train: step {self.pos.step + 1}: {err} — stopped before "
                                 "the weights changed (train.nonfinite='skip' skips such steps)") from None  # fmt: skip
        if out is None:
            self.skipped += 1
            self.metrics.write({"step": self.pos.step + 1, "kind": "warning",
                                "message": f"non-finite loss or gradient: step skipped ({self.skipped} so far)"})  # fmt: skip
            if self.skipped > t.max_skipped:
                raise NonFiniteError(f"train: {self.skipped} steps skipped for a non-finite "
                                     f"loss or gradient (train.max_skipped = {t.max_skipped})")  # fmt: skip
        return out

    def after_step(self, total: int, stop: int) -> bool:
        """Logging, routing checks, validation and saving due after a step; True = stop now."""
        t, p = self.cfg.train, self.pos
        last = p.stage_step >= total or p.step >= stop
        end_epoch = p.stage_step % self.per_epoch == 0
        if p.step % t.log_every == 0 or last:
            self.log_train()
        if p.step % t.routing_every == 0 or last:
            self.log_routing()
        if end_epoch or last or (t.eval_every and p.step % t.eval_every == 0):
            self.validate()
        flags = {"signal": float(self.signals.received is not None),
                 "time": float(bool(t.save_minutes) and time.time() - self.last_save > 60 * t.save_minutes)}  # fmt: skip
        if self.engine.world_size > 1:  # every rank must agree to save / stop together
            flags = self.engine.all_reduce_sums(flags)
        if (
            end_epoch
            or last
            or flags["signal"]
            or flags["time"]
            or (t.save_every and p.step % t.save_every == 0)
        ):
            self.save()
        return bool(flags["signal"])

    # ------------------------------------------------------------------ reporting
    def epoch(self) -> float:
        return round(self.pos.stage_step / self.per_epoch, 3)

    def log_train(self) -> None:
        """One "train" line from the window (summed over processes), then a fresh window."""
        totals = self.engine.all_reduce_sums(self.window.sums)
        line = {"step": self.pos.step, "epoch": self.epoch(), "kind": "train",
                **self.stage_field(), **self.window.line(totals),
                "lr": self.sched.get_last_lr()[0]}  # fmt: skip
        self.metrics.write(line)
        self.bar.set_postfix(
            {k: line[k] for k in ("loss", "accuracy", "samples_per_s") if k in line}
        )
        self.window.reset()

    def stage_field(self) -> dict[str, str]:
        return {"stage": self.stages[self.pos.stage].name} if len(self.stages) > 1 else {}

    def log_routing(self) -> None:
        """Per MoE FFN: load shares, entropy, drops; collapse warnings."""
        summary = self.routing.summary()
        if not summary:
            return
        self.metrics.write({"step": self.pos.step, "kind": "routing", "layers": summary})
        for name, v in summary.items():
            for msg in self.monitor.update(self.pos.step, name, v["share"]):
                if self.engine.is_main:
                    warnings.warn(msg, stacklevel=1)
                self.metrics.write({"step": self.pos.step, "kind": "warning", "message": msg})

    def validate(self) -> None:
        res = self.task.evaluate(self.model, "val", self.engine.device)
        self.model.train()
        if res is None:
            return
        self.val = res
        self.metrics.write({"step": self.pos.step, "epoch": self.epoch(), "kind": "val",
                            **self.stage_field(), "loss": round(res.loss, 5),
                            "accuracy": round(res.accuracy, 5), "per_kind": res.per_kind})  # fmt: skip
        kinds = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in res.per_kind.items())
        msg = f"step {self.pos.step}: val loss {res.loss:.4f} accuracy {res.accuracy:.4f}"
        msg += f" ({kinds})" if kinds else ""
        if self.progress and self.engine.is_main:
            self.bar.write(msg, file=sys.stderr)  # above the bar; stdout stays for results
        else:
            self.log(msg)

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: Path | None = None) -> None:
        """Write a complete, resumable checkpoint to ``folder`` (default: the run's output
        folder) through ``OUT.tmp`` and renames. Collective: every rank calls it."""
        out, e = folder or self.out, self.engine
        tmp = fresh_tmp(out) if e.is_main else out.with_name(out.name + ".tmp")
        e.barrier()
        e.save_state(tmp / "trainer_state", self.model, self.opt, {"rng": torch.get_rng_state()})
        state = e.full_state_dict(self.model)
        if e.is_main:
            meta = {"task": self.task.kind, "run": self.cfg.to_dict(), **self.task.meta()}
            write_run_files(tmp, meta, state, self.metrics.lines)
            self.task.write_assets(tmp)
            ts = {"step": self.pos.step, "stage": self.pos.stage, "stage_step": self.pos.stage_step,
                  "scheduler": self.sched.state_dict(), "monitor": self.monitor.streak}  # fmt: skip
            (tmp / "trainer_state.json").write_text(json.dumps(ts, indent=1) + "\n")
            commit(tmp, out)
        e.barrier()
        self.last_save = time.time()

    def restore(self) -> None:
        """Continue from the checkpoint in the output folder: position, model, optimiser,
        schedule, RNG and the metric lines written up to that checkpoint."""
        from vlmoe.checkpoint import load_checkpoint_meta, resolve_checkpoint_dir

        if self.engine.is_main:
            recover(self.out)
        self.engine.barrier()
        d = resolve_checkpoint_dir(self.out)
        ts = load_trainer_state(d)
        self.pos = _Position(
            int(ts["stage"]), int(ts["stage_step"]), int(ts["step"]), ts["monitor"]
        )
        self.monitor.streak = dict(ts["monitor"])
        self.start_stage(self.pos.stage, None)
        extra = self.engine.load_state(d / "trainer_state", self.model, self.opt)
        self.sched.load_state_dict(ts["scheduler"])
        torch.set_rng_state(extra["rng"])
        lines = [m for m in load_checkpoint_meta(d)[1] if m.get("step", 0) <= self.pos.step]
        self.metrics.lines[:] = lines
        if self.engine.is_main and self.metrics.path is not None:  # drop lines after the save
            self.metrics.path.write_text("".join(json.dumps(m) + "\n" for m in lines))
        self.log(f"resuming from {d} at step {self.pos.step}/{sum(self.totals)}")

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool, stop_after: int | None, evaluate_test: bool) -> TrainResult:
        """All stages (from the resumed position), then the test split."""
        t0 = time.time()
        stop = min(sum(self.totals), stop_after) if stop_after is not None else sum(self.totals)
        self.open_metrics(resume)
        if resume:
            self.restore()
        else:
            self.start_stage(0, None)
            self.log_start()
        self.bar = tqdm(total=sum(self.totals), initial=self.pos.step, desc="train",
                        disable=not self.progress or not self.engine.is_main,
                        dynamic_ncols=True, file=sys.stderr)  # fmt: skip
        if not resume and self.cfg.train.eval_on_start:
            self.validate()  # the step-0 point of the validation curve
        with self.signals:
            while self.pos.step < stop and self.run_stage(stop):
                if self.pos.stage + 1 >= len(self.stages):
                    break
                self.next_stage()
        self.bar.close()
        test = None
        finished = self.pos.step >= sum(self.totals)
        if finished and evaluate_test and self.signals.received is None:
            test = self.task.evaluate(self.model, "test", self.engine.device)
            if test is not None:
                self.metrics.write({"step": self.pos.step, "kind": "test", "loss": round(test.loss, 5),
                                    "accuracy": round(test.accuracy, 5), "per_kind": test.per_kind})  # fmt: skip
                self.save()
        self.metrics.close()
        return TrainResult(self.out, self.pos.step, sum(self.totals), self.val, test,
                           time.time() - t0, self.metrics.lines, self.signals.received)  # fmt: skip

    def next_stage(self) -> None:
        """Keep the finished stage's checkpoint as OUT-<stage name>, then start the next
        stage from its weights."""
        name = self.stages[self.pos.stage].name
        self.save(self.out.with_name(f"{self.out.name}-{name}"))
        weights = self.engine.full_state_dict(self.model)
        self.pos = _Position(self.pos.stage + 1, 0, self.pos.step, {})
        self.monitor.streak = {}
        self.start_stage(self.pos.stage, weights)

    def open_metrics(self, resume: bool) -> None:
        path = self.out / "metrics.jsonl" if self.engine.is_main else None
        if path is not None and not resume and path.exists():
            path.unlink()  # a fresh run (e.g. --overwrite) starts a fresh log
        tb = (
            self.out.with_name(self.out.name + "-tensorboard")
            if self.cfg.train.tensorboard
            else None
        )
        self.metrics = MetricsLog(path, [], tb if self.engine.is_main else None)

    def log_start(self) -> None:
        counts = getattr(self.model, "param_counts", None)
        params = ""
        if counts is not None:
            n, a = counts()
            params = f" params={n / 1e6:.2f}M active={a / 1e6:.2f}M"
        c = self.cfg
        self.log(f"vlmoe train: preset={c.preset} data={c.data}{params} steps={sum(self.totals)} "
                 f"processes={self.engine.world_size}")  # fmt: skip


def train(
    cfg: Any,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
    log: Callable[[str], None] | None = None,
    engine: Engine | None = None,
    task: Task | None = None,
) -> TrainResult:
    """Train ``cfg`` (every stage of it) and save checkpoints to ``out_dir``.

    resume: continue from the checkpoint in ``out_dir`` (its config wins over ``cfg``).
    stop_after: stop (and save) after this many optimiser steps in total, as if interrupted.
    engine: the process group (default: from the launcher's environment, else one process);
    ``train.batch_size`` stays the global batch. task: default: the Task of cfg's model
    family (`vlmoe.families`).
    SIGINT / SIGTERM stop the run after the current step with a resumable checkpoint.
    Returns the final validation and (easy-VQA) test results.
    """
    engine = engine or Engine.from_env(device)
    log = log or (lambda s: print(s, file=sys.stderr))
    if not engine.is_main:
        log = lambda s: None  # noqa: E731 — rank 0 logs for the run
    if str(engine.device).startswith("cpu"):
        keep_freed_memory()  # the allocator setting bench/moe_layer.py measures with
    out = Path(out_dir)
    if task is None:
        task = family_task(cfg, out if resume else None)
    return Trainer(task, out, engine, log, progress).run(resume, stop_after, evaluate_test)


def family_task(cfg: Any, resume_from: Path | None) -> Task:
    """The Task for ``cfg`` from its model family (`vlmoe.families`); resuming, the config
    and family are those saved in the checkpoint ``resume_from``, not ``cfg``."""
    from vlmoe.families import family_of_checkpoint, family_of_kind

    if resume_from is None:
        return family_of_kind(cfg.task_kind, "config").hooks().make_task(cfg, None, None)
    family, meta = family_of_checkpoint(resume_from)
    hooks = family.hooks()
    where = resolve_checkpoint_dir(resume_from) / "config.json"
    saved = saved_run_config(meta, where, hooks.config_from_dict)
    return hooks.make_task(saved, resume_from, meta)


__all__ = ["StageConfig", "StopSignals", "TrainResult", "Trainer", "train"]
