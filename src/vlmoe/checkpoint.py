"""Checkpoints: a folder a person can read, written atomically.

    DIR/config.json        the RunConfig, the answer list, format version (JSON)
    DIR/model.safetensors  the model's state dict
    DIR/tokenizer.json     the word tokenizer (`tokenizers` format)
    DIR/metrics.jsonl      every metric line logged so far, one JSON object a line
    DIR/trainer_state.json step, stage, schedule, monitor state — only for --resume
    DIR/trainer_state/     model + optimiser + RNG state (torch.distributed.checkpoint) — --resume

The whole folder is first written to `DIR.tmp`, then swapped in by renames. A crash mid-save
leaves the previous checkpoint intact (as DIR, or as DIR.old during the swap's one-rename
window, which `resolve_checkpoint_dir` falls back to).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmoe.config import ConfigError, RunConfig
from vlmoe.data import DataError, WordTokenizer
from vlmoe.data.errors import one_line
from vlmoe.models import VLMoE, build_model
from vlmoe.validate import _is_unicode, check_finite_state, estimate_params

FORMAT = "vlmoe-checkpoint/2"  # /2: one DenseFFN layout, trainer state without pickle
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


def write_run_files(
    folder: Path,
    meta: dict[str, Any],
    state: dict[str, torch.Tensor],
    metrics: list[dict[str, Any]],
) -> None:
    """Write config.json (``meta`` plus the format tag), model.safetensors and metrics.jsonl
    into ``folder`` (which must exist)."""
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    with open(folder / "metrics.jsonl", "w") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")


def commit(tmp: Path, out: Path) -> Path:
    """Make the complete folder ``tmp`` the checkpoint ``out``, atomically for readers.

    Swap: out → out.old, tmp → out, drop out.old. Between the two renames only out.old
    exists, which ``resolve_checkpoint_dir`` falls back to.
    """
    _fsync_dir(tmp)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def fresh_tmp(out: Path) -> Path:
    """An empty ``OUT.tmp`` folder beside ``out`` to write a checkpoint into."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    out_dir: str | Path,
    config: RunConfig,
    model: torch.nn.Module,
    tokenizer: WordTokenizer,
    answers: list[str],
    metrics: list[dict[str, Any]],
) -> Path:
    """Write a complete (not resumable) VQA checkpoint of one process's model to ``out_dir``,
    replacing any previous one atomically. Training saves through ``vlmoe.train``."""
    out = Path(out_dir)
    tmp = fresh_tmp(out)
    meta = {"task": "vqa", "run": config.to_dict(), "answers": list(answers)}
    write_run_files(tmp, meta, model.state_dict(), metrics)
    tokenizer.save(tmp / "tokenizer.json")
    return commit(tmp, out)


def _fsync_dir(d: Path) -> None:
    for p in d.rglob("*"):
        if not p.is_file():
            continue
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def recover(out: Path) -> None:
    """Finish a swap that a crash interrupted: with ``out`` gone and ``out.old`` complete,
    rename ``out.old`` back to ``out``. A run resuming in ``out`` calls this first, so that
    it never writes into a half-swapped folder."""
    old = out.with_name(out.name + ".old")
    if not out.exists() and old.is_dir():
        os.replace(old, out)


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


