"""The VL-MoE answer-classification family (checkpoint kind ``"vqa"``): its presets, its
training task and `vlmoe eval` / `vlmoe ask` on its checkpoints. See `vlmoe.families`."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from vlmoe.config import PRESETS, RunConfig
from vlmoe.train.task import VQATask
from vlmoe.validate import UsageError, ask_question, check_input_file, json_line

__all__ = ["PRESETS", "ask_command", "config_from_dict", "eval_command", "make_task"]


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """A RunConfig from `RunConfig.to_dict()` output (ConfigError naming a bad field)."""
    return RunConfig.from_dict(d)


def make_task(cfg: RunConfig, resume_from: Path | None, meta: dict[str, Any] | None) -> VQATask:
    """The training task; resuming, it keeps the checkpoint's tokenizer and answer list."""
    if resume_from is not None and meta is not None:
        return VQATask.resuming(cfg, resume_from, meta)
    return VQATask(cfg)


def eval_command(args: argparse.Namespace) -> int:
    """Accuracy overall and per question kind (yes/no, color, shape) on a VQA split."""
    from vlmoe.checkpoint import load_checkpoint
    from vlmoe.cli import parse_device
    from vlmoe.data import load_data
    from vlmoe.evaluate import evaluate

    device = parse_device(args.device)
    ck = load_checkpoint(args.checkpoint, device)
    data = args.data or ck.config.data
    t = ck.config.train
    split = load_data(data, args.split, ck.config.model.image_size, t.val_fraction, t.data_seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate(ck.model, split, ck.tokenizer, ck.answers, device=device)
    for w in caught:
        print(f"vlmoe: warning: {w.message}", file=sys.stderr)
    if args.json:
        print(json_line({"data": split.source, **res.to_dict()}))
        return 0
    print(f"{split.source}: accuracy {res.accuracy:.4f} on {res.n} questions (loss {res.loss:.4f})")
    for kind, v in res.per_kind.items():
        print(f"  {kind:<7} {v['accuracy']:.4f}  (n={v['n']})")
    return 0


def ask_command(args: argparse.Namespace) -> int:
    """The three most likely answers to a question about an image."""
    from vlmoe.checkpoint import load_checkpoint
    from vlmoe.cli import parse_device
    from vlmoe.data import load_image
    from vlmoe.evaluate import answer_question

    question = ask_question(args, "this checkpoint answers from its own answer list",
                            "a question about the image")  # fmt: skip
    if args.image is None:
        raise UsageError("--image: this checkpoint answers questions about an image: give one")
    device = parse_device(args.device)
    check_input_file(args.image, "--image", "image file")  # before the slower checkpoint
    ck = load_checkpoint(args.checkpoint, device)
    image = load_image(args.image, ck.config.model.image_size)
    top = answer_question(ck.model, ck.tokenizer, ck.answers, image, question, top=3)
    if args.json:
        print(json_line({"answer": top[0][0], "top": [{"answer": a, "prob": p} for a, p in top]}))
        return 0
    print(top[0][0])
    for a, p in top:
        print(f"  {a:<12} {p:.3f}")
    return 0


def robustness_evaluator(checkpoint: str | Path) -> tuple[Any, int]:
    """(evaluator, image size) for `bench/robustness.py`: test accuracy per question kind."""
    from vlmoe.checkpoint import load_checkpoint
    from vlmoe.robustness import vqa_evaluator

    ck = load_checkpoint(checkpoint)
    return vqa_evaluator(ck), ck.config.model.image_size
