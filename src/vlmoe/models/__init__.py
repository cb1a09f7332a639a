"""Vision-language models built on `vlmoe.moe`: the VL-MoE multiway transformer and LIMoE
(one tower, one shared expert pool, contrastive)."""

from vlmoe.models.limoe import LIMoE, build_limoe
from vlmoe.models.vlmo import ModelOutput, RoutingRecord, VLMoE, build_model

__all__ = ["LIMoE", "ModelOutput", "RoutingRecord", "VLMoE", "build_limoe", "build_model"]