def load_checkpoint_meta(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config.json as a dict, the metric lines) of a checkpoint; a missing or corrupt
    config.json raises CheckpointError naming it. Torn metric lines are skipped."""
    d = resolve_checkpoint_dir(path)
    f = d / "config.json"
    if not f.is_file():
        raise CheckpointError(
            f"{f}: missing (expected a vlmoe checkpoint with {', '.join(REQUIRED)})"
        )
    return _read_meta(f), _read_metrics(d / "metrics.jsonl")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint's model.safetensors (CheckpointError if unreadable)."""
    f = resolve_checkpoint_dir(path) / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(
            f"{f}: missing (expected a vlmoe checkpoint with {', '.join(REQUIRED)})"
        )
    return _load_weights(f)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder; any missing or corrupt file raises CheckpointError naming it.

    Checked before the model is used: config.json (every field's type and range), the answer
    list (distinct non-empty strings, one per output of the head), the tokenizer (its vocabulary
    is the model's), and the weights (the shapes config.json describes, finite values)."""
    d = resolve_checkpoint_dir(path)
    for name in REQUIRED:
        if not (d / name).is_file():
            raise CheckpointError(
                f"{d / name}: missing (expected a vlmoe checkpoint with {', '.join(REQUIRED)})"
            )
    config, answers = _read_config(d / "config.json")
    try:
        tokenizer = WordTokenizer.load(d / "tokenizer.json")
    except DataError as e:
        raise CheckpointError(str(e)) from None
    m = config.model
    if tokenizer.vocab_size != m.vocab_size:
        raise CheckpointError(
            f"{d / 'tokenizer.json'}: {tokenizer.vocab_size} words, but config.json says "
            f"model.vocab_size={m.vocab_size}"
        )
    state = _read_weights(d / "model.safetensors", config)
    model = build_model(m)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{d / 'model.safetensors'}: weights do not match config.json ({first})"
        ) from None
    model.to(device).eval()
    return Checkpoint(d, config, model, tokenizer, answers, _read_metrics(d / "metrics.jsonl"))


def _read_meta(f: Path) -> dict[str, Any]:
    """config.json as a dict, in this format; anything else → CheckpointError naming it."""
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({one_line(e)[:200]})") from None
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({e.strerror})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{f}: expected format {FORMAT!r}, got {one_line(repr(got))[:80]}")
    return meta


def saved_run_config(meta: dict[str, Any], f: Path, from_dict: Callable[[Any], Any]) -> Any:
    """The run config in config.json's ``"run"`` (read from file ``f``) rebuilt by a family's
    ``from_dict``; a missing field or bad content → CheckpointError naming ``f``."""
    if "run" not in meta:
        raise CheckpointError(f"{f}: missing field 'run'")
    try:
        return from_dict(meta["run"])
    except ConfigError as e:
        raise CheckpointError(f"{f}: invalid content ({e})") from None


def _read_config(f: Path) -> tuple[RunConfig, list[str]]:
    """config.json → (RunConfig, answers); anything malformed → CheckpointError naming it."""
    meta = _read_meta(f)
    if "run" not in meta or "answers" not in meta:
        raise CheckpointError(f"{f}: missing field {'run' if 'run' not in meta else 'answers'!r}")
    config = saved_run_config(meta, f, RunConfig.from_dict)
    answers = meta["answers"]
    n = config.model.num_answers
    if not isinstance(answers, list) or not all(
        isinstance(a, str) and a.strip() and _is_unicode(a) for a in answers
    ):
        raise CheckpointError(f"{f}: answers: expected a list of non-empty strings")
    if len(set(answers)) != len(answers) or len(answers) != n:
        raise CheckpointError(
            f"{f}: answers: expected {n} distinct strings (model.num_answers), got "
            f"{len(answers)} with {len(set(answers))} distinct"
        )
    return config, answers


def _read_weights(f: Path, config: RunConfig) -> dict[str, torch.Tensor]:
    """model.safetensors → state dict, refused if unreadable, far smaller than the model
    config.json describes (which would allocate that model first), or not finite."""
    state = _load_weights(f)
    held = sum(t.numel() for t in state.values())
    want = estimate_params(config.model)
    if want > 4 * held + 1_000_000:
        raise CheckpointError(
            f"{f}: holds {held:,} weights, but config.json describes a model of about "
            f"{want:,}; the two do not belong together"
        )
    try:
        check_finite_state(state, f)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    return state


def _load_weights(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read weights ({one_line(e)[:200]})") from None


def _read_metrics(f: Path) -> list[dict[str, Any]]:
    """metrics.jsonl is informational: unreadable bytes or a torn line never block loading."""
    metrics: list[dict[str, Any]] = []
    if not f.is_file():
        return metrics
    try:
        text = f.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return metrics
    for line in text.splitlines():
        try:
            m = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(m, dict):
            metrics.append(m)
    return metrics


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read trainer_state.json (step, stage, schedule; JSON — loading it runs no code) for
    --resume; missing or corrupt raises CheckpointError naming the file."""
    f = resolve_checkpoint_dir(path) / "trainer_state.json"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing — this checkpoint cannot be resumed")
    try:
        state = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{f}: cannot read trainer state ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{f}: expected a JSON object with an integer 'step'")
    return state
