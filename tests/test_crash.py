"""Crash safety: SIGKILLed at random moments, `vlmoe train` always leaves a loadable
checkpoint and a resumed run ends on the uninterrupted run's weights (short version of
tests/kill_train.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from kill_train import run  # noqa: E402


def test_random_sigkills_never_break_the_checkpoint(tmp_path):
    res = run(tmp_path, kills=3, seed=1)
    assert res["kills"] >= 1
