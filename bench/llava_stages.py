"""MoE-LLaVA stage speed and accuracy: run stages of the `moe-llava` preset shortened to a
fraction of an epoch, then print one row per stage (median training samples/s over the
logged windows, steps, wall time, validation and test exact match on `eval_subset` questions).

    python bench/llava_stages.py --stages align --epochs 0.1 --threads 1    # ~10 min, 1 core
    python bench/llava_stages.py --stages align dense moe --epochs 0.05

Stages run in order from the first one named (each starting from the previous one's
weights, as `vlmoe train` does); the frozen EfficientNet-Lite0 features are computed once
and cached on disk (about 2-4 minutes at 224 px on the first run). ``--preset moe-llava-tiny``
checks the script in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlmoe.llava.config import PRESETS
from vlmoe.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="moe-llava", choices=sorted(PRESETS))
    ap.add_argument("--stages", nargs="+", default=["align"])
    ap.add_argument("--epochs", type=float, default=0.1, help="epochs per stage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-subset", type=int, default=200)
    ap.add_argument("--out", default=None, help="keep the checkpoints here (default: a temp dir)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = PRESETS[a.preset]()
    chosen = [s for s in cfg.train.stages if s.name in a.stages]
    cfg.train.stages = tuple(dataclasses.replace(s, epochs=a.epochs) for s in chosen)
    cfg.train.eval_subset = a.eval_subset
    out = Path(a.out or tempfile.mkdtemp(prefix="llava-bench-")) / "run"
    t0 = time.time()
    res = train(cfg, out, progress=False)
    wall = time.time() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"\npreset {a.preset}, {a.epochs} epoch(s) per stage, {a.threads} thread(s), "
          f"wall {wall:.0f} s (data, features, training, evaluation)")  # fmt: skip
    print(f"{'stage':<8}{'steps':>7}{'samples/s':>11}{'val EM':>9}")
    single = len(chosen) == 1
    for s in chosen:
        mine = [m for m in lines if single or m.get("stage") == s.name]
        sps = [m["samples_per_s"] for m in mine if m["kind"] == "train"]
        val = [m["accuracy"] for m in mine if m["kind"] == "val"]
        steps = max((m["step"] for m in mine if m["kind"] == "train"), default=0)
        print(f"{s.name:<8}{steps:>7}{statistics.median(sps) if sps else 0:>11.1f}"
              f"{val[-1] if val else float('nan'):>9.3f}")  # fmt: skip
    if res.test is not None:
        kinds = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in res.test.per_kind.items())
        print(f"test exact match {res.test.accuracy:.3f} on {res.test.n} questions ({kinds})")


if __name__ == "__main__":
    main()
