"""Vision encoders: EfficientNet-Lite0 with its ImageNet weights (``efficientnet``)."""

from .efficientnet import (
    EfficientNetLite0,
    load_efficientnet_lite0,
    preprocess,
)

__all__ = ["EfficientNetLite0", "load_efficientnet_lite0", "preprocess"]
