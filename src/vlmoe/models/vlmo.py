"""VL-MoE: a multiway transformer whose per-modality FFNs are sparse MoE layers.

Shen et al. 2023 ("Scaling Vision-Language Models with Sparse Mixture of Experts") on VLMo's
multiway transformer (Bao et al. 2022): image patches and words share every self-attention,
while each modality has its own FFN — here an `vlmoe.moe.MoE` in the blocks the config names.

Legend: B batch, P patches, L text positions, D model width, A answers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.config import ModelConfig
from vlmoe.data.batching import group_rows
from vlmoe.models.blocks import MultiwayBlock
from vlmoe.models.heads import AnswerHead, SceneHead
from vlmoe.models.output import ModelOutput, RoutingRecord, init_linear
from vlmoe.models.text import TextEmbedding
from vlmoe.models.vision import ConvStem
from vlmoe.moe import model_param_counts

__all__ = ["ModelOutput", "RoutingRecord", "VLMoE", "build_model"]


class VLMoE(nn.Module):
    """The VL-MoE visual question answering model.

    forward(batch) → ModelOutput, where batch has images [B,3,S,S] float, input_ids [B,L]
    long, attention_mask [B,L] bool and labels [B] long or None (-100 = ignore): logits [B, A];
    loss / task_loss (cross-entropy over known labels; None without labels or with none known;
    loss adds the MoE aux loss and, with a scene head and `batch.scenes`, `scene_loss`);
    metrics {"correct", "count"} over the known labels.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.num_answers <= 0:
            raise ValueError(
                f"model.vocab_size and model.num_answers must be set (>0), got {cfg.vocab_size}, {cfg.num_answers}"
            )
        self.cfg = cfg
        D = cfg.d_model
        self.vision = ConvStem(
            cfg.image_size,
            cfg.patch_size,
            cfg.stem_channels,
            D,
            norm=cfg.stem_norm,
            full_res=cfg.stem_full_res,
        )
        self.text = TextEmbedding(cfg.vocab_size, cfg.max_text_len, D)
        self.type_vision_D = nn.Parameter(torch.zeros(D))
        self.type_text_D = nn.Parameter(torch.zeros(D))
        moe_cfg = cfg.expert_config()
        blocks = []
        for i in range(cfg.n_layers):
            is_moe = i in cfg.moe_layers
            blocks.append(
                MultiwayBlock(
                    D,
                    cfg.n_heads,
                    cfg.d_ff,
                    layer=i,
                    vision_moe=moe_cfg if is_moe and cfg.moe_vision else None,
                    text_moe=moe_cfg if is_moe and cfg.moe_text else None,
                    shared_vl=i >= cfg.n_layers - cfg.vl_layers,
                    dropout=cfg.dropout,
                    activation=moe_cfg.activation,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(D)
        self.head = AnswerHead(D, cfg.num_answers, text_mean=cfg.head_text_mean)
        # training only: answers never read it (ModelConfig.scene_loss)
        self.scene_head = (
            SceneHead(D, cfg.scene_classes) if cfg.scene_loss > 0 and cfg.scene_classes else None
        )
        self.apply(init_linear)

    def encode(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        same_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[RoutingRecord]]:
        """Run the blocks → (vision tokens [B,P,D], text tokens [B,L,D], aux loss, records).

        `same_image` (long [B], e.g. `Batch.first_row`): rows with equal values have identical
        images, so the conv stem runs once per distinct image and its tokens are shared (its
        gradient summed). The stem treats each image on its own, so the result is the same."""
        return self.encode_patches(
            self._patch_tokens(images, same_image), input_ids, attention_mask
        )

    def encode_patches(
        self, patches: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[RoutingRecord]]:
        """`encode` from the stem's patch tokens [B, P, D] on."""
        L = min(input_ids.shape[1], self.cfg.max_text_len)
        input_ids, attention_mask = input_ids[:, :L], attention_mask[:, :L].bool()
        x_v = patches + self.type_vision_D
        x_t = self.text(input_ids) + self.type_text_D
        aux = x_v.new_zeros(())
        records: list[RoutingRecord] = []
        for blk in self.blocks:
            x_v, x_t, a, r = blk(x_v, x_t, attention_mask)
            for t in a:
                aux = aux + t
            records += r
        return self.norm(x_v), self.norm(x_t), aux, records

    def _patch_tokens(self, images: torch.Tensor, same_image: torch.Tensor | None) -> torch.Tensor:
        if same_image is None:
            return self.vision(images)
        first, inverse = group_rows(same_image.to(images.device))
        if first.numel() == images.shape[0]:
            return self.vision(images)
        # index_select, not [inverse]: its backward (index_add) sums a picture's rows in a fixed
        # order; advanced indexing's (index_put with accumulate) did not, and runs drifted
        return torch.index_select(self.vision(images[first]), 0, inverse)

    def forward(self, batch: Any) -> ModelOutput:
        patches, logits, aux, records = self._answer(batch.images, batch)
        if not self.training and self.cfg.flip_views > 1:
            logits = self._flip_average(batch, logits)
        out = ModelOutput(loss=None, task_loss=None, aux_loss=aux, logits=logits, routing=records)
        labels = getattr(batch, "labels", None)
        if labels is not None:
            known = labels >= 0
            out.metrics = {
                "correct": ((logits.argmax(-1) == labels) & known).sum().detach(),
                "count": known.sum().detach(),
            }
            if bool(known.any()):
                out.task_loss = F.cross_entropy(logits, labels, ignore_index=-100)
                out.loss = out.task_loss + aux + self.scene_loss(patches, batch)
        return out

    def _answer(
        self, images: torch.Tensor, batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[RoutingRecord]]:
        """(stem tokens [B, P, D], answer logits [B, A], aux loss, routing) for ``images``
        [B, 3, S, S] and the batch's questions."""
        patches = self._patch_tokens(images, getattr(batch, "first_row", None))
        x_v, x_t, aux, records = self.encode_patches(patches, batch.input_ids, batch.attention_mask)
        logits = self.head(x_t[:, 0], x_v.mean(dim=1), self._text_mean(x_t, batch.attention_mask))
        return patches, logits, aux, records

    def _flip_average(self, batch: Any, logits: torch.Tensor) -> torch.Tensor:
        """The mean log-probabilities [B, A] over `cfg.flip_views` views of each picture: the
        picture (``logits``, already computed), upside down, mirrored, both. Flips keep
        easy-VQA's answers true and the model was trained on upside-down pictures, so the views
        disagree only where a picture is hard to read; averaging them is a small ensemble
        (README, Robustness, item 14). The routing reported stays the picture's own."""
        flips = ((-2,), (-1,), (-2, -1))[: self.cfg.flip_views - 1]  # each view flipped when read
        logp = [F.log_softmax(logits.float(), dim=-1)]
        logp += [F.log_softmax(self._answer(batch.images.flip(d), batch)[1].float(), dim=-1)
                 for d in flips]  # fmt: skip
        return torch.stack(logp).mean(dim=0).to(logits.dtype)

    def _text_mean(self, x_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor | None:
        """`text_mean` for a head that reads it (`model.head_text`); None otherwise."""
        return text_mean(x_BLD, mask_BL) if self.head.text_mean else None

    def scene_loss(self, patches: torch.Tensor, batch: Any) -> torch.Tensor:
        """`cfg.scene_loss` × the scene head's loss on the batch's rows (`batch.scenes`, long
        [B, G]) plus that on its extra pictures (`extra_images` [E, 3, S, S], `extra_scenes`
        [E, G]), which only the stem and the head see; 0 without a head or without labels."""
        scenes = getattr(batch, "scenes", None)
        if self.scene_head is None or scenes is None:
            return patches.new_zeros(())
        loss = self.scene_head.loss(patches, scenes)
        extra = getattr(batch, "extra_images", None)
        if extra is not None and extra.shape[0]:
            loss = loss + self.scene_head.loss(self.vision(extra), batch.extra_scenes)
        return self.cfg.scene_loss * loss

    def param_counts(self) -> tuple[int, int]:
        """(total parameters, parameters active per token-forward).

        Active counts each MoE FFN as its `param_counts()` active share (router + shared +
        top-k experts); everything else is active. MoE FFNs report their own whole-layer
        counts, so under expert parallelism (each rank holds a slice of the experts) this still
        counts the full model. The scene head (training only: answers never run it) counts in
        the total, not in the active share.
        """
        total, active = model_param_counts(self)
        if self.scene_head is not None:
            active -= sum(p.numel() for p in self.scene_head.parameters())
        return total, active


def text_mean(x_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """The mean of each row's real text tokens, [B, L, D] → [B, D] ([CLS] included, padding
    not; `mask_BL` may be longer than L, as the model truncates questions to max_text_len)."""
    w = mask_BL[:, : x_BLD.shape[1]].to(x_BLD.dtype)
    return (x_BLD * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


def build_model(cfg: ModelConfig) -> VLMoE:
    """Build a VLMoE from a complete ModelConfig (vocab_size and num_answers set)."""
    return VLMoE(cfg)
