"""What a run reports as it goes: metric windows, routing summaries, collapse warnings, logs.

``metrics.jsonl`` in the output folder is appended (and flushed) line by line while the run
trains, so a person can follow it with ``tail -f``; TensorBoard event files are optional.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from vlmoe.models.output import ModelOutput, RoutingRecord


class MetricsLog:
    """Appends metric lines to ``path`` (JSON, one object a line) and keeps them in ``lines``.

    ``tensorboard``: a folder for TensorBoard event files (needs the ``tensorboard`` package,
    ``pip install "vlmoe[tensorboard]"``), or None.
    """

    def __init__(self, path: Path | None, lines: list[dict[str, Any]], tensorboard: Path | None):
        self.path, self.lines = path, lines
        self.writer = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "train.tensorboard: the tensorboard package is not installed "
                    '(pip install "vlmoe[tensorboard]")'
                ) from None
            self.writer = SummaryWriter(str(tensorboard))

    def write(self, line: dict[str, Any]) -> None:
        """Record one line: in memory, appended to the file, and as TensorBoard scalars."""
        self.lines.append(line)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        if self.writer is not None:
            kind = line.get("kind", "train")
            for k, v in line.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"{kind}/{k}", v, line.get("step", 0))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Window:
    """Sums of per-step training numbers between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.t0 = time.time()

    def add(self, out: ModelOutput, samples: int) -> None:
        """Add one step's task loss, aux loss, sample count and the model's metric sums."""
        s = self.sums
        task = out.task_loss if out.task_loss is not None else out.aux_loss.new_zeros(())
        s["loss"] = s.get("loss", 0.0) + float(task.detach())
        s["aux"] = s.get("aux", 0.0) + float(out.aux_loss.detach())
        s["steps"] = s.get("steps", 0.0) + 1
        s["samples"] = s.get("samples", 0.0) + samples
        for k, v in out.metrics.items():
            s[k] = s.get(k, 0.0) + float(v)

    def line(self, totals: dict[str, float]) -> dict[str, Any]:
        """The log fields from window sums ``totals`` (already summed over processes)."""
        steps = max(totals.get("steps", 0.0), 1.0)
        out = {
            "loss": round(totals.get("loss", 0.0) / steps, 5),
            "aux_loss": round(totals.get("aux", 0.0) / steps, 6),
        }
        if totals.get("count"):
            out["accuracy"] = round(totals.get("correct", 0.0) / totals["count"], 4)
        for k, v in totals.items():  # a model's own extra losses ("align_loss"): per step
            if k.endswith("_loss"):
                out[k] = round(v / steps, 5)
        out["samples_per_s"] = round(
            totals.get("samples", 0.0) / max(time.time() - self.t0, 1e-9), 1
        )
        return out

    def reset(self) -> None:
        self.sums, self.t0 = {}, time.time()


class RoutingWindow:
    """Per MoE FFN, between two routing lines: tokens per expert, mean entropy, dropped share."""

    def __init__(self) -> None:
        self.tokens: dict[str, torch.Tensor] = {}
        self.means: dict[str, list[float]] = {}  # name → [entropy, dropped, n]

    def add(self, records: list[RoutingRecord]) -> None:
        for r in records:
            t = r.stats.tokens_per_expert.detach().float().cpu()
            m = self.means.setdefault(r.name, [0.0, 0.0, 0])
            self.tokens[r.name] = self.tokens[r.name] + t if r.name in self.tokens else t.clone()
            m[2] += 1  # running means over the window's forwards (equal weights)
            m[0] += (float(r.stats.router_entropy) - m[0]) / m[2]
            m[1] += (float(r.stats.dropped_fraction) - m[1]) / m[2]

    def summary(self) -> dict[str, Any]:
        """{ffn: {"share": [E], "entropy", "dropped", "imbalance"}}, then empties the window."""
        out = {}
        for name, t in self.tokens.items():
            share = (t / t.sum().clamp_min(1)).tolist()
            ent, drop, _ = self.means[name]
            out[name] = {
                "share": [round(s, 4) for s in share],
                "entropy": round(ent, 4),
                "dropped": round(drop, 4),
                "imbalance": round(float(t.max() / t.mean().clamp_min(1e-9)), 3),
            }
        self.tokens, self.means = {}, {}
        return out


class CollapseMonitor:
    """Warns when routing collapses: an expert that stays dead (< 1% of tokens) or takes more
    than `share` of the tokens for `patience` consecutive routing checks. Each sustained span
    warns once; `warnings` accumulates the messages."""

    def __init__(self, share: float, patience: int) -> None:
        self.share, self.patience = share, patience
        self.streak: dict[str, int] = {}
        self.warnings: list[str] = []

    def update(self, step: int, name: str, share_E: list[float]) -> list[str]:
        """Feed one routing check of FFN ``name``; returns the new warnings (if any)."""
        new = []
        for e, s in enumerate(share_E):
            for kind, bad in (("dead", s < 0.01), ("flooded", s > self.share)):
                key = f"{name}/{e}/{kind}"  # a string key: the streaks are saved as JSON
                self.streak[key] = self.streak.get(key, 0) + 1 if bad else 0
                if self.streak[key] == self.patience:
                    what = "< 1%" if kind == "dead" else f"> {self.share:.0%}"
                    new.append(
                        f"step {step}: {name} expert {e} has taken {what} of tokens for "
                        f"{self.patience} routing checks in a row ({s:.1%} now): routing collapse"
                    )
        self.warnings += new
        return new
