"""Checkpoints: a folder a person can read, written atomically.

    DIR/config.json        the RunConfig, the answer list, format version (JSON)
    DIR/model.safetensors  the model's state dict
    DIR/tokenizer.json     the word tokenizer (`tokenizers` format)
    DIR/metrics.jsonl      every metric line logged so far, one JSON object a line
    DIR/trainer_state.pt   optimiser, scheduler, RNG states, step — only for --resume

The whole folder is first written to `DIR.tmp`, then swapped in by renames. A crash mid-save
leaves the previous checkpoint intact (as DIR, or as DIR.old during the swap's one-rename
window, which `resolve_checkpoint_dir` falls back to).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmoe.config import ConfigError, RunConfig
from vlmoe.data import DataError, WordTokenizer
from vlmoe.models import VLMoE, build_model

FORMAT = "vlmoe-checkpoint/1"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and what is needed to feed it."""

    path: Path
    config: RunConfig
    model: VLMoE
    tokenizer: WordTokenizer
    answers: list[str]
    metrics: list[dict[str, Any]]


def save_checkpoint(
    out_dir: str | Path,
    config: RunConfig,
    model: torch.nn.Module,
    tokenizer: WordTokenizer,
    answers: list[str],
    metrics: list[dict[str, Any]],
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint to `out_dir`, replacing any previous one atomically."""
    out = Path(out_dir)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": FORMAT, "run": config.to_dict(), "answers": list(answers)}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    tokenizer.save(tmp / "tokenizer.json")
    with open(tmp / "metrics.jsonl", "w") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    _fsync_dir(tmp)
    # Swap: out → out.old, tmp → out, drop out.old. Between the two renames only out.old exists.
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _fsync_dir(d: Path) -> None:
    for p in d.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The folder to load: `path`, or `path.old` if a save was interrupted mid-swap."""
    p = Path(path)
    if p.is_dir():
        return p
    old = p.with_name(p.name + ".old")
    if not p.exists() and old.is_dir():
        return old
    if p.exists():
        raise CheckpointError(f"{p}: not a checkpoint folder (it is a file)")
    raise CheckpointError(f"{p}: checkpoint folder not found")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder; any missing or corrupt file raises CheckpointError naming it."""
    d = resolve_checkpoint_dir(path)
    for name in REQUIRED:
        if not (d / name).is_file():
            raise CheckpointError(
                f"{d / name}: missing (expected a vlmoe checkpoint with {', '.join(REQUIRED)})"
            )
    try:
        meta = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{d / 'config.json'}: expected format {FORMAT!r}, got {got!r}")
    try:
        config = RunConfig.from_dict(meta["run"])
        answers = [str(a) for a in meta["answers"]]
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{d / 'config.json'}: invalid content ({e})") from None
    try:
        tokenizer = WordTokenizer.load(d / "tokenizer.json")
    except DataError as e:
        raise CheckpointError(str(e)) from None
    try:
        state = load_file(str(d / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{d / 'model.safetensors'}: cannot read weights ({e})") from None
    model = build_model(config.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{d / 'model.safetensors'}: weights do not match config.json ({first})"
        ) from None
    model.to(device).eval()
    metrics: list[dict[str, Any]] = []
    mpath = d / "metrics.jsonl"
    if mpath.is_file():
        for line in mpath.read_text().splitlines():
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # metrics are informational; a torn line must not block loading
    return Checkpoint(d, config, model, tokenizer, answers, metrics)


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read trainer_state.pt for --resume; missing or corrupt raises CheckpointError."""
    f = resolve_checkpoint_dir(path) / "trainer_state.pt"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing — this checkpoint cannot be resumed")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a torn file
        raise CheckpointError(f"{f}: cannot read trainer state ({type(e).__name__})") from None
