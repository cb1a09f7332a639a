"""Helpers for CLI tests (a uniquely named module: `conftest` is ambiguous across test folders)."""

from __future__ import annotations

import json

import pytest

from vlmoe.cli import main


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run main(argv) and return (exit code, stdout, stderr)."""
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])
