"""LIMoE model: shapes, the contrastive loss by hand, per-modality entropy losses wired through
the shared pool, the dense twin's equal active compute, and a tiny model fitting real pairs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vlmoe.data.pairs import (
    EASYVQA_CAPTIONS,
    build_pair_tokenizer,
    easyvqa_captions,
    iterate_pair_batches,
)
from vlmoe.limoe.config import limoe, limoe_dense, limoe_tiny
from vlmoe.models.limoe import LIMoE, contrastive_loss, positives_from_ids
from vlmoe.moe import MoE


@pytest.fixture(scope="module")
def pairs():
    return easyvqa_captions("train", image_size=32).subset(range(96))


@pytest.fixture(scope="module")
def tok(pairs):
    return build_pair_tokenizer(pairs, extra=EASYVQA_CAPTIONS)


def _model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = limoe_tiny().model
    return LIMoE(dataclasses.replace(cfg, vocab_size=tok.vocab_size, **kw))


def _batch(pairs, tok, n=32):
    return next(iterate_pair_batches(pairs, tok, n, shuffle=False, max_len=12))


def test_shapes_and_records(pairs, tok):
    m = _model(tok)
    b = _batch(pairs, tok)
    B, L = b.input_ids.shape
    img, txt = m.encode_image(b.images), m.encode_text(b.input_ids, b.attention_mask)
    assert img.shape == txt.shape == (B, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(B))
    out = m(b)
    assert out.logits.shape == (B, B) and out.loss.ndim == 0
    torch.testing.assert_close(out.loss, out.task_loss + out.aux_loss)
    assert [r.name for r in out.routing] == ["layer1.vision", "layer1.text"]
    vis, text = out.routing
    # every real token routed once: 16 patches per image, the unpadded words
    assert vis.token_index.shape == (B * 16, 2) and vis.routing.probs.shape == (B * 16, 4)
    assert text.token_index.shape == (int(b.attention_mask.sum()), 2)
    assert float(vis.stats.tokens_per_expert.sum()) == B * 16  # top-1, dropless
    assert int(out.metrics["count"]) == B and 0 <= int(out.metrics["correct"]) <= B


def test_cls_and_eos_pooling_run(pairs, tok):
    m = _model(tok, image_pool="cls", text_pool="eos")
    b = _batch(pairs, tok, 8)
    out = m(b)
    vis = out.routing[0]
    # the image CLS token is routed too and recorded at position -1, patches at 0..15
    assert vis.token_index[:, 1].min() == -1 and vis.token_index[:, 1].max() == 15
    assert torch.isfinite(out.loss)


def test_contrastive_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    e = math.e
    i2t = -math.log(e**2 / (e**2 + 1)) - math.log(e**3 / (e + e**3))
    t2i = -math.log(e**2 / (e**2 + e)) - math.log(e**3 / (1 + e**3))
    want = 0.5 * (i2t / 2 + t2i / 2)
    assert float(contrastive_loss(logits)) == pytest.approx(want, rel=1e-6)
    # symmetric in images and texts; identity positives = CLIP's loss
    assert float(contrastive_loss(logits.T)) == pytest.approx(want, rel=1e-6)
    assert float(contrastive_loss(logits, torch.eye(2, dtype=torch.bool))) == pytest.approx(
        want, rel=1e-6
    )


def test_multi_positive_loss_by_hand():
    # texts 0 and 1 identical: image 0's target is ½ text 0 + ½ text 1
    ids = torch.tensor([[2, 5, 6], [2, 5, 6], [2, 7, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    pos = positives_from_ids(ids, mask)
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [0.0, 1.0, 3.0]])
    ls_r, ls_c = F.log_softmax(logits, 1), F.log_softmax(logits.T, 1)
    i2t = -(0.5 * (ls_r[0, 0] + ls_r[0, 1]) + 0.5 * (ls_r[1, 0] + ls_r[1, 1]) + ls_r[2, 2]) / 3
    t2i = -(0.5 * (ls_c[0, 0] + ls_c[0, 1]) + 0.5 * (ls_c[1, 0] + ls_c[1, 1]) + ls_c[2, 2]) / 3
    assert float(contrastive_loss(logits, pos)) == pytest.approx(float(0.5 * (i2t + t2i)))


def _entropy(p):
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def test_entropy_losses_are_per_modality(pairs, tok):
    m = _model(tok)
    moe = m.tower.blocks[1].ffn
    assert isinstance(moe, MoE)
    moe.config.global_entropy_threshold = None  # no cap: the value is exact below
    w_loc, w_glob = moe.config.local_entropy_weight, moe.config.global_entropy_weight
    b = _batch(pairs, tok)
    enc = m.encode_pair(b.images, b.input_ids, b.attention_mask)
    vis, text = (r.routing.probs for r in enc.routing)
    # one pool, two groups: mean over modalities of each modality's own statistic
    local = (_entropy(vis).mean() + _entropy(text).mean()) / 2
    glob = -(_entropy(vis.mean(0)) + _entropy(text.mean(0))) / 2
    torch.testing.assert_close(enc.aux_losses["local_entropy"], w_loc * local)
    torch.testing.assert_close(enc.aux_losses["global_entropy"], w_glob * glob)
    # change only the words: the text group's routing and the loss move, the images' do not
    # (images and texts are separate sequences, so attention does not mix them)
    ids2 = torch.where(b.attention_mask, (b.input_ids + 3) % tok.vocab_size, b.input_ids)
    enc2 = m.encode_pair(b.images, ids2, b.attention_mask)
    torch.testing.assert_close(enc2.routing[0].routing.probs, vis)
    assert not torch.allclose(enc2.routing[1].routing.probs, text)
    local2 = (_entropy(vis).mean() + _entropy(enc2.routing[1].routing.probs).mean()) / 2
    torch.testing.assert_close(enc2.aux_losses["local_entropy"], w_loc * local2)
    assert abs(float(local2 - local)) > 1e-6


def test_capacity_with_batch_priority_drops_in_the_joint_pool(pairs, tok):
    m = _model(tok)
    cfg = m.tower.blocks[1].ffn.config
    cfg.capacity_factor, cfg.batch_prioritized = 0.5, True
    out = m(_batch(pairs, tok))
    kept = sum(float(r.stats.tokens_per_expert.sum()) for r in out.routing)
    routed = sum(r.token_index.shape[0] for r in out.routing)
    # capacity ceil(0.5·T·1/4) per expert over the joint T image + text tokens
    assert kept <= 4 * math.ceil(0.5 * routed / 4) < routed
    assert torch.isfinite(out.loss)


def test_dense_twin_has_equal_active_compute():
    vocab = 100
    sparse = LIMoE(dataclasses.replace(limoe().model, vocab_size=vocab))
    dense = LIMoE(dataclasses.replace(limoe_dense().model, vocab_size=vocab))
    (s_total, s_active), (d_total, d_active) = sparse.param_counts(), dense.param_counts()
    router = 2 * 128 * 8  # two MoE blocks, D·E router weights each
    assert s_active - d_active == router
    assert s_total > 1.4 * d_total
    assert not any(isinstance(x, MoE) for x in dense.modules())
    assert dense.text_tower is not None and sparse.text_tower is None


def test_dense_twin_forward(pairs, tok):
    cfg = limoe_dense(limoe_tiny()).model
    torch.manual_seed(0)
    m = LIMoE(dataclasses.replace(cfg, vocab_size=tok.vocab_size))
    out = m(_batch(pairs, tok, 8))
    assert out.routing == [] and float(out.aux_loss) == 0.0
    torch.testing.assert_close(out.loss, out.task_loss)


def test_tiny_model_fits_one_batch_of_caption_pairs(pairs, tok):
    torch.manual_seed(0)
    m = _model(tok)
    b = _batch(pairs, tok, 32)
    # with repeated captions the loss cannot reach 0: its floor is the mean log(#positives)
    pos = positives_from_ids(b.input_ids, b.attention_mask)
    floor = float(pos.sum(1).float().log().mean())
    # lr 1e-3: at 3e-3 this tiny model's embeddings collapse to one point (loss = log 32)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    first = None
    for _ in range(120):
        out = m(b)
        first = first if first is not None else float(out.task_loss.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        out = m(b)
    assert first > floor + 2.0
    # measured on the merged tree (fan-in FFN init): 1.64 after 60 steps (floor 0.76); 120 pass
    assert float(out.task_loss) < floor + 0.3, (first, float(out.task_loss), floor)
    assert int(out.metrics["correct"]) == 32


def test_entropy_loss_gradients_push_the_right_way():
    from vlmoe.moe import global_entropy_loss, local_entropy_loss

    # hand-made routing over 4 experts: 6 image tokens spread out, 3 text tokens collapsed
    # onto expert 0 (the LIMoE failure mode), each token fairly unsure
    img = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]] * 2)
    txt = torch.tensor([[1.0, 0.2, 0.0, 0.0], [1.0, 0.0, 0.2, 0.0], [1.0, 0.0, 0.0, 0.2]])
    logits = torch.cat([img, txt]).requires_grad_(True)
    groups = torch.tensor([0] * 6 + [1] * 3)

    def text_marginal_entropy(lg):
        return float(_entropy(lg.detach()[6:].softmax(-1).mean(0)))

    def mean_token_entropy(lg):
        return float(_entropy(lg.detach().softmax(-1)).mean())

    g_glob = torch.autograd.grad(global_entropy_loss(logits.softmax(-1), None, groups), logits)[0]
    g_loc = torch.autograd.grad(local_entropy_loss(logits.softmax(-1), None, groups), logits)[0]
    step = 0.5
    # global: descending spreads the text tokens over more experts, and pushes mostly on text
    # (text's marginal is far from uniform, the images' is nearer)
    assert text_marginal_entropy(logits - step * g_glob) > text_marginal_entropy(logits) + 1e-3
    assert g_glob[6:, 0].mean() > 0 and g_glob[6:].abs().sum() > g_glob[:6].abs().sum()
    # local: descending makes every token's routing more confident
    assert mean_token_entropy(logits - step * g_loc) < mean_token_entropy(logits) - 1e-3


def test_config_and_weights_round_trip(tmp_path, pairs, tok):
    import json

    from safetensors.torch import load_file, save_file

    from vlmoe.limoe.config import LIMOE_PRESETS, LIMoERunConfig

    for name, preset in LIMOE_PRESETS.items():
        cfg = preset()
        again = LIMoERunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg, name
    m = _model(tok)
    save_file(m.state_dict(), tmp_path / "model.safetensors")
    m2 = _model(tok, seed=1)
    m2.load_state_dict(load_file(tmp_path / "model.safetensors"))
    b = _batch(pairs, tok, 4)
    m.eval()
    m2.eval()
    torch.testing.assert_close(m2.encode_image(b.images), m.encode_image(b.images))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("towers", 3, "model.towers: expected 1 or 2, got 3"),
        ("image_pool", "max", "model.image_pool"),
        ("text_pool", "mean", "model.text_pool"),
        ("moe_layers", (5,), "model.moe_layers"),
        ("init_temperature", 0.001, "model.init_temperature"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    from vlmoe.config import ConfigError
    from vlmoe.limoe.config import LIMoEConfig

    with pytest.raises(ConfigError, match=message):
        LIMoEConfig(**{field: value})


@pytest.mark.parametrize("family", ["limoe", "moe-llava"])
@pytest.mark.parametrize(
    "train, field",
    [
        ({"augment": {"zoom": 1.0}}, "train.augment"),
        ({"questions_per_image": 2}, "train.questions"),
        ({"scene_extra": 8}, "train.scene_extra: the"),
    ],
)
def test_families_without_augmentation_refuse_it_rather_than_ignore_it(family, train, field):
    from vlmoe.config import ConfigError
    from vlmoe.families import family_of_preset

    cfg = family_of_preset(family).hooks().PRESETS[family]()
    d = cfg.to_dict()
    assert type(cfg).from_dict(d) == cfg  # the preset as it is loads
    d["train"].update(train)
    with pytest.raises(ConfigError, match=field):
        type(cfg).from_dict(d)
