"""The MoE-LLaVA generative family (checkpoint kind ``"llava"``): presets, the training task,
loading its checkpoints, and `vlmoe eval` / `vlmoe ask` / `vlmoe inspect` on them.

``--checkpoint smollm2`` names the pretrained SmolLM2-135M-Instruct (text only) wherever a
checkpoint is taken (`load_llava`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmoe.checkpoint import (
    CheckpointError,
    load_checkpoint_meta,
    read_weights,
    resolve_checkpoint_dir,
    saved_run_config,
)
from vlmoe.config import ConfigError
from vlmoe.data import DataError, VQASplit
from vlmoe.evaluate import EvalResult
from vlmoe.families import is_pretrained_lm
from vlmoe.lm import CausalLM, ChatTokenizer, LMConfig
from vlmoe.validate import (
    UsageError,
    ask_question,
    check_finite_state,
    check_input_file,
    json_line,
)

from .config import PRESETS, LlavaRunConfig
from .data import Example, collate, prompt_example
from .inspect import inspect_command
from .model import LlavaModel, TinyEncoder
from .task import GenerativeTask, SplitData, evaluate_generative

__all__ = ["PRESETS", "Loaded", "ask_command", "config_from_dict", "eval_command", "inspect_command",
           "load_llava", "make_task"]  # fmt: skip

PRETRAINED_NAMES = ("smollm2",)


def _load_pretrained_lm(path: str | Path) -> tuple[CausalLM, ChatTokenizer]:
    """``smollm2``, a ``.gguf`` file or a `transformers` folder (with its tokenizer)."""
    from vlmoe.lm import load_gguf, load_pretrained

    if str(path) in PRETRAINED_NAMES and not Path(path).is_dir():
        return load_pretrained(str(path))
    if not Path(path).is_dir():
        return load_gguf(path)
    from vlmoe.lm.hf import load_hf

    try:
        lm, tok = load_hf(path)
    except ImportError:
        raise UsageError(f"--checkpoint {path}: a transformers folder needs transformers "
                         "(pip install 'vlmoe[hf]')") from None  # fmt: skip
    if tok is None:
        raise CheckpointError(f"{path}: no tokenizer.json beside the transformers model")
    return lm, tok


def config_from_dict(d: dict[str, Any]) -> LlavaRunConfig:
    """A run config from `LlavaRunConfig.to_dict()` output (ConfigError naming a bad field)."""
    return LlavaRunConfig.from_dict(d)


def make_task(
    cfg: LlavaRunConfig, resume_from: Path | None, meta: dict[str, Any] | None
) -> GenerativeTask:
    """The training task. Resuming, or starting from another checkpoint (the first stage's
    ``init_from``), it keeps that checkpoint's tokenizer: token ids must keep their meaning."""
    src = resume_from if resume_from is not None else (cfg.stages()[0].init_from or None)
    if src is not None and (resolve_checkpoint_dir(src) / "tokenizer.json").is_file():
        return GenerativeTask(cfg, _tokenizer(resolve_checkpoint_dir(src), meta))
    return GenerativeTask(cfg)


def _tokenizer(d: Path, meta: dict[str, Any] | None) -> ChatTokenizer:
    if meta is None:
        meta, _ = load_checkpoint_meta(d)
    try:
        return ChatTokenizer.load(d / "tokenizer.json", int(meta["eos_id"]), int(meta["pad_id"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d}: tokenizer: cannot load ({e})") from None
    except Exception as e:  # the tokenizers library raises its own Exception subclass
        raise CheckpointError(f"{d / 'tokenizer.json'}: not a tokenizer file ({e})") from None


@dataclass
class Loaded:
    """A generative checkpoint ready to answer: the model (None for a pretrained LM alone),
    the bare language model, tokenizer and run config (None for a pretrained LM)."""

    path: str
    model: LlavaModel | None
    lm: CausalLM
    tokenizer: ChatTokenizer
    config: LlavaRunConfig | None


def load_llava(path: str | Path, device: str = "cpu") -> Loaded:
    """A checkpoint folder of this family, or ``"smollm2"`` (the pretrained LM, text only).
    Anything missing or inconsistent raises CheckpointError naming the file."""
    if is_pretrained_lm(path):
        lm, tok = _load_pretrained_lm(path)
        return Loaded(str(path), None, lm.to(device).eval(), tok, None)
    d = resolve_checkpoint_dir(path)
    meta, _ = load_checkpoint_meta(d)
    where = d / "config.json"
    cfg = saved_run_config(meta, where, LlavaRunConfig.from_dict)
    try:
        lm = CausalLM(LMConfig(**meta["lm"]))
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e}") from None
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid content ({e})") from None
    model = LlavaModel(cfg.model, lm, _bare_encoder(cfg.model.vision))
    state = read_weights(d)
    try:
        check_finite_state(state, d / "model.safetensors")
    except DataError as e:
        raise CheckpointError(str(e)) from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1 if "\n" in str(e) else 0].strip()
        raise CheckpointError(
            f"{d / 'model.safetensors'}: does not fit config.json ({first})"
        ) from None
    model.to(device).eval()
    return Loaded(str(d), model, model.lm, _tokenizer(d, meta), cfg)


def _bare_encoder(vision: str) -> torch.nn.Module:
    """An encoder of the right shape; its weights come from the checkpoint."""
    if vision == "tiny":
        return TinyEncoder()
    from vlmoe.vision import EfficientNetLite0

    return EfficientNetLite0()


