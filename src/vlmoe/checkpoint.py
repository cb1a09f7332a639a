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
from vlmoe.data.errors import one_line
from vlmoe.models import VLMoE, build_model
from vlmoe.validate import check_finite_state, estimate_params

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


def _read_config(f: Path) -> tuple[RunConfig, list[str]]:
    """config.json → (RunConfig, answers); anything malformed → CheckpointError naming it."""
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({one_line(e)[:200]})") from None
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({e.strerror})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{f}: expected format {FORMAT!r}, got {one_line(repr(got))[:80]}")
    if "run" not in meta or "answers" not in meta:
        raise CheckpointError(f"{f}: missing field {'run' if 'run' not in meta else 'answers'!r}")
    try:
        config = RunConfig.from_dict(meta["run"])
    except ConfigError as e:
        raise CheckpointError(f"{f}: invalid content ({e})") from None
    answers = meta["answers"]
    n = config.model.num_answers
    if not isinstance(answers, list) or not all(
        isinstance(a, str) and a.strip() and _utf8(a) for a in answers
    ):
        raise CheckpointError(f"{f}: answers: expected a list of non-empty strings")
    if len(set(answers)) != len(answers) or len(answers) != n:
        raise CheckpointError(
            f"{f}: answers: expected {n} distinct strings (model.num_answers), got "
            f"{len(answers)} with {len(set(answers))} distinct"
        )
    return config, answers


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_weights(f: Path, config: RunConfig) -> dict[str, torch.Tensor]:
    """model.safetensors → state dict, refused if unreadable, far smaller than the model
    config.json describes (which would allocate that model first), or not finite."""
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read weights ({one_line(e)[:200]})") from None
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
    """Read trainer_state.pt for --resume; missing or corrupt raises CheckpointError."""
    f = resolve_checkpoint_dir(path) / "trainer_state.pt"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing — this checkpoint cannot be resumed")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a torn file
        raise CheckpointError(f"{f}: cannot read trainer state ({type(e).__name__})") from None
