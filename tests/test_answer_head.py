"""The answer head's reading of the question (`model.head_text`): "cls" is the head of every
checkpoint before the field; "cls+mean" adds the mean of the real text tokens, which padding
does not move, and a wrong value is refused in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmoe.config import ConfigError, ModelConfig, RunConfig, get_preset
from vlmoe.models import build_model
from vlmoe.train import VQATask


def _model_and_batch(head_text: str):
    cfg = get_preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, head_text=head_text)
    task = VQATask(cfg)
    torch.manual_seed(0)
    model = build_model(task.cfg.model).eval()
    return model, next(task.train_batches(8, 0, 0, rank=0, world_size=1))


def test_the_mean_text_token_ignores_padding():
    model, batch = _model_and_batch("cls+mean")
    assert model.head.mlp[1].in_features == 5 * model.cfg.d_model
    longer = dataclasses.replace(
        batch,
        input_ids=torch.nn.functional.pad(batch.input_ids, (0, 3), value=7),
        attention_mask=torch.nn.functional.pad(batch.attention_mask, (0, 3), value=False),
    )
    with torch.no_grad():
        a, b = model(batch).logits, model(longer).logits
    assert torch.allclose(a, b, atol=1e-5)
    # and it is read: another word under the mask of a real token moves the answer
    other = batch.input_ids.clone()
    other[:, 1] = (other[:, 1] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        c = model(dataclasses.replace(batch, input_ids=other)).logits
    assert not torch.allclose(a, c, atol=1e-3)


def test_a_config_without_the_field_reads_cls_alone():
    d = get_preset("tiny").to_dict()
    d["model"].pop("head_text")
    cfg = RunConfig.from_dict(d)
    assert cfg.model.head_text == "cls"
    model, _ = _model_and_batch("cls")
    assert model.head.mlp[1].in_features == 3 * model.cfg.d_model and not model.head.text_mean


def test_an_unknown_head_text_is_refused():
    with pytest.raises(ConfigError, match="model.head_text: expected one of cls, cls\\+mean"):
        ModelConfig(head_text="mean")
