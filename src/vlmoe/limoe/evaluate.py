"""Evaluation of contrastive image–text models (LIMoE and its dense twin).

- zero-shot classification: each image → the best of the class captions (easy-VQA: 24);
- retrieval: image→text and text→image Recall@1 / Recall@5 and mean rank over a held-out
  set (Twemoji test emoji) where pair i's image matches pair i's text;
- ranking the texts given for one image (`vlmoe ask --choices`).

Every function takes the model (a `LIMoE`: its ``forward`` encodes a one-modality
`PairBatch`, ``logit_scale`` gives 1/τ) and the `WordTokenizer`, runs in eval mode under
``torch.no_grad`` and puts the model's mode back. Embeddings go through ``forward`` so that
parallel wrappers (FSDP, expert parallelism) see every call; under several processes every
rank must run the same evaluation. Shapes: N images, M texts, E embedding width.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from vlmoe.data.pairs import EASYVQA_CAPTIONS, PairBatch, PairSet, iterate_pair_batches
from vlmoe.data.tokenizer import WordTokenizer


@contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _embed_dim(model: nn.Module) -> int:
    return int(model.cfg.embed_dim)


def embed_images(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 [N, 3, S, S] (or float already in [-1, 1]) → embeddings float [N, E] (CPU)."""
    dev = _device(model)
    out = []
    with _eval_mode(model):
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size]
            x = x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.float()
            idx = torch.arange(i, i + x.shape[0])
            out.append(model(PairBatch(x.to(dev), None, None, idx)).logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, _embed_dim(model))


def embed_texts(
    model: nn.Module,
    tokenizer: WordTokenizer,
    texts: Sequence[str],
    max_len: int,
    batch_size: int = 512,
) -> torch.Tensor:
    """M texts → embeddings float [M, E] (CPU)."""
    dev = _device(model)
    out = []
    with _eval_mode(model):
        for i in range(0, len(texts), batch_size):
            ids, mask = tokenizer.encode_batch(list(texts[i : i + batch_size]), max_len)
            batch = PairBatch(None, ids.to(dev), mask.to(dev), torch.arange(i, i + len(ids)))
            out.append(model(batch).logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, _embed_dim(model))