# ---------------------------------------------------------------------------- ask
def _question(args: argparse.Namespace) -> str:
    return ask_question(args, "a generative checkpoint writes its answer",
                        "a question (or a message to chat with)")  # fmt: skip


def ask_command(args: argparse.Namespace) -> int:
    """Answer a question about an image (or chat without one), streaming the answer's words
    to stdout as they are generated; ``--json`` prints ``{"answer": ...}`` at the end."""
    from vlmoe.cli import parse_device
    from vlmoe.data import load_image

    question = _question(args)
    device = parse_device(args.device)
    if args.image is not None:
        check_input_file(args.image, "--image", "image file")
        if is_pretrained_lm(args.checkpoint):  # before the slow load
            _text_only(args.checkpoint)
    ck = load_llava(args.checkpoint, device)
    image = None if args.image is None else load_image(args.image, ck.model.cfg.image_size)
    answer = answer_one(ck, question, image, device, stream=not args.json)
    if args.json:
        print(json_line({"answer": answer}))
    return 0


def answer_one(ck: Loaded, question: str, image: torch.Tensor | None, device: str = "cpu",
               stream: bool = False, max_new_tokens: int | None = None) -> str:  # fmt: skip
    """The greedy answer to one question (``image`` uint8 ``[3, S, S]`` or None); with
    ``stream`` its text is written to stdout as each token arrives."""
    tok = ck.tokenizer
    if ck.model is None:  # a pretrained chat model: its own system prompt
        ex = Example(0, -1, tok.chat_ids(question), [], None)
        # a chat answer: up to 128 tokens, as far as the context allows
        room = ck.lm.config.max_seq_len - len(ex.before)
        limit = max_new_tokens or max(1, min(128, room))
    else:
        ex = prompt_example(tok, 0, 0 if image is not None else -1, question, None)
        limit = max_new_tokens or ck.model.cfg.max_answer_tokens
    imgs = None if image is None else image[None]
    n_vis = ck.model.cfg.visual_tokens if ck.model is not None else 0
    batch = collate([ex], n_vis, tok.pad_id, images=imgs, left_pad=True).to(device)
    got: list[int] = []
    printed = [0]

    def on_token(t: torch.Tensor) -> None:
        if int(t[0]) == tok.eos_id:
            return
        got.append(int(t[0]))
        text = tok.decode(got)
        if stream and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            sys.stdout.write(text[printed[0] :])
            sys.stdout.flush()
            printed[0] = len(text)

    ctx = ck.lm.config.max_seq_len
    if batch.input_ids.shape[1] + limit > ctx:
        raise UsageError(f"question: the prompt is {batch.input_ids.shape[1]} tokens; with up to "
                         f"{limit} answer tokens it passes the model's context of {ctx} tokens")  # fmt: skip
    if ck.model is not None:
        ck.model.generate(batch, tok.eos_id, tok.pad_id, limit, on_token)
    else:
        from vlmoe.lm import generate

        generate(ck.lm, batch.input_ids, max_new_tokens=limit, stop_ids=[tok.eos_id],
                 pad_id=tok.pad_id, on_token=on_token)  # fmt: skip
    if stream:
        print()
    return tok.decode(got).strip()


def _text_only(name: str) -> None:
    raise UsageError(f"--image: {name} is a text-only language model; ask it without "
                     "--image, or give a checkpoint trained on images")  # fmt: skip


# ---------------------------------------------------------------------------- eval
def eval_command(args: argparse.Namespace) -> int:
    """Normalised exact-match accuracy, overall and per question kind, on easy-VQA or JSONL."""
    from vlmoe.cli import parse_device
    from vlmoe.data import load_data

    device = parse_device(args.device)
    if is_pretrained_lm(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: a text-only language model cannot "
                         "answer questions about images; give a trained checkpoint")  # fmt: skip
    ck = load_llava(args.checkpoint, device)
    cfg = ck.config
    data = args.data or cfg.data
    split = load_data(
        data, args.split, cfg.model.image_size, cfg.train.val_fraction, cfg.train.data_seed
    )
    res = evaluate_split(ck, split, device)
    if args.json:
        print(json_line({"data": split.source, **res.to_dict()}))
        return 0
    print(f"{split.source}: exact match {res.accuracy:.4f} on {res.n} questions "
          f"(answer-token loss {res.loss:.4f})")  # fmt: skip
    for kind, v in res.per_kind.items():
        print(f"  {kind:<7} {v['accuracy']:.4f}  (n={v['n']})")
    return 0


def evaluate_split(ck: Loaded, split: VQASplit, device: str = "cpu") -> EvalResult:
    """Normalised exact match of the generated answers over ``split``'s questions, overall and
    per question kind (a frozen encoder's features computed once, cached by pixels)."""
    feats = None
    if ck.config.model.freeze_vision:
        from .task import encode_split

        feats = encode_split(ck.model.vision, split, ck.config.model)
    return evaluate_generative(ck.model, SplitData(split, ck.tokenizer, feats), ck.tokenizer,
                               ck.config.train.eval_batch_size, device)  # fmt: skip


def robustness_evaluator(checkpoint: str | Path) -> tuple[Any, int]:
    """(evaluator, image size) for `bench/robustness.py`: exact match per question kind."""
    ck = load_llava(checkpoint)

    def run(split: VQASplit, scenes: list[tuple[str, str]]) -> dict[str, Any]:
        res = evaluate_split(ck, split)
        per_kind = {k: v["accuracy"] for k, v in res.per_kind.items()}
        return {"accuracy": res.accuracy, "per_kind": per_kind, "n": res.n}

    return run, ck.config.model.image_size
