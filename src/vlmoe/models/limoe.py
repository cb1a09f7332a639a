"""LIMoE: one transformer, one modality-agnostic pool of experts, a contrastive loss.

Mustafa et al. 2022 ("Multimodal Contrastive Learning with LIMoE"): image patches and words
go through the same transformer (shared attention weights, shared expert pool); an image and
a text are separate sequences, pooled and projected into one embedding space and trained
with CLIP's symmetric InfoNCE. In each MoE block the real tokens of both modalities are
routed together (one call, one pool), with ``group_ids`` 0 = image, 1 = text so that the
LIMoE local / global entropy losses of `vlmoe.moe.losses` are taken per modality.

Legend: B batch, P image tokens (patches, + 1 with a CLS token), L text positions,
D model width, E embedding width, T routed tokens (both modalities, real tokens only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.limoe.config import LIMoEConfig
from vlmoe.models.blocks import Attention
from vlmoe.models.output import ModelOutput, RoutingRecord, init_linear
from vlmoe.models.text import TextEmbedding
from vlmoe.models.vision import ConvStem
from vlmoe.moe import DenseFFN, MoE, MoEConfig, MoEOutput, RoutingDecision, model_param_counts

if TYPE_CHECKING:
    from vlmoe.data.pairs import PairBatch

__all__ = [
    "GROUP_IDS",
    "LIMoE",
    "PairEncoding",
    "build_limoe",
    "contrastive_loss",
    "positives_from_ids",
]

#: the group id of each modality's tokens in the shared pool (the entropy losses' groups)
GROUP_IDS = {"vision": 0, "text": 1}


@dataclass
class _Stream:
    """One modality's sequences inside a block: x [B, N, D], keep [B, N] bool (real tokens),
    ``offset`` = prefix tokens (an image CLS) so the recorded positions are patch indices."""

    x: torch.Tensor
    keep: torch.Tensor
    modality: str
    offset: int = 0


@dataclass
class PairEncoding:
    """What the tower(s) produced for one batch.

    image [B, E] and text [B, E] L2-normalised embeddings (either may be None when that
    modality was not given); aux_loss 0-dim, Σ of every MoE block's weighted aux losses;
    aux_losses name → 0-dim, the same summed over blocks per loss ("load_balance",
    "local_entropy", …); routing one `RoutingRecord` per MoE block and modality.
    """

    image: torch.Tensor | None
    text: torch.Tensor | None
    aux_loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: list[RoutingRecord] = field(default_factory=list)


class LIMoEBlock(nn.Module):
    """Pre-norm block: self-attention within each stream (shared weights), then one FFN —
    dense, or the shared expert pool fed with the real tokens of all streams at once."""

    def __init__(self, cfg: LIMoEConfig, layer: int, moe: MoEConfig | None) -> None:
        super().__init__()
        self.layer = layer
        self.norm_attn = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn: nn.Module = (
            MoE(moe) if moe is not None else DenseFFN(cfg.d_model, cfg.d_ff, cfg.moe.activation)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, streams: list[_Stream]) -> tuple[list[_Stream], MoEOutput | None]:
        """Each stream's x updated in place of the old; the MoE output (None when dense)."""
        for s in streams:
            s.x = s.x + self.drop(self.attn(self.norm_attn(s.x), s.keep))
        if not isinstance(self.ffn, MoE):
            for s in streams:
                s.x = s.x + self.drop(self.ffn(self.norm_ffn(s.x)))
            return streams, None
        # gather every stream's real tokens into one [T, D] call: one pool, joint capacity
        h_TD = torch.cat([self.norm_ffn(s.x)[s.keep] for s in streams])
        gid_T = torch.cat(
            [torch.full((int(s.keep.sum()),), GROUP_IDS[s.modality]) for s in streams]
        ).to(h_TD.device)
        out = self.ffn(h_TD, group_ids=gid_T)
        start = 0
        for s in streams:
            n = int(s.keep.sum())
            y = torch.zeros_like(s.x)
            y[s.keep] = out.output[start : start + n]
            s.x = s.x + self.drop(y)
            start += n
        return streams, out

    def records(self, streams: list[_Stream], out: MoEOutput) -> list[RoutingRecord]:
        """One `RoutingRecord` per stream: its rows of the joint routing, with statistics
        computed over that modality's tokens only."""
        assert isinstance(self.ffn, MoE) and out.routing is not None
        recs, start = [], 0
        for s in streams:
            idx = s.keep.nonzero()  # [T_s, 2] row-major, the order of s.x[s.keep]
            n = idx.shape[0]
            d = RoutingDecision(*(t[start : start + n] for t in out.routing))
            # top-k routers choose K experts for every token, so the pre-drop choice count
            # is n·K: zeros stand in for "chosen" (only its >= 0 count is read)
            stats = self.ffn.stats(d, torch.zeros_like(d.indices))
            idx = idx - torch.tensor([0, s.offset], device=idx.device)
            recs.append(RoutingRecord(self.layer, s.modality, stats, d, idx))
            start += n
        return recs


