"""Fixtures for tests/serve: a second (dense) checkpoint, one real `vlmoe serve` process per
test session and worker, and a headless Chromium."""

from __future__ import annotations

import dataclasses
import os

import pytest

from vlmoe.checkpoint import load_checkpoint, save_checkpoint
from vlmoe.models import build_model
from vlmoe.serve.harness import find_chromium, serve_process


@pytest.fixture(scope="session")
def dense_checkpoint(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """A dense twin of the tiny checkpoint (same tokenizer and answers, MoE off, untrained
    weights): a valid second checkpoint for the side-by-side view, made in well under 1 s."""
    ck = load_checkpoint(tiny_checkpoint)
    model_cfg = dataclasses.replace(ck.config.model, moe_vision=False, moe_text=False)
    cfg = dataclasses.replace(ck.config, model=model_cfg, preset="dense-tiny")
    out = tmp_path_factory.mktemp("dense") / "dense-tiny"
    save_checkpoint(out, cfg, build_model(model_cfg), ck.tokenizer, ck.answers, metrics=[])
    return out


@pytest.fixture(scope="session")
def server(tiny_checkpoint, dense_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """`vlmoe serve --checkpoint TINY --compare DENSE` on a free loopback port, with its own
    empty TMPDIR. On teardown: no traceback in its stderr, nothing left in its TMPDIR."""
    tmp = tmp_path_factory.mktemp("server-tmp")
    logs = tmp_path_factory.mktemp("server-logs")
    env = {**os.environ, "TMPDIR": str(tmp)}
    args = ["--compare", str(dense_checkpoint), "--threads", "1"]
    with serve_process(tiny_checkpoint, args, log_dir=logs, env=env) as srv:
        yield srv
        assert srv.proc.poll() is None, f"the server died: {srv.stderr()[-2000:]}"
    assert "Traceback" not in srv.stderr(), srv.stderr()[-3000:]
    assert list(tmp.iterdir()) == [], "the server wrote files to its temporary folder"


@pytest.fixture(scope="session")
def browser():
    """Headless system Chromium through Selenium. Missing browser: skipped on a developer's
    machine, a failure under CI (CI=true), where tools/system-deps.sh must have installed it."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[dev]')")
    if find_chromium() is None:
        _missing("chromium/chromedriver not found (run: sh tools/system-deps.sh)")
    from vlmoe.serve.harness import chromium_driver

    driver = chromium_driver()
    try:
        yield driver
    finally:
        driver.quit()


def _missing(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests need {why}")
    pytest.skip(why)
