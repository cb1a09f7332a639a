"""Vision tower input: a small convolutional stem that turns an image into patch tokens.

A conv stem (rather than one big linear patchify) is the "early convolutions help
transformers see better" recipe (Xiao et al. 2021): it trains faster and more stably on small
data, which matters on a CPU budget.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.config import stem_convs

#: the stem's normalisation choices (`ModelConfig.stem_norm`) → the number of groups of a
#: GroupNorm over c channels. "layer": one group, all channels of an image normalised
#: together. "channel": one group per channel (instance norm), so each feature map gets its
#: own scale: a faint edge detector is not drowned by a strong colour channel, and shape
#: features form early.
STEM_GROUPS = {"layer": lambda c: 1, "channel": lambda c: c}


class _ConvCLBackward(torch.autograd.Function):
    """conv2d forward as usual; backward through channels-last copies of input and grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        cl = torch.channels_last
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.contiguous(memory_format=cl),
            x.contiguous(memory_format=cl),
            weight,
            [weight.shape[0]] if has_bias else None,
            list(stride),
            list(padding),
            [1, 1],
            False,
            [0, 0],
            1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias],
        )
        gx = gx.contiguous() if gx is not None else None
        return gx, gw, gb if has_bias else None, None, None


class ChannelsLastBackwardConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters, same outputs, bit-identical gradients) whose backward
    runs on channels-last copies when on CPU.

    Why: oneDNN's backward for a conv reading few channels at a large size (the stem's
    stride-2 conv over the 8 full-resolution maps of 64×64) takes about twice as long from
    NCHW as from channels-last, copies included (alone: 33 ms against 18 ms per batch of 128
    on 2 cores; inside the whole stem's forward and backward it saves about 8 ms of 105);
    the forward is faster from NCHW, and the other stem convs gain nothing. Tested to give
    the same gradients bit for bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.groups != 1 or self.padding_mode != "zeros" or self.dilation != (1, 1)
        if x.device.type != "cpu" or plain or isinstance(self.padding, str):
            return super().forward(x)
        return _ConvCLBackward.apply(x, self.weight, self.bias, self.stride, self.padding)


class ConvStem(nn.Module):
    """images [B, 3, S, S] → patch tokens [B, P, D] with P = (S / patch_size)².

    Optionally (`full_res` > 0) a stride-1 3×3 conv to `full_res` channels at full resolution;
    then log2(patch_size) − 1 stride-2 3×3 convs (width doubling from `channels`); each conv
    followed by a GroupNorm (`norm`, a key of STEM_GROUPS) and GELU; then a stride-2 2×2 conv
    to `d_model`; plus a learned position embedding per patch. Every norm is per image, so a
    row's tokens never depend on the other rows of its batch (one process and several agree).

    Why "channel" for easy-VQA: with "layer", a linear shape probe on the pooled tokens needs
    150–200 steps of batch 128 to pass 95%, and the VQA model's shape answers sit near chance
    for 5–6 epochs; with "channel" the probe needs 50–100 steps and the VQA model leaves the
    plateau in its second epoch (README, Robustness).

    Why `full_res`: a stride-2 conv first sees a shape 5 pixels wide as 2–3 samples; one layer
    of features at full resolution (edges, corners) first is what tells a small circle from a
    small square. A shape probe (the stem, max-pooled, an MLP; 500 steps of batch 128 with the
    default augmentation) on circles, rectangles and triangles 0.07–0.12 of the side: 75.0%
    without, 92.2% with 8 full-resolution channels (91.7% with 16; 97.8% after 1,000 steps).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int,
        d_model: int,
        norm: str = "layer",
        full_res: int = 0,
    ) -> None:
        super().__init__()
        n = int(math.log2(patch_size))
        if 2**n != patch_size or n < 1:
            raise ValueError(f"model.patch_size: expected a power of two >= 2, got {patch_size}")
        layers: list[nn.Module] = []
        c_in = 3
        for i, (c_out, stride) in enumerate(stem_convs(patch_size, channels, full_res)):
            # the conv that reads the full-resolution maps: see ChannelsLastBackwardConv2d
            conv = ChannelsLastBackwardConv2d if full_res and i == 1 else nn.Conv2d
            layers += [
                conv(c_in, c_out, 3, stride=stride, padding=1),
                nn.GroupNorm(STEM_GROUPS[norm](c_out), c_out),
                nn.GELU(),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, d_model, 2, stride=2))
        self.stem = nn.Sequential(*layers)
        self.num_patches = (image_size // patch_size) ** 2
        self.pos_PD = nn.Parameter(torch.zeros(self.num_patches, d_model))
        self.pos_PD._no_weight_decay = True  # a position table: not decayed
        nn.init.trunc_normal_(self.pos_PD, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # [B, D, S/p, S/p]
        return x.flatten(2).transpose(1, 2) + self.pos_PD
