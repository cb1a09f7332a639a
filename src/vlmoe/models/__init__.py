"""Vision-language models built on `vlmoe.moe`: the VL-MoE multiway transformer."""

from vlmoe.models.vlmo import ModelOutput, RoutingRecord, VLMoE, build_model

__all__ = ["ModelOutput", "RoutingRecord", "VLMoE", "build_model"]
