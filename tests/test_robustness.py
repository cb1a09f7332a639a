"""The robustness bench end to end on a tiny checkpoint, in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlmoe.checkpoint import load_checkpoint
from vlmoe.data import load_easyvqa
from vlmoe.evaluate import evaluate
from vlmoe.robustness import default_shifts, markdown_table, summarize

BENCH = Path(__file__).resolve().parents[1] / "bench" / "robustness.py"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300
    )


def test_bench_prints_a_row_per_shift_and_writes_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "rob.json"
    p = _bench("--checkpoint", str(tiny_checkpoint), "--max-images", "12", "--json", str(out))
    assert p.returncode == 0, p.stderr
    shifts = default_shifts()
    table = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(shifts)  # header + one row per shift and severity
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["shift"], r["severity"]) for r in rows] == [(s.name, s.severity) for s in shifts]
    assert all(0 <= r["accuracy"] <= 1 and r["n"] == rows[0]["n"] for r in rows)
    assert {"yes/no", "color", "shape"} <= set(rows[0]["per_kind"])
    # the unshifted row is the plain test accuracy on the same questions
    ck = load_checkpoint(tiny_checkpoint)
    test = load_easyvqa("test", ck.config.model.image_size)
    sub = test.subset((test.image_index < 12).nonzero().flatten())
    want = evaluate(ck.model, sub, ck.tokenizer, ck.answers)
    assert rows[0]["n"] == want.n and abs(rows[0]["accuracy"] - want.accuracy) < 1e-9
    assert res["summary"] == summarize(rows)
    assert "worst:" in markdown_table(rows, baseline=rows)


def test_bench_bad_checkpoint_is_one_clean_line(tmp_path):
    p = _bench("--checkpoint", str(tmp_path / "missing"))
    assert p.returncode == 1
    assert p.stderr.startswith("vlmoe: error:") and "Traceback" not in p.stderr


def test_bench_shifts_picks_rows_by_name_and_refuses_unknown_names(tiny_checkpoint, tmp_path):
    out = tmp_path / "rob.json"
    p = _bench("--checkpoint", str(tiny_checkpoint), "--max-images", "4", "--json", str(out),
               "--shifts", "re-rendered", "another program")  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["shift"] for r in rows] == ["re-rendered", "another program"]
    p = _bench("--checkpoint", str(tiny_checkpoint), "--shifts", "sideways")
    assert p.returncode == 1 and p.stderr.startswith("vlmoe: error: --shifts: unknown")
    assert "Traceback" not in p.stderr
