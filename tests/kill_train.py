"""Crash safety by force: SIGKILL `vlmoe train` at random moments, resume, compare.

    python tests/kill_train.py --kills 50 [--epochs 8] [--seed 0] [--out /tmp/kill]   # the slow version

Each round starts `vlmoe train` (fresh, or `--resume` once a checkpoint exists) with a
checkpoint after every step (`--save-every 1`, so many kills land inside a save and its
folder swap), waits until training makes progress, sleeps a random 0–0.6 s and SIGKILLs it.
After every kill the checkpoint, if one was written yet, must load and be resumable. At the
end the run is resumed to completion and its weights must equal an uninterrupted run's, bit
for bit. `tests/test_crash.py` runs a short version in the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ARGS = ["--preset", "tiny", "--save-every", "1", "--threads", "1", "--no-progress", "--json"]
EPOCHS = {"n": 2}  # tiny: 24 steps an epoch; each kill lets a few steps pass


def _cmd(out: Path, resume: bool) -> list[str]:
    extra = ["--resume"] if resume else ["--overwrite", "--epochs", str(EPOCHS["n"])]
    return [sys.executable, "-m", "vlmoe", "train", *ARGS, "--out", str(out), *extra]


def saved_step(out: Path) -> int | None:
    """The step of the checkpoint in ``out`` after a crash, checking that it loads whole
    (weights, tokenizer, trainer state); None when no checkpoint was written yet."""
    from vlmoe.checkpoint import load_checkpoint, load_trainer_state, resolve_checkpoint_dir

    try:
        d = resolve_checkpoint_dir(out)
    except Exception:
        return None
    if not (d / "config.json").exists():
        return None  # killed before the first save: only the metrics log exists
    load_checkpoint(d)  # raises on anything missing or torn
    state = load_trainer_state(d)
    assert (d / "trainer_state").is_dir(), f"{d}: trainer_state/ missing"
    return int(state["step"])


def kill_once(out: Path, rng: random.Random, timeout: float = 120.0) -> tuple[int | None, bool]:
    """Start (or resume) training, SIGKILL it at a random moment once it makes progress.
    Returns (checkpoint step after the kill, whether the run had already finished)."""
    before = saved_step(out)
    p = subprocess.Popen(_cmd(out, before is not None), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    end = time.time() + timeout
    try:
        while time.time() < end and p.poll() is None:
            step = _peek_step(out)
            if step is not None and step != before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
        p.communicate()
    return saved_step(out), p.returncode == 0


def _peek_step(out: Path) -> int | None:
    for d in (out, out.with_name(out.name + ".old")):
        try:
            return int(json.loads((d / "trainer_state.json").read_text())["step"])
        except Exception:
            continue
    return None


def run(root: Path, kills: int, seed: int) -> dict[str, object]:
    """The whole experiment; returns its counts. Raises AssertionError on any failure."""
    rng = random.Random(seed)
    ref, out = root / "reference", root / "killed"
    subprocess.run(_cmd(ref, False), check=True, capture_output=True)
    steps, finished = [], False
    for _ in range(kills):
        step, finished = kill_once(out, rng)
        steps.append(step)
        if finished:
            break
    if not finished:
        subprocess.run(_cmd(out, saved_step(out) is not None), check=True, capture_output=True)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different}"
    return {"kills": len(steps), "steps_after_kills": steps, "finished_early": finished}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/vlmoe-kill")
    ap.add_argument("--epochs", type=int, default=8, help="length of the run (tiny epochs)")
    a = ap.parse_args()
    EPOCHS["n"] = a.epochs
    t0 = time.time()
    res = run(Path(a.out), a.kills, a.seed)
    print(json.dumps({**res, "seconds": round(time.time() - t0, 1)}))
    print(f"{res['kills']} kills, 0 unloadable checkpoints, resumed weights equal")


if __name__ == "__main__":
    main()