def zero_shot(
    model: nn.Module,
    tokenizer: WordTokenizer,
    pairs: PairSet,
    max_len: int,
    classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Zero-shot classification: each image with a label (``pairs.labels >= 0``) is assigned
    the class text (default ``pairs.classes``) most similar to it.

    Returns {"accuracy": %, "correct": n, "count": n}; count 0 gives accuracy 0. With the
    24 easy-VQA captions as classes also "color_accuracy" and "shape_accuracy" (%): how often
    the chosen caption has the right colour / the right shape.
    """
    classes = list(pairs.classes if classes is None else classes)
    keep = (pairs.labels >= 0).nonzero().flatten()
    if not classes or len(keep) == 0:
        return {"accuracy": 0.0, "correct": 0, "count": 0}
    img = embed_images(model, pairs.images[keep])
    txt = embed_texts(model, tokenizer, classes, max_len)
    pred = (img @ txt.T).argmax(1)
    gold = pairs.labels[keep]
    correct = int((pred == gold).sum())
    out = {"accuracy": 100.0 * correct / len(keep), "correct": correct, "count": len(keep)}
    if tuple(classes) == EASYVQA_CAPTIONS:  # index = 3 · colour + shape
        out["color_accuracy"] = 100.0 * int((pred // 3 == gold // 3).sum()) / len(keep)
        out["shape_accuracy"] = 100.0 * int((pred % 3 == gold % 3).sum()) / len(keep)
    return out


def contrastive_loss_on(
    model: nn.Module, tokenizer: WordTokenizer, pairs: PairSet, max_len: int, batch_size: int
) -> float:
    """Mean task (contrastive) loss of the model's ``forward`` over ``pairs`` cut in order into
    batches of ``batch_size`` (the last, smaller batch included, weighted by its size). The
    loss depends on the batch (its negatives): compare values at one batch size only."""
    total, n = 0.0, 0
    dev = _device(model)
    with _eval_mode(model):
        for b in iterate_pair_batches(pairs, tokenizer, batch_size, shuffle=False, max_len=max_len):
            if len(b) < 2:  # one pair has no negative: nothing to measure
                continue
            out = model(b.to(dev))
            total += float(out.task_loss) * len(b)
            n += len(b)
    return total / n if n else float("nan")


def ranks(sim_NN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image→text ranks [N], text→image ranks [N]) of the true partner (the diagonal),
    1-based. Ties count against the true item (rank = #scores ≥ the true score), so a model
    that scores everything equal ranks every partner last, never first."""
    diag = sim_NN.diagonal()
    i2t = (sim_NN >= diag[:, None]).sum(1)
    t2i = (sim_NN >= diag[None, :]).sum(0)
    return i2t, t2i


def retrieval_metrics(sim_NN: torch.Tensor) -> dict[str, float]:
    """From a similarity matrix (row i = image i, column j = text j, pair i true):
    {"i2t_r1", "i2t_r5" (%), "i2t_mean_rank", "t2i_r1", "t2i_r5", "t2i_mean_rank", "count"}."""
    out: dict[str, float] = {"count": int(sim_NN.shape[0])}
    for name, r in zip(("i2t", "t2i"), ranks(sim_NN), strict=True):
        rf = r.float()
        out[f"{name}_r1"] = 100.0 * float((rf <= 1).float().mean()) if len(rf) else 0.0
        out[f"{name}_r5"] = 100.0 * float((rf <= 5).float().mean()) if len(rf) else 0.0
        out[f"{name}_mean_rank"] = float(rf.mean()) if len(rf) else 0.0
    return out


def retrieval(
    model: nn.Module, tokenizer: WordTokenizer, pairs: PairSet, max_len: int
) -> dict[str, float]:
    """Image↔text retrieval over all pairs of ``pairs`` (see `retrieval_metrics`)."""
    img = embed_images(model, pairs.images)
    txt = embed_texts(model, tokenizer, pairs.texts, max_len)
    return retrieval_metrics(img @ txt.T)


def rank_texts(
    model: nn.Module,
    tokenizer: WordTokenizer,
    image: torch.Tensor,
    texts: Sequence[str],
    max_len: int,
) -> list[tuple[str, float, float]]:
    """Rank ``texts`` for one image (uint8 [3, S, S]): [(text, probability, cosine)], best
    first; probabilities are the softmax of the model's scaled similarities over ``texts``."""
    if not texts:
        raise ValueError("rank_texts: give at least one text")
    img = embed_images(model, image[None])
    txt = embed_texts(model, tokenizer, texts, max_len)
    cos = (img @ txt.T)[0]
    with torch.no_grad():
        probs = (float(model.logit_scale()) * cos).softmax(0)
    order = cos.argsort(descending=True, stable=True).tolist()
    return [(texts[i], float(probs[i]), float(cos[i])) for i in order]


def evaluate_contrastive(
    model: nn.Module,
    tokenizer: WordTokenizer,
    max_len: int,
    zero_shot_pairs: PairSet | None = None,
    retrieval_pairs: PairSet | None = None,
) -> dict[str, float]:
    """Everything at once, flat for logging: "zero_shot_accuracy" (when ``zero_shot_pairs``)
    and "retrieval_i2t_r1", … (when ``retrieval_pairs``)."""
    out: dict[str, float] = {}
    if zero_shot_pairs is not None:
        z = zero_shot(model, tokenizer, zero_shot_pairs, max_len)
        out["zero_shot_accuracy"] = z["accuracy"]
        out["zero_shot_count"] = z["count"]
    if retrieval_pairs is not None:
        for k, v in retrieval(model, tokenizer, retrieval_pairs, max_len).items():
            out[f"retrieval_{k}"] = v
    return out
