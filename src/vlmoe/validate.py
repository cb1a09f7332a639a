"""Checks of user input that run before any work starts: one clear error, nothing touched.

Every check here raises an exception whose message is ONE line naming the argument, file or
field, what was expected and what was got; `vlmoe.cli.main` prints it as
`vlmoe: error: MESSAGE` and exits 1. The pieces:

- argparse value types (`int_arg`, `float_arg`): numbers are parsed, range-checked and
  NaN/inf-checked while the command line is read, before any file is opened;
- `check_namespace`: what every subcommand gets by construction (finite floats, text that is
  valid UTF-8, a writable `--out`);
- `check_output_dir`, `check_checkpoint_out`, `check_data_spec`: paths, before training;
- `check_fields`: a config dataclass against its own type annotations (config.json);
- `check_batch_fits`: the one check that needs the loaded data (called by the trainer);
- `check_finite_state`, `estimate_params`: a checkpoint's weights before they are used;
- `json_line`: strict JSON output (NaN/inf are an error, never printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from vlmoe.data.errors import DataError, one_line

#: argparse dests that hold file-system paths: these may carry bytes that are not UTF-8
#: (a file name from another locale is still a valid file name), every other text may not.
PATH_DESTS = frozenset({"out", "data", "checkpoint", "image"})
#: accepted spellings of the built-in data set (same as `vlmoe.data.jsonl.EASYVQA_SPECS`)
EASYVQA_NAMES = ("easy-vqa", "easyvqa", "easy_vqa")


class UsageError(ValueError):
    """A command-line value (or an output it would produce) is invalid; one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


# ---------------------------------------------------------------- command-line value types


