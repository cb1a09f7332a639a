"""Fixtures of the MoE-LLaVA tests: one `moe-llava-tiny` run (all three stages) per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmoe.cli import main


@pytest.fixture(scope="session")
def llava_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of `vlmoe train --preset moe-llava-tiny --out OUT` through main(): OUT-align,
    OUT-dense and OUT (the upcycled final stage)."""
    out = tmp_path_factory.mktemp("llava") / "run"
    rc = main(["train", "--preset", "moe-llava-tiny", "--out", str(out), "--no-progress",
               "--json"])  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def llava_task():
    """The `GenerativeTask` of the tiny preset (data, BPE tokenizer, cached features)."""
    from vlmoe.llava.config import moe_llava_tiny
    from vlmoe.llava.task import GenerativeTask

    return GenerativeTask(moe_llava_tiny())
