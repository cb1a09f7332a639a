"""Contrastive evaluation: retrieval metrics on constructed similarities, zero-shot and
ranking through a real tiny LIMoE."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmoe.data.pairs import EASYVQA_CAPTIONS, build_pair_tokenizer, easyvqa_captions
from vlmoe.limoe.config import limoe_tiny
from vlmoe.limoe.evaluate import (
    evaluate_contrastive,
    rank_texts,
    ranks,
    retrieval_metrics,
    zero_shot,
)
from vlmoe.models.limoe import LIMoE


def test_ranks_on_a_constructed_matrix():
    # row i = image i; the true text of image i is column i
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.0],  # true text first → rank 1
            [0.5, 0.4, 0.3, 0.6],  # two texts above → rank 3
            [0.1, 0.2, 0.35, 0.0],  # rank 1
            [0.7, 0.8, 0.9, 0.1],  # last → rank 4
        ]
    )
    i2t, t2i = ranks(sim)
    assert i2t.tolist() == [1, 3, 1, 4]
    # column j = the images' scores for text j, true image j: text 1 → (0.8 ≥ 0.4) rank 2;
    # text 2 → 0.9 above 0.35, rank 2; text 3 → 0.6 above 0.1, rank 2
    assert t2i.tolist() == [1, 2, 2, 2]
    m = retrieval_metrics(sim)
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0 and m["i2t_mean_rank"] == 2.25
    assert m["t2i_r1"] == 25.0 and m["t2i_mean_rank"] == 1.75 and m["count"] == 4


def test_ties_count_against_the_true_item():
    i2t, t2i = ranks(torch.zeros(6, 6))
    assert i2t.tolist() == [6] * 6 and t2i.tolist() == [6] * 6
    assert retrieval_metrics(torch.zeros(6, 6))["i2t_r5"] == 0.0
    # R@5 over 7 items: the true text 6th
    sim = torch.eye(7) * 0.5 + torch.tensor([[0.0, 0.6, 0.7, 0.8, 0.9, 1.0, 0.1]] * 7)
    assert ranks(sim)[0][0] == 6 and retrieval_metrics(sim)["i2t_r5"] < 100.0


@pytest.fixture(scope="module")
def setup():
    pairs = easyvqa_captions("val", image_size=32).subset(range(48))
    tok = build_pair_tokenizer(pairs, extra=EASYVQA_CAPTIONS)
    torch.manual_seed(0)
    model = LIMoE(dataclasses.replace(limoe_tiny().model, vocab_size=tok.vocab_size))
    return model, tok, pairs


def test_zero_shot_matches_a_manual_argmax(setup):
    model, tok, pairs = setup
    model.train()
    z = zero_shot(model, tok, pairs, max_len=12)
    assert model.training  # mode restored
    img = model.eval().encode_image(pairs.images.float() / 127.5 - 1)
    ids, mask = tok.encode_batch(list(EASYVQA_CAPTIONS), 12)
    pred = (img @ model.encode_text(ids, mask).T).argmax(1)
    assert z["count"] == 48 and z["correct"] == int((pred == pairs.labels).sum())
    out = evaluate_contrastive(model, tok, 12, zero_shot_pairs=pairs, retrieval_pairs=pairs)
    assert out["zero_shot_accuracy"] == pytest.approx(z["accuracy"])
    assert {"retrieval_i2t_r1", "retrieval_t2i_r5", "retrieval_i2t_mean_rank"} <= set(out)


def test_rank_texts_orders_by_similarity(setup):
    model, tok, pairs = setup
    texts = ["a red circle", "a blue square", "a teal triangle"]
    ranked = rank_texts(model, tok, pairs.images[0], texts, 12)
    assert sorted(t for t, _, _ in ranked) == sorted(texts)
    cos = [c for _, _, c in ranked]
    assert cos == sorted(cos, reverse=True)
    assert sum(p for _, p, _ in ranked) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="at least one text"):
        rank_texts(model, tok, pairs.images[0], [], 12)