def int_arg(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse `type=` for an integer in [lo, hi] (hi None = no upper bound)."""
    want = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            v = int(text.strip().replace("_", ""), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {v}")
        return v

    return parse


def float_arg(
    lo: float, hi: float | None = None, *, lo_open: bool = False
) -> Callable[[str], float]:
    """An argparse `type=` for a finite number > lo (lo_open) or >= lo, and <= hi."""
    want = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        want += f" and <= {hi:g}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text.strip()!r}")
        return v

    return parse


def check_text(what: str, text: str) -> str:
    """`text` unchanged if it is valid Unicode; else UsageError. Python decodes command-line
    bytes that are not UTF-8 (a shell in another locale) to lone surrogates, which no
    tokenizer, terminal or JSON file accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        # 0xDC80..0xDCFF is how Python's surrogateescape carries an undecodable byte
        bad = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        raise UsageError(
            f"{what}: not valid UTF-8 text ({bad} at character {e.start}); "
            "re-type it in a UTF-8 terminal (e.g. LANG=C.UTF-8)"
        ) from None
    return text


def check_namespace(args: argparse.Namespace) -> None:
    """Checks every subcommand gets by construction: every float finite, every non-path text
    valid UTF-8, every `--out` a writable folder location."""
    for dest, value in vars(args).items():
        flag = "--" + dest.replace("_", "-")
        items = value if isinstance(value, list | tuple) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{flag}: expected a finite number, got {v}")
            if isinstance(v, str) and dest not in PATH_DESTS:
                check_text(flag if dest != "question" else "question", v)
    if getattr(args, "out", None) is not None:
        check_output_dir(args.out, "--out")


# ---------------------------------------------------------------- paths


def _nearest_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike, flag: str, *, beside: bool = False) -> Path:
    """Check that a folder can be created (or written) at `path`, touching nothing.

    `path` must not be a file; the nearest existing folder at or above it (above its parent
    when `beside`: the folder is written next to it first, then renamed into place) must be a
    writable folder, which also catches a read-only file system (os.access reports EROFS).
    """
    p = Path(path)
    if not str(path).strip():
        raise UsageError(f"{flag}: expected a folder path, got an empty string")
    if p.exists() and not p.is_dir():
        raise UsageError(
            f"{flag} {p}: exists and is not a folder (a file; give a folder or a new name)"
        )
    base = _nearest_existing(p.absolute().parent if beside else p.absolute())
    if not base.is_dir():
        raise UsageError(f"{flag} {p}: {base} is a file, so no folder can be created under it")
    if not os.access(base, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(base) else "permission denied"
        raise UsageError(f"{flag} {p}: cannot write in {base} ({why})")
    return p


def _read_only_fs(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_checkpoint_out(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """`vlmoe train --out`: a new name, an empty folder, or a vlmoe checkpoint (with --resume
    or --overwrite). A folder that is not a checkpoint is never replaced: the save swaps the
    whole folder, which would delete the user's files in it."""
    p = check_output_dir(path, "--out", beside=True)
    for side in (p.with_name(p.name + ".tmp"), p.with_name(p.name + ".old")):
        if side.exists() and not side.is_dir():
            raise UsageError(
                f"--out {p}: {side} is a file; the checkpoint save needs that name for a folder"
            )
    if resume or not p.is_dir():
        return p
    entries = sorted(x.name for x in p.iterdir())
    if "config.json" in entries and not overwrite:
        raise UsageError(
            f"--out {p}: a checkpoint is already there; use --resume to continue or --overwrite"
        )
    if entries and "config.json" not in entries:
        raise UsageError(
            f"--out {p}: the folder exists and is not a vlmoe checkpoint ({len(entries)} "
            f"entries, e.g. {entries[0]!r}); refusing to replace it, choose a new folder"
        )
    return p


def check_data_spec(spec: str, flag: str = "--data") -> None:
    """'easy-vqa', a readable file, or a folder holding train.jsonl; else DataError."""
    if spec.lower() in EASYVQA_NAMES:
        return
    p = Path(spec)
    if not spec.strip() or not p.exists():
        raise DataError(
            f"{flag} {spec}: file not found (expected 'easy-vqa', a .jsonl file or a folder)"
        )
    if p.is_dir():
        if not (p / "train.jsonl").is_file() and not (p / "test.jsonl").is_file():
            raise DataError(f"{flag} {spec}: the folder holds no train.jsonl or test.jsonl")
        return
    if not p.is_file():
        raise DataError(
            f"{flag} {spec}: expected a .jsonl file, got a special file (device or pipe)"
        )
    if not os.access(p, os.R_OK):
        raise DataError(f"{flag} {spec}: data file not readable (permission denied)")


def check_batch_fits(
    n_examples: int, batch_size: int, world_size: int, source: str, unit: str = "questions"
) -> None:
    """The trainer calls this once the training split is loaded, before building the model:
    a split with fewer examples (``unit``: questions, pairs) than one global batch gives zero
    steps an epoch."""
    need = batch_size * world_size
    if n_examples < need:
        procs = f" × {world_size} processes" if world_size > 1 else ""
        raise DataError(
            f"{source}: the training split has {n_examples} {unit}, fewer than one batch "
            f"(train.batch_size {batch_size}{procs}); use a smaller --batch-size or more data"
        )


# ---------------------------------------------------------------- config fields


def check_fields(obj: Any, prefix: str, error: type[Exception] = ValueError) -> None:
    """Check every field of dataclass `obj` against its type annotation: int (not bool),
    float (finite; an int is accepted), bool, str (valid UTF-8), tuple[int, ...] (a list is
    accepted), `X | None`. Nested dataclass fields are skipped (their own check runs).
    Raises `error("PREFIX.FIELD: expected ..., got ...")`."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        v, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(v) or f.name.startswith("_"):
            continue
        want = _matches(v, hint)
        if want is not None:
            raise error(f"{prefix}.{f.name}: expected {want}, got {_show(v)}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the string annotations once per class


def _show(v: Any) -> str:
    return f"{one_line(repr(v))[:60]} ({type(v).__name__})"


def _matches(v: Any, hint: Any) -> str | None:
    """None if `v` fits `hint`, else a description of what was expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if v is None and type(None) in options:
            return None
        wants = [_matches(v, h) for h in options if h is not type(None)]
        return None if None in wants else " or ".join(w for w in wants if w) + " or null"
    if origin is tuple:
        elem = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(elem):  # e.g. train.stages: each checks itself
            ok = isinstance(v, list | tuple) and all(isinstance(x, elem) for x in v)
            return None if ok else f"a list of {elem.__name__}"
        ok = isinstance(v, list | tuple) and all(_matches(x, elem) is None for x in v)
        return None if ok else f"a list of {'integers' if elem is int else elem.__name__}"
    if hint is bool:
        return None if isinstance(v, bool) else "true or false"
    if hint is int:
        return None if isinstance(v, int) and not isinstance(v, bool) else "an integer"
    if hint is float:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        return None if ok else "a finite number"
    if hint is str:
        ok = isinstance(v, str) and _is_unicode(v)
        return None if ok else "a UTF-8 string"
    return None  # a type this checker does not know: the field's own validation decides


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_range(
    name: str, v: float, lo: float, hi: float | None = None, error: type[Exception] = ValueError
) -> None:
    """`error` unless lo <= v <= hi (hi None = unbounded)."""
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise error(f"{name}: expected {bound}, got {v}")


# ---------------------------------------------------------------- weights


def check_finite_state(state: Mapping[str, torch.Tensor], file: str | os.PathLike) -> None:
    """Every tensor of a state dict floating point (or integer) and free of NaN/inf; else
    DataError naming the first bad tensor. A checkpoint from a run that diverged would
    otherwise answer every question with probability NaN."""
    for name, t in state.items():
        if t.is_complex() or t.dtype == torch.bool:
            raise DataError(f"{file}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise DataError(
                    f"{file}: tensor {name!r} holds {bad} non-finite values (NaN/inf) of "
                    f"{t.numel()}; the checkpoint is corrupt (did training diverge?)"
                )


def estimate_params(m: Any) -> int:
    """An upper-bound-ish parameter count of a VL-MoE `ModelConfig` (within ~2× of the
    real count), computed without building the model, so that a config.json asking for a
    model far larger than its weights file is refused before any allocation."""
    D, ff, E, k = m.d_model, m.d_ff, m.moe.num_experts, m.moe.top_k
    dense_ffn = 3 * D * ff
    moe_ffn = E * 3 * D * max(1, ff // k) + E * D + m.moe.num_shared_experts * 3 * D * ff
    per_layer = 4 * D * D + 2 * max(dense_ffn, moe_ffn if m.uses_moe else 0)
    stem = 3 * m.stem_channels * m.patch_size * m.patch_size + m.stem_channels * m.patch_size * D
    embed = (m.vocab_size + m.max_text_len + m.num_patches) * D
    return m.n_layers * per_layer + stem + embed + 4 * D * D + D * m.num_answers


# ---------------------------------------------------------------- output


def json_line(obj: Any) -> str:
    """`json.dumps(obj)` that refuses NaN/inf (they are not JSON); UsageError names the field."""
    import json

    bad = _nonfinite_path(obj, "")
    if bad is not None:
        raise UsageError(
            f"the result holds a non-finite number at {bad or 'top level'} (NaN/inf are not "
            "JSON): the model's outputs are not finite"
        )
    return json.dumps(obj, allow_nan=False)


def _nonfinite_path(x: Any, at: str) -> str | None:
    if isinstance(x, float):
        return None if math.isfinite(x) else at
    if isinstance(x, dict):
        items: Any = ((f"{at}.{k}" if at else str(k), v) for k, v in x.items())
    elif isinstance(x, list | tuple):
        items = ((f"{at}[{i}]", v) for i, v in enumerate(x))
    else:
        return None
    for where, v in items:
        found = _nonfinite_path(v, where)
        if found is not None:
            return found
    return None


def ask_question(args: Any, why_no_choices: str, missing: str) -> str:
    """The question of `vlmoe ask` for a checkpoint that answers questions (not --choices):
    UsageError when --choices is given (``why_no_choices`` says why), when the question is
    missing (``missing`` says what is expected), not UTF-8 or empty. Returns it stripped."""
    if args.choices:
        raise UsageError(f"--choices: {why_no_choices} (--choices is for contrastive checkpoints)")
    if args.question is None:
        raise UsageError(f"question: expected {missing}")
    check_text("question", args.question)
    if not args.question.strip():
        raise UsageError("question: expected a non-empty question, got an empty string")
    return args.question.strip()


def check_input_file(path: str | os.PathLike, flag: str, what: str) -> Path:
    """`path` is an existing, readable regular file (not a folder, FIFO or device, which
    could block or never end); else DataError naming it."""
    p = Path(path)
    if not str(path).strip():
        raise DataError(f"{flag}: expected a path to an {what}, got an empty string")
    if not p.exists():
        raise DataError(f"{flag} {p}: {what} not found")
    if p.is_dir():
        raise DataError(f"{flag} {p}: expected an {what}, got a folder")
    if not p.is_file():
        raise DataError(f"{flag} {p}: expected an {what}, got a special file (device or pipe)")
    if not os.access(p, os.R_OK):
        raise DataError(f"{flag} {p}: {what} not readable (permission denied)")
    return p
