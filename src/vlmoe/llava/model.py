"""The MoE-LLaVA model: a vision encoder, an MLP projector and a causal language model.

Shape legend: B batch, L sequence positions, V visual tokens per image (grid²), F encoder
feature width, D language-model width, S image side.

An image becomes V visual tokens: the encoder's final feature map is average-pooled to a
grid × grid map (``[B, F, grid, grid]`` → ``[B, V, F]``) and projected to the LM's width by a
2-layer MLP (LLaVA-1.5's ``mlp2x_gelu``). The tokens take the places of V placeholder ids in
the ChatML prompt (``LlavaBatch.image_mask``); the LM then runs on the spliced embeddings.
A frozen encoder (the default) never changes, so its pooled features can be computed once
per image and handed in as ``LlavaBatch.features`` instead of pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmoe.lm import CausalLM, generate
from vlmoe.models.output import ModelOutput

from .config import LlavaConfig

__all__ = [
    "LlavaBatch",
    "LlavaModel",
    "Projector",
    "TinyEncoder",
    "build_encoder",
    "word_alignment_loss",
    "pooled_features",
]


@dataclass
class LlavaBatch:
    """input_ids long [B, L] (placeholder ids where image_mask is True); image_mask bool
    [B, L] (exactly V True per row with an image, none without); attention_mask long [B, L]
    (1 = token, 0 = padding; right-padded for training, left-padded for generation);
    labels long [B, L] or None (the answer tokens, -100 elsewhere; shifted inside the LM);
    features float [B, V, F] (cached encoder output) or images uint8 [B, 3, S, S] or both
    None (text only); question_index long [B] (row of each example in its split);
    word_ids long [B, W] or None: per row, the token ids of its image's caption words
    (-100 = none), targets of the word-alignment loss (`word_alignment_loss`; training only)."""

    input_ids: Tensor
    image_mask: Tensor
    attention_mask: Tensor
    labels: Tensor | None
    features: Tensor | None
    images: Tensor | None
    question_index: Tensor
    word_ids: Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> LlavaBatch:
        """A copy with every tensor on ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return LlavaBatch(**{k: v if v is None else v.to(device) for k, v in kw.items()})


class TinyEncoder(nn.Module):
    """A random 2-layer conv encoder for tests: ``[B, 3, S, S] -> [B, 32, S/4, S/4]``."""

    feature_dim = 32

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.conv2 = nn.Conv2d(16, self.feature_dim, 3, 2, 1)

    def features(self, x_BCHW: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x_BCHW))))


def build_encoder(cfg: LlavaConfig) -> nn.Module:
    """The configured vision encoder in eval mode: EfficientNet-Lite0 with its ImageNet
    weights, or a TinyEncoder drawn from ``cfg.vision_seed`` (the same weights every call)."""
    if cfg.vision == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(cfg.vision_seed)
            return TinyEncoder().eval()
    from vlmoe.vision import load_efficientnet_lite0

    return load_efficientnet_lite0().eval()


def pooled_features(encoder: nn.Module, images: Tensor, cfg: LlavaConfig) -> Tensor:
    """uint8 images ``[B, 3, S, S]`` → pooled features ``[B, V, F]``: scaled to [-1, 1],
    resized to ``cfg.encoder_size`` (bilinear), encoded, average-pooled to grid × grid."""
    x = (images.float() / 255.0 - 0.5) / 0.5
    if x.shape[-1] != cfg.encoder_size:
        x = F.interpolate(x, size=cfg.encoder_size, mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > cfg.encoder_size)  # fmt: skip
    f_BFhw = F.adaptive_avg_pool2d(encoder.features(x), cfg.grid)
    return f_BFhw.flatten(2).transpose(1, 2)


