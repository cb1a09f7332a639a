"""Configuration: one dataclass per component, nested, and named presets.

A run is described by `RunConfig(model=ModelConfig(...), train=TrainConfig(...))`. Presets are
plain functions returning a `RunConfig`; each docstring states the command, the expected time on
a 2-core CPU and the expected result. Configs round-trip through JSON (`to_dict` / `from_dict`),
which is how `config.json` in a checkpoint is written and read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlmoe.data.augment import AugmentConfig
from vlmoe.moe import MoEConfig


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, expected and got."""


@dataclass
class ModelConfig:
    """The VL-MoE model (a multiway transformer, Shen et al. 2023 on VLMo).

    Every block has one self-attention shared by image-patch and word tokens, then a separate
    FFN per modality (vision FFN, text FFN). In the blocks listed in `moe_layers` those FFNs are
    sparse MoE layers (per the `moe_vision` / `moe_text` switches), elsewhere dense. The top
    `vl_layers` blocks use one shared vision-language FFN instead (VLMo's fusion layers).

    Equal active compute: a dense FFN has hidden size `d_ff`; an MoE FFN has experts of hidden
    size `d_ff // moe.top_k`, so a token passes through the same number of FFN weights either
    way. Switching MoE off therefore gives the dense twin with equal active parameters (up to the
    router's D·E weights).
    """

    image_size: int = 64  #: images are resized to image_size × image_size RGB
    patch_size: int = 16  #: the conv stem turns each patch_size² patch into one token
    stem_channels: int = 16  #: width of the first conv of the stem
    vocab_size: int = 0  #: word vocabulary size; 0 = take it from the tokenizer at build time
    max_text_len: int = 24  #: questions are truncated to this many tokens ([CLS] included)
    num_answers: int = 0  #: size of the answer head; 0 = take it from the training data
    d_model: int = 128  #: token width D
    n_layers: int = 4  #: number of transformer blocks
    n_heads: int = 4  #: attention heads (d_model must be divisible by it)
    d_ff: int = 256  #: hidden size of a dense FFN; MoE experts get d_ff // top_k each
    moe_layers: tuple[int, ...] = (1, 3)  #: block indices whose FFNs are MoE
    moe_vision: bool = True  #: MoE in the vision FFN of the moe_layers
    moe_text: bool = True  #: MoE in the text FFN of the moe_layers
    vl_layers: int = 0  #: top blocks with one shared vision-language FFN (dense)
    dropout: float = 0.0  #: dropout on attention output and FFN output
    #: the MoE layer settings; d_model and d_ff here are filled in by the model
    moe: MoEConfig = field(
        default_factory=lambda: MoEConfig(d_model=128, d_ff=128, num_experts=8, top_k=2)
    )

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        self.moe_layers = tuple(int(i) for i in self.moe_layers)
        for name in ("image_size", "patch_size", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"model.{name}: expected a positive integer, got {getattr(self, name)}"
                )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size: expected a multiple of patch_size={self.patch_size}, got {self.image_size}"
            )
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads: expected a divisor of d_model={self.d_model}, got {self.n_heads}"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(
                f"model.moe_layers: expected indices in [0, {self.n_layers}), got {bad}"
            )
        if not 0 <= self.vl_layers <= self.n_layers:
            raise ConfigError(f"model.vl_layers: expected 0..{self.n_layers}, got {self.vl_layers}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def uses_moe(self) -> bool:
        return bool(self.moe_layers) and (self.moe_vision or self.moe_text)

    def expert_config(self) -> MoEConfig:
        """The MoEConfig each MoE FFN is built with (d_model and per-expert d_ff filled in)."""
        d_ff_expert = max(1, self.d_ff // self.moe.top_k)
        return dataclasses.replace(self.moe, d_model=self.d_model, d_ff=d_ff_expert)


@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, batch, logging and checkpointing."""

    epochs: float = 10  #: passes over the training split (fractions allowed: 0.5 = half an epoch)
    batch_size: int = 128  #: global batch size (split over processes when distributed)
    lr: float = 1e-3  #: peak learning rate of AdamW (2e-3 stays longer on the language prior)
    weight_decay: float = 0.05  #: AdamW weight decay (not applied to norms, biases, embeddings)
    warmup_steps: int = 100  #: linear warm-up steps, then cosine decay to min_lr_ratio·lr
    min_lr_ratio: float = 0.05  #: final learning rate as a fraction of lr
    grad_clip: float = 1.0  #: max global gradient norm (0 = off)
    seed: int = 0  #: seeds the model init, data order and the validation split
    val_fraction: float = 0.1  #: share of training *images* held out for validation
    train_subset: int = 0  #: use only the first N training questions (0 = all)
    eval_subset: int = 0  #: evaluate on at most N questions of val/test (0 = all)
    log_every: int = 20  #: steps between metric lines in metrics.jsonl
    routing_every: int = 50  #: steps between routing statistics in metrics.jsonl
    save_every: int = 0  #: steps between checkpoints (0 = only at the end of each epoch)
    eval_every: int = 0  #: steps between validation runs (0 = only at the end of each epoch)
    collapse_share: float = 0.5  #: warn when one expert takes more than this share of tokens …
    collapse_patience: int = 3  #: … or an expert stays under 1%, for this many routing checks
    eval_batch_size: int = 512  #: batch size for validation and test
    hflip: bool = True  #: random horizontal flips of training images (answers are flip-invariant)
    #: answer-preserving image augmentations (background shade, zoom, rotation, resampling,
    #: blur, noise, JPEG; never hue) — see `vlmoe.data.augment`; all off by default
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):  # from config.json
            try:
                self.augment = AugmentConfig(**self.augment)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"train.augment: {e}") from None
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs: expected > 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise ConfigError(f"train.batch_size: expected > 0, got {self.batch_size}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction: expected in (0, 1), got {self.val_fraction}")


@dataclass
class RunConfig:
    """Everything a training run needs: model, training and the data set name."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: str = "easy-vqa"  #: "easy-vqa" or a path to a JSONL file
    preset: str = "default"  #: the preset this config came from (informational)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild from `to_dict()` output; unknown keys raise ConfigError naming them."""
        try:
            model = dict(d.get("model", {}))
            if "moe" in model and isinstance(model["moe"], dict):
                model["moe"] = MoEConfig(**model["moe"])
            return cls(
                model=ModelConfig(**model),
                train=TrainConfig(**d.get("train", {})),
                data=d.get("data", "easy-vqa"),
                preset=d.get("preset", "custom"),
            )
        except TypeError as e:  # unexpected keyword → name it
            raise ConfigError(f"config: {e}") from None


def tiny() -> RunConfig:
    """Tests and smoke runs: `vlmoe train --preset tiny` — about 10 s on 2 CPU cores.

    32×32 images (16 patches), D=32, 2 blocks, 4 experts top-2 in block 1, 768 training
    questions, one epoch (24 steps). It exists to run the whole pipeline fast, not to be good:
    it answers from the question alone (~33% test accuracy on the first 256 test questions).
    """
    return RunConfig(
        model=ModelConfig(
            image_size=32,
            patch_size=8,
            stem_channels=8,
            max_text_len=16,
            d_model=32,
            n_layers=2,
            n_heads=2,
            d_ff=64,
            moe_layers=(1,),
            moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2),
        ),
        train=TrainConfig(
            epochs=1,
            batch_size=32,
            lr=3e-3,
            warmup_steps=5,
            train_subset=768,
            eval_subset=256,
            log_every=5,
            routing_every=5,
            eval_batch_size=256,
        ),
        preset="tiny",
    )


def default() -> RunConfig:
    """The main job: `vlmoe train` — trains VL-MoE on easy-VQA.

    64×64 images as 16 patch tokens (conv stem, 16×16-pixel patches), D=128, 4 blocks, vision
    and text MoE (8 experts of hidden 128, top-2) in blocks 1 and 3, dense FFNs (hidden 256)
    elsewhere: 2.36M parameters, 1.18M active. 10 epochs of batch 128 (2,710 steps).
    Measured on an idle 2-core CPU: 7 min 49 s wall, 99.94% test accuracy (README, Results).
    """
    # the dataclass defaults are this preset; spelled out here so the preset reads whole
    return RunConfig(
        model=ModelConfig(
            patch_size=16,
            stem_channels=16,
            d_ff=256,
            moe=MoEConfig(d_model=128, d_ff=128, num_experts=8, top_k=2),
        ),
        train=TrainConfig(epochs=10, lr=1e-3),
        preset="default",
    )


def dense(base: RunConfig | None = None) -> RunConfig:
    """The dense twin of `default` (MoE switched off, equal active parameters)."""
    cfg = base or default()
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, moe_vision=False, moe_text=False)
    )
    cfg.preset = "dense"
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "default": default, "dense": dense}


def get_preset(name: str) -> RunConfig:
    """Return a fresh RunConfig for a named preset; unknown names raise ConfigError."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
