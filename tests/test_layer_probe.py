"""bench/layer_probe.py, run as a user runs it, on the session's tiny checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "layer_probe.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH), *args, "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_layer_probe_reads_shapes_from_every_layer_of_a_checkpoint(tiny_checkpoint):
    r = _run("--checkpoint", str(tiny_checkpoint), "--size", "0.3", "0.5",
             "--train-scenes", "300", "--test-scenes", "150")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = dict(re.findall(r"^\| (stem|block \d|answer token) \| ([\d.]+)% \| [\d.]+% \|$",
                           r.stdout, re.M))  # fmt: skip
    tests = {m[0]: float(m[1]) for m in re.findall(r"^\| ([\w ]+) \| [\d.]+% \| ([\d.]+)% \|$",
                                                   r.stdout, re.M)}  # fmt: skip
    # the tiny preset has 2 blocks; every layer's features tell large shapes apart better than
    # chance (1/3): 150 test scenes put chance + 3 standard deviations near 45%
    assert list(rows) == ["stem", "block 0", "block 1", "answer token"]
    assert all(v > 45 for v in tests.values()), r.stdout


def test_layer_probe_names_a_missing_checkpoint_in_one_line(tmp_path):
    r = _run("--checkpoint", str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "nowhere" in r.stderr, r.stderr
