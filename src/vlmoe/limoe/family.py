"""The LIMoE contrastive image–text family (checkpoint kind ``"contrastive"``): presets
``limoe``, ``limoe-tiny``, ``limoe-dense``, the training task (`vlmoe.limoe.task`) and
`vlmoe eval` / `ask` / `inspect` on its checkpoints. See `vlmoe.families`.

Twemoji graphics © Twitter, Inc and other contributors, CC-BY 4.0 (the emoji pairs).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vlmoe.limoe.config import LIMOE_PRESETS, LIMoERunConfig
from vlmoe.limoe.task import ContrastiveTask
from vlmoe.validate import UsageError, check_input_file, check_text, json_line

__all__ = ["PRESETS", "ask_command", "config_from_dict", "eval_command", "inspect_command",
           "make_task"]  # fmt: skip

PRESETS = LIMOE_PRESETS


def config_from_dict(d: dict[str, Any]) -> LIMoERunConfig:
    """A LIMoERunConfig from `LIMoERunConfig.to_dict()` output (ConfigError naming a field)."""
    return LIMoERunConfig.from_dict(d)


def make_task(
    cfg: LIMoERunConfig, resume_from: Path | None, meta: dict[str, Any] | None
) -> ContrastiveTask:
    """The training task; resuming, it keeps the checkpoint's tokenizer."""
    if resume_from is not None:
        return ContrastiveTask.resuming(cfg, resume_from)
    return ContrastiveTask(cfg)


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | None, split: str, device: str = "cpu"
) -> dict[str, Any]:
    """What `vlmoe eval` prints for a contrastive checkpoint, as one dict.

    data None / "easy-vqa": zero-shot over the 24 easy-VQA captions on ``split``'s images
    ("zero_shot": accuracy, colour and shape accuracy in %, count) and image↔text retrieval on
    the held-out emoji of ``split`` ("retrieval": R@1 / R@5 in %, mean ranks, count; the
    test emoji are unseen in training). data a JSONL file: retrieval over its pairs.
    """
    from vlmoe.data.pairs import contrastive_splits, load_pairs_jsonl
    from vlmoe.limoe.evaluate import retrieval, zero_shot
    from vlmoe.limoe.task import load_contrastive
    from vlmoe.validate import EASYVQA_NAMES

    ck = load_contrastive(checkpoint, device)
    cfg, L = ck.config, ck.config.model.max_text_len
    spec = data or cfg.data
    out: dict[str, Any] = {"checkpoint": str(ck.path), "split": split}
    if spec.lower() not in EASYVQA_NAMES:
        out["data"] = spec
        out["retrieval"] = retrieval(ck.model, ck.tokenizer, load_pairs_jsonl(spec, cfg.model.image_size), L)  # fmt: skip
        return out
    if split == "train":
        raise UsageError("--split train: contrastive checkpoints are evaluated on val or test")
    sets = contrastive_splits(cfg.pairs, cfg.model.image_size, cfg.train.data_seed, cfg.train.val_fraction)  # fmt: skip
    out["data"] = "easy-vqa captions + twemoji"
    if f"{split}_zero_shot" in sets:
        out["zero_shot"] = zero_shot(ck.model, ck.tokenizer, sets[f"{split}_zero_shot"], L)
    if f"{split}_retrieval" in sets:
        out["retrieval"] = retrieval(ck.model, ck.tokenizer, sets[f"{split}_retrieval"], L)
    return out


def eval_command(args: argparse.Namespace) -> int:
    """Zero-shot caption accuracy and emoji retrieval (R@1, R@5, mean rank)."""
    from vlmoe.cli import parse_device

    res = evaluate_checkpoint(args.checkpoint, args.data, args.split, parse_device(args.device))
    if args.json:
        print(json_line(res))
        return 0
    print(f"{res['checkpoint']} on {res['data']} ({res['split']}):")
    z = res.get("zero_shot")
    if z is not None:
        parts = f"  (colour {z['color_accuracy']:.2f}%, shape {z['shape_accuracy']:.2f}%)" if "color_accuracy" in z else ""  # fmt: skip
        print(f"  zero-shot over the captions: {z['accuracy']:.2f}% of {z['count']} images{parts}")
    r = res.get("retrieval")
    if r is not None:
        for d, name in (("i2t", "image→text"), ("t2i", "text→image")):
            print(f"  {name} retrieval over {r['count']} pairs: R@1 {r[f'{d}_r1']:.1f}%  "
                  f"R@5 {r[f'{d}_r5']:.1f}%  mean rank {r[f'{d}_mean_rank']:.1f}")  # fmt: skip
    return 0


def ask_command(args: argparse.Namespace) -> int:
    """Rank the --choices texts for --image: probabilities (softmax of scaled similarity)."""
    from vlmoe.cli import parse_device
    from vlmoe.data import load_image
    from vlmoe.limoe.evaluate import rank_texts
    from vlmoe.limoe.task import load_contrastive

    if args.image is None:
        raise UsageError("--image: a contrastive checkpoint ranks texts against an image: give one")  # fmt: skip
    if not args.choices:
        raise UsageError('--choices: a contrastive checkpoint ranks given texts: '
                         'add --choices "a red circle" "a blue square" ...')  # fmt: skip
    if args.question is not None:
        raise UsageError(f"question: a contrastive checkpoint answers no questions (got "
                         f"{args.question!r}); put the texts to rank after --choices")  # fmt: skip
    for i, c in enumerate(args.choices):
        check_text(f"--choices[{i}]", c)
        if not c.strip():
            raise UsageError(f"--choices: text {i + 1} is empty; expected non-empty texts")
    check_input_file(args.image, "--image", "image file")
    ck = load_contrastive(args.checkpoint, parse_device(args.device))
    image = load_image(args.image, ck.config.model.image_size)
    ranked = rank_texts(ck.model, ck.tokenizer, image, args.choices, ck.config.model.max_text_len)
    if args.json:
        top = [{"text": t, "prob": p, "cosine": c} for t, p, c in ranked]
        print(json_line({"answer": ranked[0][0], "top": top}))
        return 0
    print(ranked[0][0])
    for t, p, _ in ranked:
        print(f"  {p:.3f}  {t}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    """Per expert: image vs text share, per-modality entropy and load, top words, patches."""
    from vlmoe.limoe.inspect import run_inspect

    return run_inspect(args)


def robustness_evaluator(checkpoint: str | Path) -> tuple[Any, int]:
    """(evaluator, image size) for `bench/robustness.py`: zero-shot accuracy over the 24
    easy-VQA captions, one example per image (kinds: colour, shape)."""
    import torch

    from vlmoe.data.pairs import EASYVQA_CAPTIONS, PairSet
    from vlmoe.limoe.evaluate import zero_shot
    from vlmoe.limoe.task import load_contrastive

    ck = load_contrastive(checkpoint)
    m = ck.config.model

    def run(split: Any, scenes: list[tuple[str, str]]) -> dict[str, Any]:
        texts = [f"a {c} {s}" for c, s in scenes]
        labels = torch.tensor([EASYVQA_CAPTIONS.index(t) for t in texts], dtype=torch.long)
        pairs = PairSet(split.images, texts, labels, list(EASYVQA_CAPTIONS),
                        list(split.image_names), split.source)  # fmt: skip
        r = zero_shot(ck.model, ck.tokenizer, pairs, m.max_text_len)
        kinds = {"color": r["color_accuracy"] / 100, "shape": r["shape_accuracy"] / 100}
        return {"accuracy": r["accuracy"] / 100, "per_kind": kinds, "n": r["count"]}

    return run, m.image_size
