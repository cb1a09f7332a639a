"""The VL-MoE conv stem: its two normalisations and the config field that picks one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from vlmoe.config import ConfigError, ModelConfig, RunConfig, get_preset
from vlmoe.models.vision import ConvStem


def _norm_outputs(stem: ConvStem, images: torch.Tensor) -> list[torch.Tensor]:
    """The output of every GroupNorm of the stem, [B, C, H, W] each."""
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out))
        for m in stem.modules()
        if isinstance(m, nn.GroupNorm)
    ]
    with torch.no_grad():
        stem(images)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize(("norm", "full_res"), [("layer", 0), ("channel", 0), ("channel", 4)])
def test_a_row_does_not_depend_on_its_batch(norm: str, full_res: int) -> None:
    torch.manual_seed(0)
    stem = ConvStem(64, 16, 8, 32, norm=norm, full_res=full_res)
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        together = stem(images)
        alone = torch.cat([stem(images[i : i + 1]) for i in range(4)])
    assert together.shape == (4, 16, 32)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_channel_norm_normalises_each_channel_of_each_image() -> None:
    torch.manual_seed(0)
    # a red square on a light background: channels differ a lot in mean and spread
    images = torch.full((2, 3, 64, 64), 0.9)
    images[:, 1:, 20:40, 20:40] = -0.8
    for norm, per_channel in (("channel", True), ("layer", False)):
        stem = ConvStem(64, 16, 8, 32, norm=norm)
        outs = _norm_outputs(stem, images)
        assert len(outs) == 3  # one per stride-2 3×3 conv of a 16-px patch stem
        for out in outs:  # at init the affine is the identity: the raw normalised maps
            mean, std = out.mean((2, 3)), out.std((2, 3), unbiased=False)
            if per_channel:
                torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
                assert ((std - 1).abs() < 1e-2).all()
            else:  # one group: only the mean over channels is zero, channels differ
                assert mean.abs().max() > 0.05
                torch.testing.assert_close(mean.mean(1), torch.zeros(2), atol=1e-4, rtol=0)


def test_stem_norm_field() -> None:
    assert get_preset("default").model.stem_norm == "channel"
    assert get_preset("dense").model.stem_norm == "channel"
    # a config.json written before the field existed reads as the norm it was trained with
    old = dataclasses.asdict(get_preset("default"))
    del old["model"]["stem_norm"]
    assert RunConfig.from_dict(old).model.stem_norm == "layer"
    with pytest.raises(
        ConfigError, match=r"^model\.stem_norm: expected one of layer, channel, got 'batch'$"
    ):
        ModelConfig(stem_norm="batch")


def test_full_resolution_layer() -> None:
    torch.manual_seed(0)
    stem = ConvStem(64, 16, 8, 32, norm="channel", full_res=4)
    convs = [m for m in stem.stem if isinstance(m, nn.Conv2d)]
    # the extra conv keeps the full 64 × 64 and feeds the usual stride-2 chain
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (3, 4, (1, 1)), (4, 8, (2, 2)), (8, 16, (2, 2)), (16, 32, (2, 2)), (32, 32, (2, 2))
    ]  # fmt: skip
    outs = _norm_outputs(stem, torch.rand(2, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs][0] == (4, 64, 64)
    # a config.json from before the field: no extra layer; absurd widths are refused
    old = dataclasses.asdict(get_preset("default"))
    del old["model"]["stem_full_res"]
    assert RunConfig.from_dict(old).model.stem_full_res == 0
    with pytest.raises(ConfigError, match=r"^model\.stem_full_res: "):
        ModelConfig(stem_full_res=-1)


def test_channels_last_backward_conv_gives_the_same_gradients_bit_for_bit() -> None:
    from vlmoe.models.vision import ChannelsLastBackwardConv2d

    torch.manual_seed(0)
    fast = ChannelsLastBackwardConv2d(8, 16, 3, stride=2, padding=1)
    plain = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    plain.load_state_dict(fast.state_dict())  # same parameter names: checkpoints load
    x = torch.randn(6, 8, 32, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(6, 16, 16, 16)
    y, y2 = fast(x), plain(x2)
    y.backward(g)
    y2.backward(g)
    assert y.is_contiguous() and torch.equal(y, y2)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(fast.weight.grad, plain.weight.grad)
    assert torch.equal(fast.bias.grad, plain.bias.grad)
    stem = ConvStem(64, 16, 8, 32, norm="channel", full_res=4)
    assert [type(m) for m in stem.stem if isinstance(m, nn.Conv2d)][:3] == [
        nn.Conv2d, ChannelsLastBackwardConv2d, nn.Conv2d
    ]  # fmt: skip


def test_rows_showing_one_image_share_one_stem_pass() -> None:
    from vlmoe.models.vlmo import build_model

    torch.manual_seed(0)
    cfg = dataclasses.replace(
        get_preset("tiny").model, vocab_size=20, num_answers=5, stem_norm="channel", stem_full_res=4
    )
    model = build_model(cfg)
    pictures = torch.rand(3, 3, 32, 32) * 2 - 1
    images = pictures[[0, 1, 0, 2, 1, 0]]
    ids = torch.randint(1, 20, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.bool)
    first_row = torch.tensor([0, 1, 0, 3, 1, 0])
    calls: list[int] = []
    model.vision.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    shared = model.encode(images, ids, mask, first_row)
    apart = model.encode(images, ids, mask)
    assert calls == [3, 6]  # three distinct images: three rows through the stem
    for a, b in zip(shared[:3], apart[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the gradient of the shared stem pass is the sum over the rows that use it
    grads = []
    for same in (first_row, None):
        model.zero_grad()
        model.encode(images, ids, mask, same)[1].square().sum().backward()
        grads.append(model.vision.stem[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
