"""bench/question_probe.py, run as a user runs it, on the session's tiny checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "question_probe.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH), *args, "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_question_probe_prints_a_row_per_checkpoint(tiny_checkpoint):
    r = _run("--checkpoint", str(tiny_checkpoint), "--questions", "1024")
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| (.+?) \| (cls|cls\+mean) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \|"
                      r" ([\d.]+)% \| (.+) \|$", r.stdout, re.M)  # fmt: skip
    assert len(rows) == 1, r.stdout
    path, head, cls, text, vision, yes_no, _ = rows[0]
    assert path == str(tiny_checkpoint) and head == "cls"
    # every word's own token carries the word: the mean text token names the colour asked
    # about far above chance (1 in 8) even in a model trained for seconds
    assert float(text) > 60, r.stdout
    assert 0 <= float(cls) <= 100 and 0 <= float(vision) <= 100 and 0 < float(yes_no) <= 100


def test_question_probe_names_a_missing_checkpoint_in_one_line(tmp_path):
    r = _run("--checkpoint", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "nowhere" in r.stderr, r.stderr
