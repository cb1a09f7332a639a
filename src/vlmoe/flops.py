"""Analytic FLOP counts of a VL-MoE model, read off its `ModelConfig`.

Convention: one multiply-accumulate = 2 FLOPs (the 2·MACs convention of Kaplan et al. and of
`torch.utils.flop_counter`). Only matmuls and convolutions are counted — attention projections,
attention scores (Q·Kᵀ and A·V), FFN / expert matmuls with top-k, the router, the conv stem and
the answer head; element-wise work (norms, activations, softmax, residuals, embedding look-ups)
is left out, as it is < 1% here and is what every FLOP counter leaves out. A training step is
counted as 3× the forward pass (backward ≈ 2× forward: gradients with respect to activations
and to weights).

Per sample with P image patches and L text tokens, S = P + L, D = d_model:

    stem        Σ_convs 2 · H_out·W_out · C_out · C_in · k²
    attention   per block 2·S·D·3D (qkv) + 2·S·D·D (proj) + 2·2·S²·D (scores, A·V)
    FFN dense   per token 2·D·F·(3 for SwiGLU | 2 for GELU), F = d_ff
    FFN MoE     per token 2·D·E (router) + k · 2·D·F_e·(3 | 2), F_e = d_ff // top_k
                (+ shared experts; k = E for the dense router)
    head        2·(nD·D + D·A)   (MLP on [cls, mean vision, their product], n = 3; with
                `head_text="cls+mean"` also the mean text token and its product, n = 5)

`tests/test_compare.py` checks this against `FlopCounterMode` on the built model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vlmoe.config import ModelConfig, stem_convs
from vlmoe.models.heads import AnswerHead


@dataclass
class FlopCount:
    """Forward FLOPs per sample, by component (2·MACs). `total` is their sum."""

    stem: float
    attention_proj: float
    attention_scores: float
    ffn_dense: float
    experts: float
    router: float
    head: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    @property
    def train(self) -> float:
        """FLOPs of one training sample: forward + backward ≈ 3 × forward."""
        return 3.0 * self.total

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total, "train": self.train}


def _ffn_flops(d_model: int, d_ff: int, activation: str) -> int:
    """Forward FLOPs of one FFN on one token: in-projection (2F wide for SwiGLU) + out."""
    n_in = 2 * d_ff if activation == "swiglu" else d_ff
    return 2 * d_model * n_in + 2 * d_ff * d_model


def stem_flops(cfg: ModelConfig) -> int:
    """FLOPs of the conv stem (`vlmoe.models.vision.ConvStem`) on one image."""
    size, c_in, total = cfg.image_size, 3, 0
    for c_out, stride in stem_convs(cfg.patch_size, cfg.stem_channels, cfg.stem_full_res):
        size = (size + 2 - 3) // stride + 1  # 3×3, padding 1
        total += 2 * size * size * c_out * c_in * 9
        c_in = c_out
    size //= 2  # final stride-2 2×2 conv to d_model
    total += 2 * size * size * cfg.d_model * c_in * 4
    # conv biases add H·W·C_out FLOPs each; FlopCounterMode ignores them and so do we
    return total


def moe_token_flops(cfg: ModelConfig) -> tuple[int, int]:
    """(expert FLOPs, router FLOPs) of one MoE FFN on one token."""
    m = cfg.expert_config()
    k = m.num_experts if m.router == "dense" else m.top_k
    experts = k * _ffn_flops(cfg.d_model, m.d_ff, m.activation)
    if m.num_shared_experts:
        experts += _ffn_flops(cfg.d_model, m.num_shared_experts * m.d_ff, m.activation)
    return experts, 2 * cfg.d_model * m.num_experts


def flops_per_sample(cfg: ModelConfig, text_len: float) -> FlopCount:
    """Forward FLOPs of one (image, question) sample with `text_len` text tokens ([CLS] included).

    `text_len` may be fractional (a mean over the data). Padding is not counted: it is the
    compute a sample needs, not what a padded batch happens to spend.
    """
    D, P = cfg.d_model, cfg.num_patches
    L = min(float(text_len), cfg.max_text_len)
    S = P + L
    act = cfg.expert_config().activation
    dense_tok = _ffn_flops(D, cfg.d_ff, act)
    moe_tok, router_tok = moe_token_flops(cfg)
    attn_proj = attn_scores = ffn = experts = router = 0.0
    for i in range(cfg.n_layers):
        attn_proj += 2 * S * D * 3 * D + 2 * S * D * D
        attn_scores += 2 * 2 * S * S * D
        if i >= cfg.n_layers - cfg.vl_layers:
            ffn += S * dense_tok
            continue
        is_moe = i in cfg.moe_layers
        for moe_on, n_tok in ((cfg.moe_vision, P), (cfg.moe_text, L)):
            if is_moe and moe_on:
                experts += n_tok * moe_tok
                router += n_tok * router_tok
            else:
                ffn += n_tok * dense_tok
    head = 2 * (AnswerHead.num_inputs(cfg.head_text_mean) * D * D + D * cfg.num_answers)
    return FlopCount(
        stem=float(stem_flops(cfg)),
        attention_proj=attn_proj,
        attention_scores=attn_scores,
        ffn_dense=ffn,
        experts=experts,
        router=router,
        head=float(head),
    )


__all__ = ["FlopCount", "flops_per_sample", "moe_token_flops", "stem_flops"]
