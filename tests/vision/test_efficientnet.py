"""EfficientNet-Lite0 with its packaged ImageNet weights, on a real photograph."""

from __future__ import annotations

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image

from vlmoe.lm import WeightsError
from vlmoe.vision import load_efficientnet_lite0, preprocess
from vlmoe.vision.efficientnet import SameConv2d

MILITARY_UNIFORM = 652  # ImageNet-1k class index


@pytest.fixture(scope="module")
def model():
    return load_efficientnet_lite0()


def _hopper(size: int) -> np.ndarray:
    # Grace Hopper in uniform: a photograph shipped with matplotlib (a core dependency)
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def test_imagenet_class_of_a_real_photo(model):
    with torch.no_grad():
        probs = model(preprocess(_hopper(224))).softmax(-1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    assert probs[MILITARY_UNIFORM] > 0.4  # measured 0.466; symmetric padding gives ~0.33


def test_feature_map_shapes(model):
    with torch.no_grad():
        f224 = model.features(preprocess(_hopper(224)))
        f128 = model.features(preprocess(np.stack([_hopper(128)] * 2)))
    assert f224.shape == (1, 1280, 7, 7) and f128.shape == (2, 1280, 4, 4)
    assert f224.min() >= 0 and f224.max() <= 6  # after ReLU6


def test_same_padding_is_tensorflow_asymmetric():
    conv = SameConv2d(1, 1, 3, 2, bias=False)
    torch.nn.init.ones_(conv.weight)
    y = conv(torch.ones(1, 1, 4, 4))
    # 4 → 2 outputs, total padding 1, all of it on the right/bottom: the first output sees a
    # full 3×3 window (9), the last one a 2×2 window (4)
    assert y.shape == (1, 1, 2, 2) and y[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_bad_weight_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a state dict")
    with pytest.raises(WeightsError, match="junk.pth: not a readable PyTorch state dict"):
        load_efficientnet_lite0(junk)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(WeightsError, match="other.pth: not EfficientNet-Lite0 weights"):
        load_efficientnet_lite0(other)
