"""Shared fixtures: one tiny trained checkpoint per test session (training takes seconds)."""

from __future__ import annotations

import json

import pytest

from vlmoe.cli import main


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A checkpoint folder trained with `vlmoe train --preset tiny` through main()."""
    out = tmp_path_factory.mktemp("tiny") / "ck"
    rc = main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    return out


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run main(argv) and return (exit code, stdout, stderr)."""
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])
