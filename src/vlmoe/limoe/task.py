"""The contrastive (LIMoE) task for `vlmoe.train` and the loading of its checkpoints.

`ContrastiveTask` is what the trainer sees of a LIMoE run: the pairs (easy-VQA captions +
Twemoji names, or a user's JSONL), the word tokenizer, the model of a stage, this process's
training batches and an evaluation that fits the trainer's `EvalResult`:

    val   loss = contrastive loss on the validation pairs (fixed order, batches of the
          training batch size); accuracy = easy-VQA zero-shot on the val images (fraction),
          or, without captions (JSONL data), image→text R@1 on the held-out pairs (fraction)
    test  accuracy = easy-VQA zero-shot on the 1,000 test images; per_kind: zero-shot, its
          colour / shape parts and unseen-emoji retrieval R@1 / R@5 (as fractions)

A checkpoint holds config.json (``"task": "contrastive"``, the run config), the weights and
tokenizer.json: everything `vlmoe eval` / `ask` / `inspect` need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmoe.checkpoint import CheckpointError
from vlmoe.config import StageConfig
from vlmoe.data import DataError, num_batches
from vlmoe.data.pairs import (
    EASYVQA_CAPTIONS,
    PairBatch,
    PairSet,
    build_pair_tokenizer,
    contrastive_splits,
    iterate_pair_batches,
    load_pairs_jsonl,
)
from vlmoe.data.tokenizer import WordTokenizer
from vlmoe.evaluate import EvalResult
from vlmoe.limoe.config import LIMoERunConfig
from vlmoe.limoe.evaluate import contrastive_loss_on, retrieval, zero_shot
from vlmoe.models.limoe import LIMoE
from vlmoe.train.task import load_matching
from vlmoe.validate import EASYVQA_NAMES, check_batch_fits

__all__ = ["ContrastiveTask", "LoadedContrastive", "load_contrastive", "load_pair_sets"]


def load_pair_sets(cfg: LIMoERunConfig) -> dict[str, PairSet]:
    """The sets of a run (see `contrastive_splits` for the names). ``cfg.data`` a JSONL file:
    its pairs, ``train.val_fraction`` of them (a permutation seeded by ``train.seed``) held
    out as "val_retrieval" — also the "test_retrieval" of `vlmoe eval` on the same file."""
    size, t = cfg.model.image_size, cfg.train
    if cfg.data.lower() in EASYVQA_NAMES:
        return contrastive_splits(cfg.pairs, size, t.data_seed, t.val_fraction)
    pairs = load_pairs_jsonl(cfg.data, size)
    n_val = max(1, round(t.val_fraction * len(pairs))) if len(pairs) > 1 else 0
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(t.data_seed))
    val = pairs.subset(order[:n_val].sort().values)
    return {"train": pairs.subset(order[n_val:].sort().values), "val_retrieval": val,
            "test_retrieval": val}  # fmt: skip


class ContrastiveTask:
    """LIMoE (or its dense twin) on image–text pairs: the `vlmoe.train.Task` of the family."""

    kind = "contrastive"

    def __init__(self, cfg: LIMoERunConfig, tokenizer: WordTokenizer | None = None) -> None:
        self.sets = load_pair_sets(cfg)
        train = self.sets["train"]
        # the zero-shot captions' words must be known even if a subset never shows one
        extra = EASYVQA_CAPTIONS if "val_zero_shot" in self.sets else ()
        self.tokenizer = tokenizer or build_pair_tokenizer(train, extra=extra)
        model = dataclasses.replace(cfg.model, vocab_size=self.tokenizer.vocab_size)
        self.cfg = dataclasses.replace(cfg, model=model)

    @classmethod
    def resuming(cls, cfg: LIMoERunConfig, out: Path) -> ContrastiveTask:
        """The task of a run resumed from checkpoint ``out``: its tokenizer."""
        from vlmoe.checkpoint import resolve_checkpoint_dir

        return cls(cfg, WordTokenizer.load(resolve_checkpoint_dir(out) / "tokenizer.json"))

    def build_model(self, stage: StageConfig) -> nn.Module:
        return LIMoE(self.cfg.model)

    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_matching(model, state)

    def batches_per_epoch(self, batch_size: int) -> int:
        train = self.sets["train"]
        check_batch_fits(len(train), batch_size, 1, train.source, unit="pairs")
        return num_batches(len(train), batch_size, drop_last=True)

    def train_batches(
        self, batch_size: int, epoch: int, start: int, rank: int, world_size: int
    ) -> Iterator[PairBatch]:
        # global batches cut into contiguous per-rank blocks: the same pairs at any process
        # count (the contrastive negatives are each rank's own block)
        return iterate_pair_batches(
            self.sets["train"], self.tokenizer, batch_size // world_size, shuffle=True,
            seed=self.cfg.train.seed, epoch=epoch, drop_last=True,
            max_len=self.cfg.model.max_text_len, rank=rank, world_size=world_size,
            start_batch=start,
        )  # fmt: skip

    def evaluate(self, model: nn.Module, split: str, device: str) -> EvalResult | None:
        """val: contrastive loss + zero-shot (or R@1); test: zero-shot + unseen retrieval."""
        if split == "val":
            return self._validate(model)
        if self.cfg.data.lower() not in EASYVQA_NAMES:
            return None  # a JSONL run's held-out pairs are its validation: no test split
        return self.scores(model, self.sets.get("test_zero_shot"), self.sets.get("test_retrieval"))

    def _validate(self, model: nn.Module) -> EvalResult:
        parts = [self.sets[k] for k in ("val_zero_shot", "val_retrieval") if k in self.sets]
        from vlmoe.data.pairs import concat_pairs

        val = concat_pairs(*parts)
        m = self.cfg.model
        loss = contrastive_loss_on(model, self.tokenizer, val, m.max_text_len,
                                   self.cfg.train.batch_size)  # fmt: skip
        res = self.scores(model, self.sets.get("val_zero_shot"), self.sets.get("val_retrieval"))
        return dataclasses.replace(res, loss=loss, n=len(val))

    def scores(self, model: nn.Module, zs: PairSet | None, ret: PairSet | None) -> EvalResult:
        """EvalResult: accuracy = zero-shot (fraction) when ``zs`` is given, else i2t R@1;
        per_kind = every measure as {"accuracy": fraction, "n": count}; loss NaN."""
        L = self.cfg.model.max_text_len
        kinds: dict[str, dict[str, float]] = {}
        if zs is not None:
            z = zero_shot(model, self.tokenizer, zs, L)
            for k, name in (("accuracy", "zero_shot"), ("color_accuracy", "zero_shot_color"),
                            ("shape_accuracy", "zero_shot_shape")):  # fmt: skip
                if k in z:
                    kinds[name] = {"accuracy": z[k] / 100, "n": z["count"]}
        if ret is not None and len(ret) > 1:
            r = retrieval(model, self.tokenizer, ret, L)
            for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
                kinds[f"retrieval_{k}"] = {"accuracy": r[k] / 100, "n": r["count"]}
        main = kinds.get("zero_shot") or kinds.get("retrieval_i2t_r1") or {"accuracy": 0.0, "n": 0}
        return EvalResult(main["accuracy"], float("nan"), int(main["n"]), 0, kinds)

    def meta(self) -> dict[str, Any]:
        return {}

    def write_assets(self, folder: Path) -> None:
        self.tokenizer.save(folder / "tokenizer.json")


@dataclass
class LoadedContrastive:
    """A contrastive checkpoint, loaded: its folder, run config, model (eval mode), tokenizer
    and metric lines."""

    path: Path
    config: LIMoERunConfig
    model: LIMoE
    tokenizer: WordTokenizer
    metrics: list[dict[str, Any]]


def load_contrastive(path: str | Path, device: str = "cpu") -> LoadedContrastive:
    """Load a contrastive checkpoint; a missing or corrupt file raises CheckpointError naming
    it (config.json's run config, tokenizer.json against model.vocab_size, the weights)."""
    from vlmoe.checkpoint import (
        load_checkpoint_meta,
        read_weights,
        resolve_checkpoint_dir,
        saved_run_config,
    )
    from vlmoe.validate import check_finite_state

    d = resolve_checkpoint_dir(path)
    meta, metrics = load_checkpoint_meta(d)
    cfg = saved_run_config(meta, d / "config.json", LIMoERunConfig.from_dict)
    try:
        tok = WordTokenizer.load(d / "tokenizer.json")
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if tok.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"{d / 'tokenizer.json'}: {tok.vocab_size} words, but "
                              f"config.json says model.vocab_size={cfg.model.vocab_size}")  # fmt: skip
    state = read_weights(d)
    try:
        check_finite_state(state, d / "model.safetensors")
        model = LIMoE(cfg.model)
        model.load_state_dict(state)
    except (DataError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{d / 'model.safetensors'}: does not fit config.json ({first})") from None  # fmt: skip
    return LoadedContrastive(d, cfg, model.to(device).eval(), tok, metrics)
