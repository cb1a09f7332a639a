"""Evaluation: accuracy overall and per question kind, and single-question answering."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlmoe.data import QUESTION_KINDS, Batch, VQASplit, WordTokenizer, iterate_batches
from vlmoe.models import ModelOutput, VLMoE


@dataclass
class EvalResult:
    """accuracy in [0, 1] over all n questions (answers the model cannot produce count as
    wrong); loss: mean cross-entropy over the questions whose answer the model knows;
    per_kind: {kind: {"accuracy": float, "n": int}} for every kind present."""

    accuracy: float
    loss: float
    n: int
    n_unknown_answer: int
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def run_split(
    model: torch.nn.Module,
    split: VQASplit,
    tokenizer: WordTokenizer,
    answers: list[str],
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    on_batch: Callable[[Batch, ModelOutput], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """The one evaluation loop: run ``model`` (eval mode) over every question of ``split``.

    Returns (predicted answer index long [Q], correct bool [Q], summed cross-entropy over the
    questions with a known answer, their number). Under ``torch.distributed`` each of the W
    processes runs its contiguous 1/W of every batch (an expert-parallel model needs every
    rank in every forward) and the results are all-reduced, so every rank returns the whole
    split's. ``on_batch(batch, output)`` sees each (local) batch, e.g. to collect routing.
    """
    rank, world = _world()
    was_training = model.training
    model.eval()
    n = len(split)
    pred = torch.zeros(n, dtype=torch.float64, device=device)
    hit = torch.zeros(n, dtype=torch.float64, device=device)
    loss = torch.zeros(2, dtype=torch.float64, device=device)
    per_rank = max(1, -(-batch_size // world))
    for batch in iterate_batches(split, tokenizer, answers, per_rank, shuffle=False,
                                 max_len=model.cfg.max_text_len, rank=rank, world_size=world):  # fmt: skip
        batch = batch.to(device)
        out = model(batch)
        idx, known = batch.question_index.to(device), batch.labels >= 0
        top = out.logits.argmax(-1)
        pred[idx] = top.double()
        hit[idx] = ((top == batch.labels) & known).double()
        if known.any():
            ce = F.cross_entropy(out.logits[known].float(), batch.labels[known], reduction="sum")
            loss += torch.stack([ce.double(), known.sum().double()])
        if on_batch is not None:
            on_batch(batch, out)
    model.train(was_training)
    if world > 1:
        for t in (pred, hit, loss):
            dist.all_reduce(t)
    return pred.long().cpu(), hit.cpu() > 0.5, float(loss[0]), int(loss[1])


def evaluate(
    model: torch.nn.Module,
    split: VQASplit,
    tokenizer: WordTokenizer,
    answers: list[str],
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    warn_unknown: bool = True,
) -> EvalResult:
    """Score the model's top-1 answer on every question of ``split`` (see ``run_split``)."""
    _, correct, loss_sum, loss_n = run_split(
        model, split, tokenizer, answers, batch_size=batch_size, device=device
    )
    known_set = set(answers)
    n_unknown = sum(a not in known_set for a in split.answers)
    if n_unknown and warn_unknown and _world()[0] == 0:
        warnings.warn(
            f"{split.source}: {n_unknown} of {len(split)} answers are not in the model's answer set; "
            "they count as wrong",
            stacklevel=2,
        )
    per_kind = {}
    kinds = list(split.kinds)
    for kind in QUESTION_KINDS:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            per_kind[kind] = {"accuracy": float(correct[idx].float().mean()), "n": len(idx)}
    n = len(split)
    return EvalResult(
        accuracy=float(correct.float().mean()) if n else 0.0,
        loss=loss_sum / max(loss_n, 1),
        n=n,
        n_unknown_answer=n_unknown,
        per_kind=per_kind,
    )


@torch.no_grad()
def answer_question(
    model: VLMoE,
    tokenizer: WordTokenizer,
    answers: list[str],
    image_CHW: torch.Tensor,
    question: str,
    top: int = 3,
) -> list[tuple[str, float]]:
    """Answer one question about one uint8 image [3, S, S]: top answers with probabilities."""
    model.eval()
    dev = next(model.parameters()).device
    images = ((image_CHW.float() / 255.0 - 0.5) / 0.5)[None].to(dev)
    ids, mask = tokenizer.encode_batch([question], max_len=model.cfg.max_text_len)
    batch = Batch(images, ids.to(dev), mask.to(dev), None, torch.zeros(1, dtype=torch.long))
    probs = model(batch).logits.softmax(-1)[0]
    p, i = probs.topk(min(top, len(answers)))
    return [(answers[j], float(q)) for q, j in zip(p.tolist(), i.tolist(), strict=True)]
