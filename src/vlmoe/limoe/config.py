"""LIMoE configuration and presets: `LIMoEConfig` (the model), `PairDataConfig` (the data),
`LIMoERunConfig` (model + `TrainConfig` + data) and the preset functions `limoe`,
`limoe_tiny`, `limoe_dense` (collected in `LIMOE_PRESETS`, ready to merge into
`vlmoe.config.PRESETS`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vlmoe.config import ConfigError, RunConfigBase, TrainConfig, reject_vqa_only_training
from vlmoe.moe import MoEConfig

IMAGE_POOLS = ("mean", "cls")
TEXT_POOLS = ("cls", "eos")


@dataclass
class LIMoEConfig:
    """LIMoE (Mustafa et al. 2022): one transformer for image patches and words with one
    modality-agnostic pool of experts, trained with a CLIP contrastive loss.

    Images and texts are encoded as separate sequences (attention never mixes a picture with
    its caption), but in every MoE block the real tokens of both modalities of the batch are
    routed in ONE call to one expert pool, so capacity, batch-priority routing and the balance
    loss act on the joint batch, and the entropy losses are computed per modality (group 0 =
    image tokens, group 1 = text tokens).

    Equal active compute: a dense FFN has hidden ``d_ff``; experts get ``d_ff // moe.top_k``,
    so a token passes through as many FFN weights either way (plus the router's D·E).
    ``towers=2`` with ``moe_layers=()`` is the dense two-tower (CLIP) twin: separate image and
    text transformers of the same shape, the same per-token compute.
    """

    image_size: int = 64  #: images are resized to image_size × image_size RGB
    patch_size: int = 16  #: the conv stem turns each patch_size² patch into one token
    stem_channels: int = 16  #: width of the first conv of the stem
    vocab_size: int = 0  #: word vocabulary size; 0 = take it from the tokenizer at build time
    max_text_len: int = 16  #: texts are truncated to this many tokens ([CLS] included)
    d_model: int = 128  #: token width D
    n_layers: int = 4  #: transformer blocks (per tower)
    n_heads: int = 4  #: attention heads (must divide d_model)
    d_ff: int = 256  #: hidden size of a dense FFN; MoE experts get d_ff // moe.top_k each
    moe_layers: tuple[int, ...] = (1, 3)  #: block indices whose FFN is the shared expert pool
    towers: int = 1  #: 1 = one tower for both modalities (LIMoE); 2 = separate towers (CLIP)
    image_pool: str = "mean"  #: image embedding: "mean" of the patch tokens | learned "cls" token
    text_pool: str = "cls"  #: text embedding: the "cls" token (first) | "eos" (last real token)
    embed_dim: int = 128  #: width of the joint (L2-normalised) embedding space
    init_temperature: float = 0.07  #: initial softmax temperature τ (logit scale = 1/τ), learned
    max_logit_scale: float = 100.0  #: the learned logit scale 1/τ is clamped to at most this
    multi_positive: bool = True  #: pairs whose texts are identical token sequences count as
    #: positives of each other (easy-VQA has 24 captions, so a batch repeats them); False = CLIP
    dropout: float = 0.0  #: dropout on attention and FFN outputs
    #: the expert pool; d_model and d_ff are filled in by the model (see `expert_config`)
    moe: MoEConfig = field(
        default_factory=lambda: MoEConfig(d_model=128, d_ff=256, num_experts=8, top_k=1)
    )

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        self.moe_layers = tuple(int(i) for i in self.moe_layers)
        for name in ("image_size", "patch_size", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: expected a positive integer, got {getattr(self, name)}")  # fmt: skip
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size: expected a multiple of patch_size={self.patch_size}, got {self.image_size}")  # fmt: skip
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.n_heads: expected a divisor of d_model={self.d_model}, got {self.n_heads}")  # fmt: skip
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(f"model.moe_layers: expected indices in [0, {self.n_layers}), got {bad}")  # fmt: skip
        if self.towers not in (1, 2):
            raise ConfigError(f"model.towers: expected 1 or 2, got {self.towers}")
        if self.image_pool not in IMAGE_POOLS:
            raise ConfigError(f"model.image_pool: expected one of {IMAGE_POOLS}, got {self.image_pool!r}")  # fmt: skip
        if self.text_pool not in TEXT_POOLS:
            raise ConfigError(f"model.text_pool: expected one of {TEXT_POOLS}, got {self.text_pool!r}")  # fmt: skip
        t = self.init_temperature
        if not (t > 0 and 1 / t <= self.max_logit_scale):
            raise ConfigError(f"model.init_temperature: expected in [1/max_logit_scale, inf), got {self.init_temperature}")  # fmt: skip

    def expert_config(self) -> MoEConfig:
        """The MoEConfig of each MoE block (d_model and per-expert d_ff filled in)."""
        return dataclasses.replace(
            self.moe, d_model=self.d_model, d_ff=max(1, self.d_ff // self.moe.top_k)
        )


@dataclass
class PairDataConfig:
    """Which built-in image–text pairs to train and evaluate on (``data = "easy-vqa"``)."""

    easyvqa: bool = True  #: easy-VQA captions ("a red circle"), one pair per image
    twemoji: bool = True  #: Twemoji image–name pairs (test emoji unseen in training)
    jsonl: str = ""  #: a JSONL file of {"image", "text"} pairs to train on ("" = none)
    twemoji_test_fraction: float = 0.2  #: share of emoji held out for retrieval tests
    twemoji_val_fraction: float = 0.1  #: share of emoji held out for validation retrieval
    twemoji_repeat: int = 1  #: emoji pairs repeated this many times per epoch (they are few)
    easyvqa_subset: int = 0  #: use only the first N easy-VQA train pairs (0 = all)
    twemoji_subset: int = 0  #: use only the first N emoji per split (0 = all)


@dataclass
class LIMoERunConfig(RunConfigBase):
    """Everything a contrastive run needs: model, training (the shared `TrainConfig`) and
    data. Round-trips through JSON like `vlmoe.config.RunConfig`.

    ``data`` is ``"easy-vqa"`` — the built-in pairs chosen by ``pairs`` (easy-VQA captions,
    Twemoji names) — or a JSONL file of ``{"image", "text"}`` pairs, which then replaces them
    (``train.val_fraction`` of its pairs, seeded, held out for validation retrieval).
    """

    #: the model family that trains this config (`vlmoe.families`; a class constant)
    task_kind: ClassVar[str] = "contrastive"
    model_class: ClassVar[type] = LIMoEConfig
    model: LIMoEConfig = field(default_factory=LIMoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pairs: PairDataConfig = field(default_factory=PairDataConfig)
    data: str = "easy-vqa"  #: "easy-vqa" (the built-in pairs of ``pairs``) or a JSONL file
    preset: str = "limoe"  #: the preset this config came from (informational)

    def __post_init__(self) -> None:
        reject_vqa_only_training(self.train, "contrastive")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LIMoERunConfig:
        """Rebuild from `to_dict()` output; unknown keys or bad values raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected an object, got {type(d).__name__}")
        for key in ("model", "train", "pairs"):
            if not isinstance(d.get(key, {}), dict):
                raise ConfigError(f"{key}: expected an object, got {type(d[key]).__name__}")
        try:
            model = dict(d.get("model", {}))
            if isinstance(model.get("moe"), dict):
                model["moe"] = MoEConfig(**model["moe"])
            return cls(
                model=LIMoEConfig(**model),
                train=TrainConfig(**d.get("train", {})),
                pairs=PairDataConfig(**d.get("pairs", {})),
                data=str(d.get("data", "easy-vqa")),
                preset=str(d.get("preset", "custom")),
            )
        except (TypeError, ValueError) as e:  # unknown keyword, a value MoEConfig refuses
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config: {e}") from None


def _moe(num_experts: int, top_k: int, min_experts: int) -> MoEConfig:
    # LIMoE: per-modality local entropy (confident routing) and global entropy thresholded
    # at log(min_experts) ("use at least S experts"), beside the usual balance loss. Weight
    # 0.1 rather than 0.01: in the 400-step probe (one seed) 0.01 left the text on 2 of 8
    # experts in block 3 and 71.5% zero-shot; 0.1 spread it over 4 and reached 85.2%
    return MoEConfig(
        d_model=128, d_ff=256, num_experts=num_experts, top_k=top_k,
        load_balance_weight=0.01, z_loss_weight=1e-3,
        local_entropy_weight=0.1, global_entropy_weight=0.1,
        global_entropy_threshold=math.log(min_experts),
    )  # fmt: skip


def limoe() -> LIMoERunConfig:
    """The main contrastive job: `vlmoe train --preset limoe` — LIMoE on easy-VQA captions +
    Twemoji names (3,600 + 975 training pairs: emoji once per epoch, 111 held out for
    validation, 278 for the test).

    64×64 images as 16 patch tokens (conv stem), D=128, one 4-block tower shared by images and
    words, the shared pool of 8 experts (hidden 256, top-1) in blocks 1 and 3, entropy losses
    per modality (weights 0.1, global threshold log 3); embeddings 128-d; batch 128, AdamW
    2e-3, 50 warm-up steps, cosine; 25 epochs = 875 steps.
    Measured (seed 0, ``--threads 1``): 12 min 15 s wall (540 s CPU) on the 2-core machine
    shared with other jobs; easy-VQA zero-shot 99.6% on the 1,000 test images (colour 100%,
    shape 99.6%); 278 unseen emoji: image→text R@1 4.0% / R@5 12.9%, text→image 2.9% /
    11.5% (the dense twin `limoe-dense`: 99.5%; 3.6% / 11.2%, 1.4% / 8.6%).
    (The earlier recipe — lr 1e-3, emoji 3× per epoch — reached 85.2% in 400 steps.)
    """
    return LIMoERunConfig(
        model=LIMoEConfig(moe=_moe(8, 1, 3)),
        train=TrainConfig(epochs=25, batch_size=128, lr=2e-3, warmup_steps=50, hflip=False),
        pairs=PairDataConfig(twemoji_repeat=1),
        preset="limoe",
    )


def limoe_tiny() -> LIMoERunConfig:
    """Tests: `limoe-tiny` — seconds on 2 CPU cores. 32×32 images (16 patches), D=32,
    2 blocks, 4 experts top-1 in block 1, 256 easy-VQA and 64 emoji pairs, one epoch. It runs
    the pipeline end to end; it is not meant to be good."""
    moe = dataclasses.replace(_moe(4, 1, 2), d_model=32, d_ff=64)
    return LIMoERunConfig(
        model=LIMoEConfig(
            image_size=32, patch_size=8, stem_channels=8, max_text_len=12, d_model=32,
            n_layers=2, n_heads=2, d_ff=64, moe_layers=(1,), embed_dim=32, moe=moe,
        ),
        train=TrainConfig(
            epochs=1, batch_size=32, lr=3e-3, warmup_steps=2, log_every=2, routing_every=2,
            eval_batch_size=256, hflip=False,
        ),
        pairs=PairDataConfig(easyvqa_subset=256, twemoji_subset=64),
        preset="limoe-tiny",
    )  # fmt: skip


def limoe_dense(base: LIMoERunConfig | None = None) -> LIMoERunConfig:
    """The dense two-tower twin of `limoe` (or of ``base``): separate image and text towers of
    the same shape with dense FFNs of hidden d_ff — the same active compute per token."""
    cfg = base or limoe()
    model = dataclasses.replace(cfg.model, moe_layers=(), towers=2)
    out = dataclasses.replace(cfg, model=model)
    out.preset = f"{cfg.preset}-dense"
    return out


LIMOE_PRESETS: dict[str, Callable[[], LIMoERunConfig]] = {
    "limoe": limoe,
    "limoe-tiny": limoe_tiny,
    "limoe-dense": limoe_dense,
}
