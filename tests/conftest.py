"""Shared fixtures: one tiny trained checkpoint per test session (training takes seconds)."""

from __future__ import annotations

import pytest

from vlmoe.cli import main


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A checkpoint folder trained with `vlmoe train --preset tiny` through main()."""
    out = tmp_path_factory.mktemp("tiny") / "ck"
    rc = main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    return out
