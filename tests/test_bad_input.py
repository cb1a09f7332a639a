"""Every user mistake → one line `vlmoe: error: ...`, exit 1, no traceback, nothing touched.

The cases live in `bad_input_cases.py` (also the source of docs/bad-input.md); each runs
`vlmoe.cli.main` in-process on a sandbox folder whose every byte is hashed before and after.
A few run as real subprocesses: the console entry point, and argv bytes that are not UTF-8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bad_input_cases import CASES, make_sandbox, tree_hash
from cli_helpers import run_cli
from easy_vqa import get_test_image_paths

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def assert_one_error(rc: int, out: str, err: str, needle: str) -> str:
    """Exit 1, nothing on stdout, stderr exactly one `vlmoe: error:` line holding needle."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert rc == 1, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("vlmoe: error: "), err
    assert needle in lines[0], (needle, lines[0])
    assert out == "", out
    return lines[0]


@pytest.fixture
def sandbox(tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    s = make_sandbox(tmp_path / "s", tiny_checkpoint, get_test_image_paths()[0])
    monkeypatch.chdir(s)  # default output folders (checkpoints/, compare/) would land here
    return s


def test_there_are_at_least_60_distinct_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_touches_nothing(case, sandbox, capsys):
    if case.root_skips and IS_ROOT:
        pytest.skip("root ignores file permissions")
    if case.id == "out-read-only" and (
        not Path("/proc/sys").is_dir() or os.access("/proc/sys", os.W_OK)
    ):
        pytest.skip("needs a Linux /proc/sys that refuses writes")
    if case.setup is not None:
        case.setup(sandbox)
    before = tree_hash(sandbox)
    try:
        rc, out, err = run_cli(capsys, *case.args(sandbox))
    finally:
        after = tree_hash(sandbox)
        os.chmod(sandbox, 0o755)  # so that pytest can clean up after permission cases
    assert_one_error(rc, out, err, case.needle)
    assert after == before, "a file under the sandbox changed"


def test_out_naming_a_file_leaves_the_file_and_no_old_copy(sandbox, capsys):
    notes = sandbox / "notes.txt"
    text = notes.read_text()
    rc, out, err = run_cli(capsys, "train", "--preset", "tiny", "--out", str(notes))
    assert_one_error(rc, out, err, "notes.txt")
    assert notes.read_text() == text and not (sandbox / "notes.txt.old").exists()


def _run(*argv: str | bytes, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vlmoe", *argv], capture_output=True, cwd=cwd, env=env, timeout=120
    )


def test_subprocess_question_in_latin1_bytes(sandbox):
    # what a shell in a Latin-1 locale passes: b"caf\xe9" is not UTF-8
    p = _run("ask", "--checkpoint", "ck", "--image", "img.png", b"caf\xe9 ?", cwd=sandbox)
    err = p.stderr.decode("utf-8", "replace")
    assert_one_error(p.returncode, p.stdout.decode(), err, "not valid UTF-8")
    assert "byte 0xe9" in err


def test_subprocess_nan_weights_never_print_non_json(sandbox):
    from bad_input_cases import _poison, edit_weights

    edit_weights(_poison(float("nan")))(sandbox)
    before = tree_hash(sandbox)
    p = _run(
        "ask", "--checkpoint", "ck", "--image", "img.png", "--json", "what shape?", cwd=sandbox
    )
    assert_one_error(p.returncode, p.stdout.decode(), p.stderr.decode(), "non-finite")
    assert tree_hash(sandbox) == before


def test_subprocess_out_naming_a_file_is_refused_before_training(sandbox):
    before = tree_hash(sandbox)
    p = _run("train", "--preset", "tiny", "--data", "data.jsonl", "--out", "notes.txt", cwd=sandbox)
    assert_one_error(p.returncode, p.stdout.decode(), p.stderr.decode(), "notes.txt")
    assert tree_hash(sandbox) == before


def test_subprocess_broken_tiff_gives_the_error_line_without_pillow_warnings(sandbox):
    from bad_input_cases import write_tiff_prefix

    write_tiff_prefix("cut.tif", 8)(sandbox)  # Pillow warns "Corrupt EXIF data", then fails
    p = _run("ask", "--checkpoint", "ck", "--image", "cut.tif", "what shape?", cwd=sandbox)
    assert_one_error(p.returncode, p.stdout.decode(), p.stderr.decode(), "cut.tif")


def test_metrics_jsonl_that_is_not_utf8_does_not_block_loading(sandbox, capsys):
    (sandbox / "ck" / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe torn\n')
    rc, out, err = run_cli(capsys, "eval", "--checkpoint", str(sandbox / "ck"), "--data", "data.jsonl", "--json")  # fmt: skip
    assert rc == 0 and json.loads(out)["n"] == 3, err


def test_json_output_is_strict():
    from vlmoe.validate import UsageError, json_line

    assert json.loads(json_line({"a": [1.5, {"b": 2}]})) == {"a": [1.5, {"b": 2}]}
    with pytest.raises(UsageError, match=r"top\[1\]\.prob"):
        json_line({"top": [{"prob": 0.5}, {"prob": float("nan")}]})


def test_a_utf8_bom_and_u2028_inside_a_string_are_valid_jsonl(tmp_path):
    from PIL import Image

    from vlmoe.data import load_jsonl

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    line = json.dumps({"image": "a.png", "question": "what\u2028shape?", "answer": "x"})
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (line.replace("\\u2028", "\u2028") + "\n").encode())
    split = load_jsonl(f, 8)
    assert split.questions == ["what\u2028shape?"]


def test_parameter_estimate_stays_within_2x_of_the_real_count():
    import dataclasses

    from vlmoe.config import PRESETS
    from vlmoe.models import build_model
    from vlmoe.validate import estimate_params

    for name, preset in PRESETS.items():
        m = dataclasses.replace(preset().model, vocab_size=40, num_answers=13)
        real = sum(p.numel() for p in build_model(m).parameters())
        assert real / 2 <= estimate_params(m) <= 2 * real, name
