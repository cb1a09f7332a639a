"""The JSONL format for a user's own data, and `load_data`, the one entry point by spec.

One JSON object a line:

    {"image": "imgs/cat.png", "question": "what color is the cat?", "answer": "black"}

"image" is relative to the JSONL file's folder (or absolute). Blank lines are skipped;
other keys are ignored. Each distinct image is decoded once however many lines name it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlmoe.data.dataset import VQASplit, question_kind, split_by_image
from vlmoe.data.easyvqa import load_easyvqa
from vlmoe.data.errors import DataError, one_line
from vlmoe.data.images import decode_images, resolve

EASYVQA_SPECS = ("easy-vqa", "easyvqa", "easy_vqa")
_FIELDS = ("image", "question", "answer")


def load_jsonl(path: str | os.PathLike, image_size: int = 64) -> VQASplit:
    """Load every example of a JSONL file (see the module docstring).

    Raises `DataError` with "FILE:LINE: …" for a line that is not a JSON object, a missing
    field, a field that is not a string, an empty question or image path, and a missing or
    corrupt image (reported at the first line that names it); a missing, unreadable or
    example-free file raises `DataError` naming it.
    """
    file = Path(path)
    text = _read_text(file)
    base = file.parent
    questions: list[str] = []
    answers: list[str] = []
    image_rows: list[int] = []
    row_of: dict[Path, int] = {}
    image_paths: list[Path] = []
    image_names: list[str] = []
    first_line: list[int] = []  # line that first named each image row, for error messages
    # split on "\n" only: str.splitlines would also cut at U+2028, U+0085, … which JSON
    # allows raw inside a string, turning one valid line into two broken ones
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        image, question, answer = _parse_record(line, f"{file}:{lineno}")
        resolved = resolve(image, base)
        if resolved not in row_of:
            row_of[resolved] = len(image_paths)
            image_paths.append(resolved)
            image_names.append(image)
            first_line.append(lineno)
        image_rows.append(row_of[resolved])
        questions.append(question)
        answers.append(answer)
    if not questions:
        raise DataError(f"{file}: no examples (expected one JSON object a line)")
    images, errors = decode_images(image_paths, image_size)
    if errors:
        row = min(errors, key=lambda r: first_line[r])
        raise DataError(f"{file}:{first_line[row]}: {errors[row]}")
    return VQASplit(
        images=images,
        image_index=torch.tensor(image_rows, dtype=torch.long),
        questions=questions,
        answers=answers,
        kinds=[question_kind(q, a) for q, a in zip(questions, answers, strict=True)],
        source=str(file),
        image_names=image_names,
    )


def _parse_record(line: str, where: str) -> tuple[str, str, str]:
    """One JSONL line → (image, question, answer), stripped and non-empty; else DataError."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in _FIELDS:
        if key not in record:
            raise DataError(f"{where}: missing field {key!r} (need {', '.join(_FIELDS)})")
        if not isinstance(record[key], str):
            got = type(record[key]).__name__
            raise DataError(f"{where}: field {key!r} must be a string, got {got}")
        _check_unicode(record[key], f"{where}: field {key!r}")
        if not record[key].strip():
            raise DataError(f"{where}: field {key!r} is empty")
    image, question, answer = (record[k].strip() for k in _FIELDS)
    return image, question, answer


def _check_unicode(text: str, where: str) -> None:
    """JSON escapes can spell lone surrogates ("\\udce9"), which are not text: no tokenizer,
    terminal or file encoder accepts them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: not valid Unicode text (lone surrogate at {e.start})") from None


def _read_text(file: Path) -> str:
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of line 1
        return file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{file}: data file not found") from None
    except IsADirectoryError:
        raise DataError(f"{file}: expected a .jsonl file, got a directory") from None
    except PermissionError:
        raise DataError(f"{file}: data file not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{file}: cannot read ({one_line(e)})") from None


def load_data(
    spec: str | os.PathLike,
    split: str,
    image_size: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> VQASplit:
    """Load a split by data spec: "easy-vqa", a .jsonl file, or a folder of .jsonl files.

    - "easy-vqa": `load_easyvqa(split, …)`; split is "train", "val" or "test".
    - FILE.jsonl: "test" (or "all") is the whole file — what `vlmoe eval --data` scores;
      "train" and "val" carve the file by image with `val_fraction` and `seed`, exactly as
      for easy-VQA, so training on one file still gets a held-out validation split.
    - a FOLDER holding train.jsonl (and optionally val.jsonl, test.jsonl): split "X" reads
      X.jsonl; without val.jsonl, "train"/"val" are carved from train.jsonl as above.
    A missing file or unknown spec raises `DataError`.
    """
    if split not in ("train", "val", "test", "all"):
        raise DataError(f"unknown split {split!r}, expected train, val, test or all")
    if str(spec).lower() in EASYVQA_SPECS:
        if split == "all":
            raise DataError("easy-vqa: split 'all' is not defined; use train, val or test")
        return load_easyvqa(split, image_size, val_fraction, seed)
    path = Path(spec)
    if path.is_dir():
        if split in ("train", "val") and not (path / "val.jsonl").is_file():
            return _carve(load_jsonl(path / "train.jsonl", image_size), split, val_fraction, seed)
        return load_jsonl(path / f"{split}.jsonl", image_size)
    if not path.exists():
        raise DataError(
            f"{spec}: data not found (expected 'easy-vqa', a .jsonl file or a folder of them)"
        )
    full = load_jsonl(path, image_size)
    if split in ("test", "all"):
        return full
    return _carve(full, split, val_fraction, seed)


def _carve(full: VQASplit, split: str, val_fraction: float, seed: int) -> VQASplit:
    train, val = split_by_image(full, val_fraction, seed)
    out = train if split == "train" else val
    out.source = f"{full.source} ({split} part, val_fraction={val_fraction}, seed={seed})"
    return out
