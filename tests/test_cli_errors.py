"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from cli_helpers import run_cli
from easy_vqa import get_test_image_paths


def _assert_clean_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("vlmoe: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_unknown_preset(capsys):
    rc, _, err = run_cli(capsys, "train", "--preset", "huge")
    _assert_clean_error(rc, err, "unknown preset", "huge", "tiny")


def test_missing_data_file(capsys, tmp_path):
    rc, _, err = run_cli(
        capsys, "train", "--preset", "tiny", "--data", str(tmp_path / "nope.jsonl")
    )
    _assert_clean_error(rc, err, "nope.jsonl")


def test_invalid_jsonl_line_reports_the_line_number(capsys, tmp_path):
    img = get_test_image_paths()[0]
    f = tmp_path / "d.jsonl"
    f.write_text(
        f'{{"image": "{img}", "question": "what shape?", "answer": "circle"}}\n{{not json\n'
    )
    rc, _, err = run_cli(
        capsys, "train", "--preset", "tiny", "--data", str(f), "--out", str(tmp_path / "o")
    )
    _assert_clean_error(rc, err, "d.jsonl", "2")


def test_missing_checkpoint(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "none"))
    _assert_clean_error(rc, err, "none", "not found")


@pytest.mark.parametrize(
    "name,content",
    [("model.safetensors", b"garbage" * 10), ("config.json", b"{oops"), ("tokenizer.json", b"[]")],
)
def test_corrupt_checkpoint(capsys, tmp_path, tiny_checkpoint, name, content):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    (ck / name).write_bytes(content)
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", str(ck))
    _assert_clean_error(rc, err, name)


def test_checkpoint_missing_a_file(capsys, tmp_path, tiny_checkpoint):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    (ck / "model.safetensors").unlink()
    rc, _, err = run_cli(
        capsys, "ask", "--checkpoint", str(ck), "--image", get_test_image_paths()[0], "what?"
    )
    _assert_clean_error(rc, err, "model.safetensors", "missing")


def test_missing_image(capsys, tmp_path, tiny_checkpoint):
    rc, _, err = run_cli(
        capsys,
        "ask",
        "--checkpoint",
        str(tiny_checkpoint),
        "--image",
        str(tmp_path / "x.png"),
        "what?",
    )
    _assert_clean_error(rc, err, "x.png")


def test_corrupt_image(capsys, tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    rc, _, err = run_cli(
        capsys, "ask", "--checkpoint", str(tiny_checkpoint), "--image", str(bad), "what?"
    )
    _assert_clean_error(rc, err, "bad.png")


def test_empty_question(capsys, tiny_checkpoint):
    rc, _, err = run_cli(
        capsys,
        "ask",
        "--checkpoint",
        str(tiny_checkpoint),
        "--image",
        get_test_image_paths()[0],
        "  ",
    )
    _assert_clean_error(rc, err, "question")


def test_unavailable_device(capsys, tiny_checkpoint):
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", str(tiny_checkpoint), "--device", "tpu")
    _assert_clean_error(rc, err, "--device")


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    # the real installed entry point, in a real subprocess
    p = subprocess.run(
        [sys.executable, "-m", "vlmoe", "eval", "--checkpoint", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_clean_error(p.returncode, p.stderr, "missing")


def test_unknown_answers_count_as_wrong_with_a_warning(capsys, tmp_path, tiny_checkpoint):
    img = get_test_image_paths()[0]
    f = tmp_path / "d.jsonl"
    f.write_text(
        f'{{"image": "{img}", "question": "what shape is this?", "answer": "hexagon"}}\n'
        f'{{"image": "{img}", "question": "what shape is this?", "answer": "octagon"}}\n'
    )
    rc, out, err = run_cli(
        capsys, "eval", "--checkpoint", str(tiny_checkpoint), "--data", str(f), "--json"
    )
    assert rc == 0
    import json

    res = json.loads(out.strip().splitlines()[-1])
    assert res["accuracy"] == 0.0 and res["n_unknown_answer"] == 2
    assert "warning" in err and "not in the model's answer set" in err
