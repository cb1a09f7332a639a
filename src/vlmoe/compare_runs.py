"""What every `vlmoe compare` mode shares: one (variant, seed) run through the real trainer,
statistics over seeds, the paired difference to a reference variant, the ±1 std band of a
curve, and JSON without NaN.

The modes (`vlmoe.compare`: VL-MoE dense vs MoE; `vlmoe.limoe.compare`: LIMoE entropy
losses; `vlmoe.llava.compare`: upcycled vs dense continuation) differ in their variants and
in what they measure beside the validation curve; a run and its summary look the same.

A run's result (``run_one``) is a dict: ``seed``, ``steps``, ``seconds``, ``step_seconds``
(median training step), ``final_val_loss``, ``final_val_accuracy``, ``curve`` (one
``{"step", "loss", "accuracy"}`` per validation, in step order), ``collapse_warnings``.
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import warnings
from pathlib import Path
from typing import Any

__all__ = ["add_paired_deltas", "aggregate_runs", "finite", "fmt_params", "mean_std", "median",
           "plot_band", "run_one"]  # fmt: skip


def mean_std(xs: list[float]) -> tuple[float, float]:
    """(mean, sample std) of ``xs``; the std of one value is 0."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def median(xs: list[float]) -> float:
    """The median of ``xs``; NaN when empty."""
    return statistics.median(xs) if xs else float("nan")


def run_one(cfg: Any, out_dir: Path, task: Any = None) -> dict[str, Any]:
    """Train one (variant, seed) with `vlmoe.train.train` (``task``: a prepared `Task` whose
    ``cfg`` is ``cfg``; default: the family's) and pull out its validation curve and step time
    (see the module docstring for the fields)."""
    from vlmoe.train import train

    # train() reports each validation run on stdout (tqdm.write) even without a progress bar;
    # compare prints its own one line per run instead. Routing-collapse warnings stay in
    # each run's metrics.jsonl and are counted below.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        res = train(cfg, out_dir, progress=False, evaluate_test=False, log=lambda s: None,
                    task=task)  # fmt: skip
    val = [m for m in res.metrics if m["kind"] == "val"]
    # time per step: median over per-step log lines (log_every=1), robust to validation runs
    # and to other processes on the machine
    sps = [
        m["samples_per_s"] for m in res.metrics if m["kind"] == "train" and m.get("samples_per_s")
    ]
    step_s = cfg.train.batch_size / median(sps) if sps else res.seconds / max(1, res.step)
    return {
        "seed": cfg.train.seed,
        "steps": res.step,
        "seconds": round(res.seconds, 2),
        "step_seconds": round(step_s, 4),
        "final_val_loss": val[-1]["loss"] if val else float("nan"),
        "final_val_accuracy": val[-1]["accuracy"] if val else float("nan"),
        "curve": [{"step": m["step"], "loss": m["loss"], "accuracy": m["accuracy"]} for m in val],
        "collapse_warnings": sum(m["kind"] == "warning" for m in res.metrics),
    }


def aggregate_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over one variant's runs (`run_one` results): mean ± std of the final validation loss
    and accuracy, the median step time, and the loss curve's mean ± std per validation step
    (the steps of the first run; a shorter run drops out of the later points)."""
    loss_m, loss_s = mean_std([r["final_val_loss"] for r in runs])
    acc_m, acc_s = mean_std([r["final_val_accuracy"] for r in runs])
    curve = []
    for i, p in enumerate(runs[0]["curve"]):
        m, sd = mean_std([r["curve"][i]["loss"] for r in runs if len(r["curve"]) > i])
        curve.append({"step": p["step"], "loss_mean": m, "loss_std": sd})
    return {
        "val_loss_mean": loss_m,
        "val_loss_std": loss_s,
        "val_accuracy_mean": acc_m,
        "val_accuracy_std": acc_s,
        "step_seconds_median": median([r["step_seconds"] for r in runs]),
        "curve": curve,
    }


def add_paired_deltas(info: dict[str, dict[str, Any]], ref: str = "dense") -> None:
    """With a ``ref`` variant in ``info`` (variant → {"runs": [...], ...}): per variant, the
    per-seed difference of the final validation loss from ``ref``'s run of the same seed
    (same data order), as ``delta_vs_{ref}_mean`` / ``_std``. Without ``ref``: nothing."""
    if ref not in info:
        return
    base = {r["seed"]: r["final_val_loss"] for r in info[ref]["runs"]}
    for v in info.values():
        m, s = mean_std([r["final_val_loss"] - base[r["seed"]] for r in v["runs"]])
        v[f"delta_vs_{ref}_mean"], v[f"delta_vs_{ref}_std"] = m, s


def plot_band(ax: Any, runs: list[dict[str, Any]], key: str, label: str) -> None:
    """Draw on matplotlib axes ``ax`` the mean over ``runs`` of their curves' ``key`` against
    step, with a ±1 std band (over the validations every run reached)."""
    n = min(len(r["curve"]) for r in runs)
    steps = [p["step"] for p in runs[0]["curve"][:n]]
    ms = [mean_std([r["curve"][i][key] for r in runs]) for i in range(n)]
    (line,) = ax.plot(steps, [m for m, _ in ms], label=label, lw=1.6)
    ax.fill_between(steps, [m - s for m, s in ms], [m + s for m, s in ms], alpha=0.2,
                    color=line.get_color(), lw=0)  # fmt: skip


def fmt_params(n: int) -> str:
    """A parameter count for a table: 1.23M, or 45.6k below 100k."""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def finite(x: Any) -> Any:
    """``x`` (nested dicts, lists, tuples) with non-finite floats replaced by None: JSON has
    no NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x