class Tower(nn.Module):
    """A stack of `LIMoEBlock`s with a final LayerNorm."""

    def __init__(self, cfg: LIMoEConfig) -> None:
        super().__init__()
        moe = cfg.expert_config()
        self.blocks = nn.ModuleList(
            LIMoEBlock(cfg, i, moe if i in cfg.moe_layers else None) for i in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, streams: list[_Stream]) -> tuple[list[torch.Tensor], PairEncoding]:
        """→ (normalised token states per stream, aux losses and records; no embeddings)."""
        aux = streams[0].x.new_zeros((), dtype=torch.float32)
        named: dict[str, torch.Tensor] = {}
        recs: list[RoutingRecord] = []
        for blk in self.blocks:
            streams, out = blk(streams)
            if out is None:
                continue
            aux = aux + out.aux_loss
            for k, v in out.aux_losses.items():
                named[k] = named[k] + v if k in named else v
            recs += blk.records(streams, out)
        return [self.norm(s.x) for s in streams], PairEncoding(None, None, aux, named, recs)


class LIMoE(nn.Module):
    """The LIMoE contrastive image–text model (or its dense two-tower twin, ``towers=2``).

    encode_image(images [B,3,S,S]) → [B,E]; encode_text(ids [B,L], mask [B,L]) → [B,E]
    (both L2-normalised); forward(batch with images / input_ids / attention_mask) →
    ModelOutput(loss = contrastive + aux, logits = similarity [B,B] · logit scale,
    metrics {"correct": image→text top-1 hits, "count": B}).
    """

    def __init__(self, cfg: LIMoEConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"model.vocab_size must be set (>0), got {cfg.vocab_size}")
        self.cfg = cfg
        D = cfg.d_model
        self.vision = ConvStem(cfg.image_size, cfg.patch_size, cfg.stem_channels, D)
        self.text = TextEmbedding(cfg.vocab_size, cfg.max_text_len, D)
        self.image_cls_D = nn.Parameter(torch.zeros(D)) if cfg.image_pool == "cls" else None
        self.tower = Tower(cfg)
        # the dense CLIP twin: a second, separate tower for text
        self.text_tower = Tower(cfg) if cfg.towers == 2 else None
        self.proj_image = nn.Linear(D, cfg.embed_dim, bias=False)
        self.proj_text = nn.Linear(D, cfg.embed_dim, bias=False)
        # shape [1], not a scalar: FSDP2's fully_shard refuses 0-dim parameters
        self.log_logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / cfg.init_temperature)]))
        self.apply(init_linear)

    # ------------------------------------------------------------------ inputs / pooling
    def _image_stream(self, images: torch.Tensor) -> _Stream:
        x = self.vision(images)
        offset = 0
        if self.image_cls_D is not None:
            x = torch.cat([self.image_cls_D.expand(x.shape[0], 1, -1), x], dim=1)
            offset = 1
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return _Stream(x, keep, "vision", offset)

    def _text_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Stream:
        L = min(input_ids.shape[1], self.cfg.max_text_len)
        return _Stream(self.text(input_ids[:, :L]), attention_mask[:, :L].bool(), "text")

    def _pool(self, x_BND: torch.Tensor, s: _Stream) -> torch.Tensor:
        if s.modality == "vision":
            pooled = x_BND[:, 0] if self.cfg.image_pool == "cls" else x_BND.mean(1)
            return F.normalize(self.proj_image(pooled), dim=-1)
        if self.cfg.text_pool == "cls":
            pooled = x_BND[:, 0]
        else:  # last real token
            last_B = s.keep.sum(1).clamp_min(1) - 1
            pooled = x_BND[torch.arange(x_BND.shape[0], device=x_BND.device), last_B]
        return F.normalize(self.proj_text(pooled), dim=-1)

    # ------------------------------------------------------------------ encoders
    def encode_pair(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> PairEncoding:
        """Encode images and/or texts. With one tower and both given, both modalities' tokens
        share each MoE call (joint routing, per-modality entropy losses)."""
        streams = []
        if images is not None:
            streams.append(self._image_stream(images))
        if input_ids is not None:
            assert attention_mask is not None, "attention_mask is required with input_ids"
            streams.append(self._text_stream(input_ids, attention_mask))
        if not streams:
            raise ValueError("encode_pair: give images, texts or both")
        if self.text_tower is None:
            groups = [(self.tower, streams)]
        else:
            groups = [(self.tower if s.modality == "vision" else self.text_tower, [s]) for s in streams]  # fmt: skip
        enc = PairEncoding(None, None, streams[0].x.new_zeros((), dtype=torch.float32))
        for tower, ss in groups:
            xs, part = tower(ss)
            for x, s in zip(xs, ss, strict=True):
                setattr(enc, "image" if s.modality == "vision" else "text", self._pool(x, s))
            enc.aux_loss = enc.aux_loss + part.aux_loss
            for k, v in part.aux_losses.items():
                enc.aux_losses[k] = enc.aux_losses[k] + v if k in enc.aux_losses else v
            enc.routing += part.routing
        return enc

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, S, S] in [-1, 1] → L2-normalised embeddings [B, E]."""
        out = self.encode_pair(images, None, None).image
        assert out is not None
        return out

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids long [B, L] ([CLS] first), mask bool [B, L] → L2-normalised embeddings [B, E]."""
        out = self.encode_pair(None, input_ids, attention_mask).text
        assert out is not None
        return out

    def logit_scale(self) -> torch.Tensor:
        """The learned 1/τ, clamped to ``max_logit_scale`` (CLIP's 100) in the forward."""
        return self.log_logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()[0]

    # ------------------------------------------------------------------ training
    def forward(self, batch: PairBatch) -> ModelOutput:
        """One contrastive step on a `PairBatch` (images, input_ids, attention_mask).

        With only one modality given (``images`` or ``input_ids`` None) it only encodes:
        loss None, logits = that modality's embeddings [B, E]. Evaluation encodes through
        ``forward`` so that wrappers hooking it (FSDP's gathers, expert parallelism) act.
        """
        enc = self.encode_pair(batch.images, batch.input_ids, batch.attention_mask)
        if enc.image is None or enc.text is None:
            emb = enc.image if enc.image is not None else enc.text
            return ModelOutput(None, None, enc.aux_loss, emb, enc.routing)
        logits_BB = self.logit_scale() * enc.image @ enc.text.T
        pos_BB = (
            positives_from_ids(batch.input_ids, batch.attention_mask)
            if self.cfg.multi_positive
            else torch.eye(len(logits_BB), dtype=torch.bool, device=logits_BB.device)
        )
        task = contrastive_loss(logits_BB, pos_BB)
        with torch.no_grad():
            hit_B = pos_BB.gather(1, logits_BB.argmax(1, keepdim=True)).squeeze(1)
        metrics = {
            "correct": hit_B.sum(),
            "count": torch.tensor(len(hit_B), device=hit_B.device),
        }
        return ModelOutput(task + enc.aux_loss, task, enc.aux_loss, logits_BB, enc.routing, metrics)

    def param_counts(self) -> tuple[int, int]:
        """(total parameters, parameters active per token): each MoE block counts its
        router + top-k experts as active; everything else is active. With two towers a
        token only passes through one of them, so one tower's share is counted."""
        total, active = model_param_counts(self)
        if self.text_tower is not None:
            active -= sum(p.numel() for p in self.text_tower.parameters())
        return total, active


