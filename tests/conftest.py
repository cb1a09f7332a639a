"""Shared fixtures: one tiny trained checkpoint per test session (training takes seconds)."""

from __future__ import annotations

import os

import pytest
import torch

from vlmoe.cli import main

# One torch thread per test process (and, through the environment, per subprocess): CI runs
# `pytest -n 2` on 2 cores, so more threads only oversubscribe them, and OpenMP threads that
# spin on a shared core made single tests 10–30× slower under load (a 600 s timeout tripped).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A checkpoint folder trained with `vlmoe train --preset tiny` through main()."""
    out = tmp_path_factory.mktemp("tiny") / "ck"
    rc = main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    return out
