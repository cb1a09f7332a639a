"""Evaluation: accuracy overall and per question kind, and single-question answering."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from vlmoe.data import QUESTION_KINDS, VQASplit, WordTokenizer, iterate_batches
from vlmoe.models import VLMoE


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


@torch.no_grad()
def evaluate(
    model: VLMoE,
    split: VQASplit,
    tokenizer: WordTokenizer,
    answers: list[str],
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    warn_unknown: bool = True,
) -> EvalResult:
    """Run the model over every question of `split` and score its top-1 answer."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(split), dtype=torch.bool)
    loss_sum, loss_n = 0.0, 0
    for batch in iterate_batches(
        split, tokenizer, answers, batch_size, shuffle=False, max_len=model.cfg.max_text_len
    ):
        batch = batch.to(device)
        out = model(batch.images, batch.input_ids, batch.attention_mask)
        pred = out.logits.argmax(-1)
        known = batch.labels >= 0
        correct[batch.question_index.cpu()] = ((pred == batch.labels) & known).cpu()
        if known.any():
            loss_sum += F.cross_entropy(
                out.logits[known], batch.labels[known], reduction="sum"
            ).item()
            loss_n += int(known.sum())
    model.train(was_training)
    known_set = set(answers)
    n_unknown = sum(a not in known_set for a in split.answers)
    if n_unknown and warn_unknown:
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
    probs = model(images, ids.to(dev), mask.to(dev)).logits.softmax(-1)[0]
    p, i = probs.topk(min(top, len(answers)))
    return [(answers[j], float(q)) for q, j in zip(p.tolist(), i.tolist(), strict=True)]