def positives_from_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, B]: True where two texts are the same token sequence (the diagonal always)."""
    ids = input_ids.masked_fill(~attention_mask.bool(), -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


def contrastive_loss(logits_BB: torch.Tensor, positives_BB: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """CLIP's symmetric InfoNCE: ½ (CE(image → texts) + CE(text → images)).

    logits_BB[i, j] = scale · ⟨image_i, text_j⟩. ``positives_BB`` bool [B, B] (symmetric,
    diagonal True) spreads each row's target evenly over its positives — with the identity
    (the default) this is exactly CLIP's loss with targets arange(B).
    """
    if positives_BB is None:
        target = torch.arange(logits_BB.shape[0], device=logits_BB.device)
        return 0.5 * (F.cross_entropy(logits_BB, target) + F.cross_entropy(logits_BB.T, target))
    p_BB = positives_BB.float()
    i2t = -(p_BB / p_BB.sum(1, keepdim=True) * F.log_softmax(logits_BB.float(), 1)).sum(1)
    t2i = -(p_BB.T / p_BB.T.sum(1, keepdim=True) * F.log_softmax(logits_BB.float().T, 1)).sum(1)
    return 0.5 * (i2t.mean() + t2i.mean())


def build_limoe(cfg: LIMoEConfig) -> LIMoE:
    """Build a LIMoE (or its dense twin) from a complete config (vocab_size set)."""
    return LIMoE(cfg)
