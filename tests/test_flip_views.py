"""Answers averaged over flipped views of the picture (`model.flip_views`): in eval mode the
logits are the mean log-probabilities over the picture, upside down, mirrored and both; in
training, and with 1 view (checkpoints from before the field), the model is as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vlmoe.config import ConfigError, ModelConfig, RunConfig, get_preset
from vlmoe.models import build_model
from vlmoe.train import VQATask


def _models_and_batch(views: int):
    """A tiny model with `views` flipped views and its 1-view twin (same weights)."""
    cfg = get_preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, flip_views=views)
    task = VQATask(cfg)
    torch.manual_seed(0)
    model = build_model(task.cfg.model)
    plain = build_model(dataclasses.replace(task.cfg.model, flip_views=1))
    plain.load_state_dict(model.state_dict())
    return model, plain, next(task.train_batches(8, 0, 0, rank=0, world_size=1))


@pytest.mark.parametrize("views", [2, 4])
def test_eval_answers_average_the_views_log_probabilities(views: int):
    model, plain, batch = _models_and_batch(views)
    model.eval(), plain.eval()
    flips = [(), (-2,), (-1,), (-2, -1)][:views]
    with torch.no_grad():
        got = model(batch)
        each = [plain(dataclasses.replace(batch, images=batch.images.flip(d) if d else batch.images))
                for d in flips]  # fmt: skip
    want = torch.stack([F.log_softmax(o.logits, -1) for o in each]).mean(0)
    assert torch.allclose(got.logits, want, atol=1e-5)
    # the views do disagree (else the test would not tell them apart) ...
    assert not torch.allclose(each[0].logits, each[1].logits, atol=1e-3)
    # ... the loss is that of the averaged answer, and the routing is the picture's own
    assert torch.allclose(got.task_loss, F.cross_entropy(want, batch.labels), atol=1e-5)
    assert len(got.routing) == len(each[0].routing)
    for a, b in zip(got.routing, each[0].routing, strict=True):
        assert torch.equal(a.routing.indices, b.routing.indices)


def test_training_reads_the_picture_alone():
    model, plain, batch = _models_and_batch(4)
    model.train(), plain.train()
    a, b = model(batch), plain(batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


def test_a_config_without_the_field_reads_one_view():
    d = get_preset("tiny").to_dict()
    d["model"].pop("flip_views")
    assert RunConfig.from_dict(d).model.flip_views == 1


def test_another_number_of_views_is_refused():
    with pytest.raises(ConfigError, match="model.flip_views: expected one of 1, 2, 4, got 3"):
        ModelConfig(flip_views=3)
