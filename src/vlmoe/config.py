"""Configuration: one dataclass per component, nested, and named presets.

A run is described by `RunConfig(model=ModelConfig(...), train=TrainConfig(...))`. Presets are
plain functions returning a `RunConfig`; each docstring states the command, the expected time on
a 2-core CPU and the expected result. Configs round-trip through JSON (`to_dict` / `from_dict`),
which is how `config.json` in a checkpoint is written and read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vlmoe.data.augment import AugmentConfig
from vlmoe.moe import MoEConfig
from vlmoe.validate import check_fields, check_range


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
    #: how the stem normalises each conv's output: "layer" (one group: all channels of an
    #: image together; checkpoints from before this field) or "channel" (each channel of each
    #: image on its own, which learns shapes in a fifth of the steps; see ConvStem)
    stem_norm: str = "layer"
    #: width of an extra stride-1 3×3 conv at full resolution in front of the stem (0: none,
    #: as in checkpoints from before this field); it is what small shapes need (ConvStem)
    stem_full_res: int = 0
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
    #: what the answer head reads of the question: "cls" (the [CLS] token; checkpoints from
    #: before this field) or "cls+mean" (also the mean text token, which names the question's
    #: colour or shape before attention has learnt to bring it to [CLS]; AnswerHead)
    head_text: str = "cls"
    #: weight of an auxiliary loss in training: a small head classifies what each picture
    #: shows (easy-VQA: its colour and its shape) from the stem's max-pooled patch tokens, so
    #: the stem learns to tell small shapes apart, which the answers alone do not teach it
    #: (README, Robustness, item 8). 0: no head (checkpoints from before this field)
    scene_loss: float = 0.0
    #: the scene head's label groups, classes in each (easy-VQA: 8 colours, 3 shapes); filled
    #: in from the data when `scene_loss` > 0
    scene_classes: tuple[int, ...] = ()
    #: answers (eval mode: validation, test, `vlmoe ask` / `eval` / `serve`) average the
    #: log-probabilities over this many flipped views of each picture: 1 = the picture as
    #: given (checkpoints from before this field); 2 = also upside down; 4 = also mirrored,
    #: and both. Only for pictures whose answers survive a flip (easy-VQA's: one shape, no
    #: left or right); costs that many forward passes per answer; never used in training
    flip_views: int = 1
    #: the MoE layer settings; d_model and d_ff here are filled in by the model
    moe: MoEConfig = field(
        default_factory=lambda: MoEConfig(d_model=128, d_ff=128, num_experts=8, top_k=2)
    )

    @property
    def head_text_mean(self) -> bool:
        """Whether the answer head reads the mean text token (`head_text` "cls+mean")."""
        return self.head_text == "cls+mean"

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            try:
                self.moe = MoEConfig(**self.moe)
            except (TypeError, ValueError) as e:  # unknown key or a value MoEConfig refuses
                raise ConfigError(f"model.moe: {e}") from None
        check_fields(self, "model", ConfigError)
        check_fields(self.moe, "model.moe", ConfigError)
        self.moe_layers = tuple(self.moe_layers)
        self.scene_classes = tuple(self.scene_classes)
        if any(c < 2 or c > 65536 for c in self.scene_classes) or len(self.scene_classes) > 16:
            raise ConfigError(
                "model.scene_classes: expected up to 16 groups of 2..65536 classes,"
                f" got {list(self.scene_classes)}"
            )
        # Caps keep a hand-edited config.json from asking for absurd memory: every image is
        # held in memory at image_size² × 3 bytes, and the stem doubles width per octave.
        for name, lo, hi in _MODEL_RANGES:
            check_range(f"model.{name}", getattr(self, name), lo, hi, ConfigError)
        for name, allowed in _MODEL_CHOICES:
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"model.{name}: expected one of {', '.join(map(str, allowed))},"
                    f" got {getattr(self, name)!r}"
                )
        if self.patch_size & (self.patch_size - 1) or self.patch_size < 2:
            raise ConfigError(
                f"model.patch_size: expected a power of two >= 2, got {self.patch_size}"
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
class StageConfig:
    """One stage of a staged recipe: which parameters train, from which weights, at which lr.

    MoE-LLaVA, for example, is three stages: the projector alone on captions, then the dense
    model, then only FFNs and routers after upcycling. A run with no stages listed is one stage
    named "train" that trains every parameter for ``train.epochs`` at ``train.lr``.
    """

    name: str = "train"  #: names the stage in logs, metrics and its checkpoint folder
    epochs: float = 0.0  #: passes over the training data (0 = train.epochs)
    lr: float = 0.0  #: peak learning rate (0 = train.lr)
    #: fnmatch patterns over parameter names ("head.*", "*.ffn_*"); the others are frozen
    trainable: tuple[str, ...] = ("*",)
    #: a checkpoint folder whose weights (matched by name) initialise the model at stage start
    init_from: str = ""

    def __post_init__(self) -> None:
        self.trainable = tuple(str(t) for t in self.trainable)
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(
                f"train.stages.name: expected letters, digits, - or _, got {self.name!r}"
            )
        for f in ("epochs", "lr"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"train.stages.{f}: expected a finite number >= 0, got {v!r}")
        if not self.trainable:
            raise ConfigError("train.stages.trainable: expected at least one pattern, got none")


@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, batch, logging and checkpointing."""

    epochs: float = 10  #: passes over the training split (fractions allowed: 0.5 = half an epoch)
    batch_size: int = 128  #: global batch size (split over processes when distributed)
    lr: float = 1e-3  #: peak learning rate of AdamW (2e-3 stays longer on the language prior)
    #: lr multipliers by parameter name: {fnmatch pattern: factor}; a parameter takes the
    #: factor of the first pattern its name matches (e.g. {"vision.stem.*": 3.0}), the others 1
    lr_scales: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.05  #: AdamW weight decay (not applied to norms, biases, embeddings)
    warmup_steps: int = 100  #: linear warm-up steps, then cosine decay to min_lr_ratio·lr
    min_lr_ratio: float = 0.05  #: final learning rate as a fraction of lr
    grad_clip: float = 1.0  #: max global gradient norm (0 = off)
    seed: int = 0  #: seeds the model init, data order and the validation split
    #: seeds the validation split and ``train_subset`` instead of ``seed`` (None = ``seed``):
    #: a run that continues another checkpoint with a new ``seed`` keeps that run's held-out
    #: images, so none of them was trained on
    split_seed: int | None = None
    val_fraction: float = 0.1  #: share of training *images* held out for validation
    train_subset: int = 0  #: use only the first N training questions (0 = all)
    eval_subset: int = 0  #: evaluate on at most N questions of val/test (0 = all)
    #: the final test on at most N questions (0 = all; None = as eval_subset)
    test_subset: int | None = None
    log_every: int = 20  #: steps between metric lines in metrics.jsonl
    routing_every: int = 50  #: steps between routing statistics in metrics.jsonl
    save_every: int = 0  #: steps between checkpoints (0 = only at the end of each epoch)
    eval_every: int = 0  #: steps between validation runs (0 = only at the end of each epoch)
    eval_on_start: bool = False  #: also validate the freshly built model, before step 1
    collapse_share: float = 0.5  #: warn when one expert takes more than this share of tokens …
    collapse_patience: int = 3  #: … or an expert stays under 1%, for this many routing checks
    eval_batch_size: int = 512  #: batch size for validation and test
    hflip: bool = True  #: random horizontal flips of training images (answers are flip-invariant)
    #: a training batch takes its questions in runs of up to this many about one picture
    #: (runs in random order; 1 = questions drawn one by one). The conv stem then runs once
    #: per picture, and the picture's rows share its flip and augmentation draws.
    questions_per_image: int = 1
    save_minutes: float = 10.0  #: also checkpoint after this many minutes of training (0 = off)
    tensorboard: bool = False  #: also write TensorBoard event files to OUT-tensorboard
    #: a step with a NaN/inf loss or gradient: "stop" the run with an error, or "skip" it
    nonfinite: str = "stop"
    max_skipped: int = 100  #: with nonfinite="skip": stop after this many skipped steps
    #: the stages of a staged recipe, run in order (empty = one stage of every parameter)
    stages: tuple[StageConfig, ...] = ()
    #: answer-preserving image augmentations (background shade, zoom, rotation, resampling,
    #: blur, noise, JPEG; never hue) — see `vlmoe.data.augment`; all off by default
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: extra pictures per step (global) seen only by the stem and the scene head
    #: (`model.scene_loss`): training pictures with the shape shrunk to 3–9 pixels, a size
    #: easy-VQA rarely draws (`vlmoe.train.task.SCENE_EXTRA_AUGMENT`)
    scene_extra: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):  # from config.json
            try:
                self.augment = AugmentConfig(**self.augment)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"train.augment: {e}") from None
        self.stages = tuple(
            s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages
        )
        check_fields(self, "train", ConfigError)
        _check_lr_scales(self.lr_scales)
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite: expected 'stop' or 'skip', got {self.nonfinite!r}")
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs: expected > 0, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: expected > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction: expected in (0, 1), got {self.val_fraction}")
        if not 0 < self.collapse_share <= 1:
            raise ConfigError(
                f"train.collapse_share: expected in (0, 1], got {self.collapse_share}"
            )
        for name, lo, hi in _TRAIN_RANGES:
            check_range(f"train.{name}", getattr(self, name), lo, hi, ConfigError)
        if self.test_subset is not None:
            check_range("train.test_subset", self.test_subset, 0, None, ConfigError)
        if self.split_seed is not None:
            check_range("train.split_seed", self.split_seed, 0, 2**63 - 1, ConfigError)

    @property
    def data_seed(self) -> int:
        """The seed of the validation split and of ``train_subset``: ``split_seed`` if set,
        else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def subset(self, split: str) -> int:
        """How many questions of ``split`` ("val" or "test") to evaluate on (0 = all)."""
        if split == "test" and self.test_subset is not None:
            return self.test_subset
        return self.eval_subset


#: `ModelConfig.stem_norm` choices (see `vlmoe.models.vision.ConvStem`)
STEM_NORMS = ("layer", "channel")
#: `ModelConfig.flip_views` choices: the picture; + upside down; + mirrored and both
FLIP_VIEWS = (1, 2, 4)
#: `ModelConfig.head_text` choices (see `vlmoe.models.heads.AnswerHead`)
HEAD_TEXTS = ("cls", "cls+mean")


def _check_lr_scales(scales: Any) -> None:
    """ConfigError unless `scales` is {pattern: factor > 0}."""
    if not isinstance(scales, dict):
        raise ConfigError(
            f"train.lr_scales: expected an object {{pattern: factor}}, got {scales!r}"
        )
    for pat, f in scales.items():
        ok = isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f)
        if not (isinstance(pat, str) and pat and ok and f > 0):
            raise ConfigError(
                f"train.lr_scales: expected a pattern and a factor > 0, got {pat!r}: {f!r}"
            )


def stem_convs(patch_size: int, channels: int, full_res: int = 0) -> list[tuple[int, int]]:
    """(out channels, stride) of each 3×3 conv of the conv stem, in order: a stride-1 conv to
    `full_res` channels if `full_res` > 0, then log2(patch_size) − 1 stride-2 convs doubling
    from `channels`. The one schedule that `ConvStem` builds and `flops.stem_flops` counts."""
    n = int(math.log2(patch_size))
    first = [(full_res, 1)] if full_res else []
    return first + [(channels * 2**i, 2) for i in range(n - 1)]


#: (field, min, max) of the integer and float fields of ModelConfig / TrainConfig
#: `ModelConfig` fields that take one of a few values, and those values
_MODEL_CHOICES = (("flip_views", FLIP_VIEWS), ("head_text", HEAD_TEXTS), ("stem_norm", STEM_NORMS))
_MODEL_RANGES = (
    ("image_size", 2, 1024),
    ("patch_size", 2, 1024),
    ("stem_channels", 1, 4096),
    ("stem_full_res", 0, 4096),
    ("vocab_size", 0, None),
    ("max_text_len", 1, 65536),
    ("num_answers", 0, None),
    ("d_model", 1, 65536),
    ("n_layers", 1, 1024),
    ("n_heads", 1, 65536),
    ("d_ff", 1, None),
    ("vl_layers", 0, None),
    ("dropout", 0.0, 0.99),
    ("scene_loss", 0.0, 100.0),
)
_TRAIN_RANGES = (
    ("batch_size", 1, None),
    ("questions_per_image", 1, 1024),
    ("weight_decay", 0.0, None),
    ("warmup_steps", 0, None),
    ("min_lr_ratio", 0.0, 1.0),
    ("grad_clip", 0.0, None),
    ("seed", 0, 2**63 - 1),
    ("train_subset", 0, None),
    ("eval_subset", 0, None),
    ("log_every", 1, None),
    ("routing_every", 1, None),
    ("save_every", 0, None),
    ("eval_every", 0, None),
    ("collapse_patience", 1, None),
    ("eval_batch_size", 1, None),
    ("save_minutes", 0.0, None),
    ("max_skipped", 0, None),
    ("scene_extra", 0, 65536),
)


def reject_vqa_only_training(t: TrainConfig, family: str) -> None:
    """Raise ConfigError when `t` asks for a training option that only the VL-MoE family
    implements (image augmentation, several questions per picture): a family without it
    would otherwise train without it silently."""
    if t.augment.enabled:
        raise ConfigError(
            f"train.augment: the {family} family does not augment images (VL-MoE only):"
            " expected every augmentation 0, got one switched on"
        )
    if t.questions_per_image != 1:
        raise ConfigError(
            f"train.questions_per_image: the {family} family takes examples one by one"
            f" (VL-MoE only): expected 1, got {t.questions_per_image}"
        )
    if t.scene_extra:
        raise ConfigError(
            f"train.scene_extra: the {family} family has no scene head (VL-MoE only):"
            f" expected 0, got {t.scene_extra}"
        )


class RunConfigBase:
    """What every family's run config shares (mixed into a dataclass with the fields
    ``model``, ``train: TrainConfig``, ``data: str``, ``preset: str``): the dict round trip
    checkpoints store and the stage list the trainer runs. A family names its model config
    class in ``model_class`` and its family in ``task_kind``."""

    task_kind: ClassVar[str]  #: the model family that trains this config (`vlmoe.families`)
    model_class: ClassVar[type]  #: the dataclass of the ``model`` field
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def stages(self) -> tuple[StageConfig, ...]:
        """The stages to run, with epochs and lr filled in from ``train``."""
        t = self.train
        stages = t.stages or (StageConfig(),)
        return tuple(
            dataclasses.replace(s, epochs=s.epochs or t.epochs, lr=s.lr or t.lr) for s in stages
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Rebuild from `to_dict()` output; a wrong type or an unknown key raises ConfigError
        naming it."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected an object, got {type(d).__name__}")
        for key in ("model", "train"):
            if not isinstance(d.get(key, {}), dict):
                raise ConfigError(f"{key}: expected an object, got {type(d[key]).__name__}")
        model = dict(d.get("model", {}))
        for name, value in model.items():  # nested configs (model.moe) arrive as objects
            if name in _NESTED and not isinstance(value, dict):
                raise ConfigError(f"model.{name}: expected an object, got {value!r}")
        try:
            return cls(
                model=cls.model_class(**model),  # type: ignore[call-arg]
                train=TrainConfig(**d.get("train", {})),  # stages: dicts → StageConfig
                data=d.get("data", "easy-vqa"),
                preset=d.get("preset", "custom"),
            )
        except TypeError as e:  # unexpected keyword → name it
            raise ConfigError(f"config: {e}") from None


#: model-config fields that hold a nested config (a dict in config.json)
_NESTED = ("moe",)


@dataclass
class RunConfig(RunConfigBase):
    """Everything a VL-MoE training run needs: model, training and the data set name."""

    task_kind: ClassVar[str] = "vqa"
    model_class: ClassVar[type] = ModelConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: str = "easy-vqa"  #: "easy-vqa" or a path to a JSONL file
    preset: str = "default"  #: the preset this config came from (informational)

    def __post_init__(self) -> None:
        check_fields(self, "run", ConfigError)


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

    64×64 images as 16 patch tokens (conv stem with per-channel norm and one full-resolution
    layer, 16×16-pixel patches), D=128, 4 blocks, vision and text MoE (8 experts of hidden 128,
    top-2) in blocks 1 and 3, dense FFNs (hidden 256) elsewhere, an answer head that reads
    [CLS] and the mean text token (item 12 there): 2.41M parameters, 1.21M active. 6 epochs of
    batch 128 (1,626 steps). From epoch 2 — once shapes are learned on
    clean pictures — half of each batch is augmented in ways that keep every answer true (moved,
    rescaled, turned, hard-edged, retouched, JPEG-compressed) and any row may be turned upside
    down (`DEFAULT_AUGMENT`), which is what makes the model hold
    on pictures drawn otherwise (README, Robustness). In training only, a scene head learns
    each picture's colour and shape from the stem's tokens, on the batch's pictures and on 24
    more per step shrunk to 3–9 pixels: what teaches the stem small shapes (item 8 there).
    Answers average the log-probabilities over four views of the picture — as given, upside
    down, mirrored, both (`flip_views`; never in training): a small ensemble that holds the
    robustness table's margins over seeds (item 14 there), at four forwards per answer.
    """
    # the dataclass defaults are this preset but for stem_norm, stem_full_res, head_text,
    # scene_loss and flip_views (whose defaults keep old checkpoints loading as they were
    # trained), epochs,
    # augment and scene_extra; spelled out here so the preset reads whole
    return RunConfig(
        model=ModelConfig(
            patch_size=16,
            stem_channels=16,
            stem_norm="channel",
            stem_full_res=8,
            d_ff=256,
            moe=MoEConfig(d_model=128, d_ff=128, num_experts=8, top_k=2),
            scene_loss=1.0,
            head_text="cls+mean",
            flip_views=4,
        ),
        train=TrainConfig(
            epochs=6, lr=1e-3, augment=dataclasses.replace(DEFAULT_AUGMENT), scene_extra=24
        ),
        preset="default",
    )


#: the default preset's augmentation, chosen by the robustness table (README), from epoch 2:
#: half the rows moved, scaled ×1/4–×4 and turned ±15°, 3 in 10 of those drawn with hard
#: edges, half also retouched (background shade and brightness — never hue —, resampling,
#: blur, JPEG on 6 in 10); upside-down flips on every row (flips only on augmented rows let
#: some seeds tell upside-down triangles only on retouched pictures; README, Robustness,
#: items 5–6). Hard edges and JPEG 0.6 (from 0.3): item 9 there.
DEFAULT_AUGMENT = AugmentConfig(
    background=60, brightness=0.15, zoom=3.0, rotate=15, vflip=0.5, vflip_all=True,
    resample=0.3, blur=1.0, jpeg=0.6, retouch=0.5, prob=0.5, hard=0.3, start_epoch=2,
)  # fmt: skip


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