class Projector(nn.Module):
    """Visual features ``[B, V, F]`` → visual tokens ``[B, V, D]``: a 2-layer GELU MLP
    (LLaVA-1.5's ``mlp2x_gelu``), with ``norm`` a LayerNorm on its input and an RMSNorm on
    its output whose gain starts at ``token_rms``, the RMS of the LM's token embeddings.

    Why the norms: EfficientNet's pooled ReLU6 features are not normalised (mean 0.13, a few
    large channels), and the plain MLP's tokens came out 11× the RMS of SmolLM2's word
    embeddings (1.50 vs 0.136, measured after a dense stage); the LM then never learned to
    read colour from them (10% on colour questions after 7,000 samples, answering "gray").
    Normalised tokens at the scale of words are what the LM's layers were trained on.
    """

    def __init__(self, f: int, h: int, d: int, norm: bool, token_rms: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(f) if norm else nn.Identity()
        self.fc1, self.act, self.fc2 = nn.Linear(f, h), nn.GELU(), nn.Linear(h, d)
        self.norm_out = nn.RMSNorm(d, eps=1e-6) if norm else nn.Identity()
        if norm:
            nn.init.constant_(self.norm_out.weight, token_rms)

    def forward(self, f_BVF: Tensor) -> Tensor:
        x = f_BVF.to(self.fc1.weight.dtype)
        return self.norm_out(self.fc2(self.act(self.fc1(self.norm_in(x)))))


def word_alignment_loss(vis_BVD: Tensor, embed_WD: Tensor, word_ids_BN: Tensor) -> Tensor:
    """Pull each image's visual tokens towards the word embeddings of its caption's words.

    ``vis_BVD`` visual tokens, ``embed_WD`` the LM's token embeddings (W = vocabulary),
    ``word_ids_BN`` target ids per row (-100 = none). A word's score is
    ``logsumexp_v <vis_v, embed_w>`` (some visual token reads as that word); the loss is the
    mean over targets of the cross-entropy of that score over the vocabulary without the
    row's other targets (the colour and the shape word must not compete for one softmax).
    0 without targets.

    Why: SmolLM2 learns balanced yes/no questions ("is there a red shape?") in ~60 steps
    when the image is given as the caption *text*, but not in 500 steps from visual tokens
    that only its later layers learned to name (measured): matching the question's word
    against a token in context is what a pretrained LM already does. Visual tokens near the
    words of what they show can be matched the same way.
    """
    mask = word_ids_BN >= 0
    if not bool(mask.any()):
        return vis_BVD.sum() * 0.0
    score_BW = torch.einsum("bvd,wd->bvw", vis_BVD.float(), embed_WD.float()).logsumexp(1)
    B, N = word_ids_BN.shape
    ids = word_ids_BN.clamp_min(0)
    others_BNW = torch.zeros(B, N, score_BW.shape[1], dtype=torch.bool, device=ids.device)
    others_BNW.scatter_(2, ids[:, None, :].expand(B, N, N), True)
    others_BNW.scatter_(2, ids[:, :, None], False)
    score_BNW = score_BW[:, None, :].masked_fill(others_BNW, float("-inf"))
    logp_BN = score_BNW.log_softmax(-1).gather(2, ids[:, :, None]).squeeze(2)
    return -logp_BN[mask].mean()


class LlavaModel(nn.Module):
    """``vision`` (encoder) → ``projector`` (`Projector`: F → H → D) → ``lm`` (``CausalLM``)."""

    def __init__(self, cfg: LlavaConfig, lm: CausalLM, vision: nn.Module) -> None:
        super().__init__()
        self.cfg, self.lm, self.vision = cfg, lm, vision
        d, f = lm.config.d_model, vision.feature_dim
        h = cfg.projector_hidden or d
        rms = float(lm.embed.weight.detach().float().pow(2).mean().sqrt())
        self.projector = Projector(f, h, d, cfg.projector_norm, rms)
        if cfg.freeze_vision:
            self.vision.requires_grad_(False)

    def train(self, mode: bool = True) -> LlavaModel:
        """As ``nn.Module.train``, but a frozen encoder stays in eval mode: its BatchNorm
        statistics must not drift, or cached features would no longer be its output."""
        super().train(mode)
        if self.cfg.freeze_vision:
            self.vision.eval()
        return self

    def param_counts(self) -> tuple[int, int]:
        """``(total, active per token)`` parameters (the LM's MoE counts k of E experts)."""
        total, active = self.lm.param_counts()
        rest = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("lm."))
        return total + rest, active + rest

    def visual_tokens(self, batch: LlavaBatch) -> Tensor:
        """``[B, V, D]`` projected visual tokens from cached features or from the images."""
        feats = batch.features
        if feats is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_vision):
                feats = pooled_features(self.vision, batch.images, self.cfg)
        return self.projector(feats)

    def embed(self, batch: LlavaBatch) -> Tensor:
        """Input embeddings ``[B, L, D]``: token embeddings with the visual tokens spliced in
        at ``image_mask`` (row-major: row b's V positions get its V tokens in order)."""
        return self._embed(batch)[0]

    def _embed(self, batch: LlavaBatch) -> tuple[Tensor, Tensor | None]:
        emb = self.lm.embed(batch.input_ids)
        if batch.features is None and batch.images is None:
            return emb, None
        vis = self.visual_tokens(batch)
        return emb.masked_scatter(batch.image_mask[..., None], vis.to(emb.dtype)), vis

    def forward(self, batch: LlavaBatch) -> ModelOutput:
        """The LM's ``ModelOutput`` on the spliced prompt: with ``labels``, next-token loss on
        the answer tokens only (``logits`` ``[N, V]`` at those N positions). In training, with
        ``batch.word_ids`` and ``cfg.align_words`` > 0, ``loss`` also holds that weight times
        `word_alignment_loss` (logged as the metric ``align_loss``); ``task_loss`` does not."""
        emb, vis = self._embed(batch)
        out = self.lm(inputs_embeds=emb, attention_mask=batch.attention_mask, labels=batch.labels)
        w = self.cfg.align_words
        if self.training and w > 0 and vis is not None and batch.word_ids is not None:
            align = word_alignment_loss(vis, self.lm.embed.weight.detach(), batch.word_ids)
            out.loss = out.loss + w * align if out.loss is not None else None
            out.metrics["align_loss"] = align.detach()
        return out

    @torch.no_grad()
    def generate(
        self, batch: LlavaBatch, eos_id: int, pad_id: int, max_new_tokens: int | None = None,
        on_token: Callable[[Tensor], None] | None = None, temperature: float = 0.0,
    ) -> list[list[int]]:  # fmt: skip
        """Greedy (or sampled) answers to a left-padded prompt batch with the KV cache: one id
        list per row, cut before the first ``eos_id``. ``on_token([B])`` sees each column."""
        new = generate(self.lm, inputs_embeds=self.embed(batch),
                       attention_mask=batch.attention_mask,
                       max_new_tokens=max_new_tokens or self.cfg.max_answer_tokens,
                       stop_ids=[eos_id], pad_id=pad_id, on_token=on_token,
                       temperature=temperature)  # fmt: skip
        out = []
        for row in new.tolist():
            out.append(row[: row.index(eos_id)] if eos_id in row else row)
        return out
