"""Model families: which code trains, evaluates and answers with each kind of checkpoint.

vlmoe has several families of models (VL-MoE answer classification, LIMoE contrastive
image–text, MoE-LLaVA generation). The trainer (`vlmoe.train`) knows none of them: it runs a
`Task`. The CLI knows them only through this registry:

* `vlmoe train --preset NAME` finds the family that owns preset NAME;
* every other command (`eval`, `ask`, `inspect`, resuming) reads the ``"task"`` field of the
  checkpoint's ``config.json`` (written by the trainer from ``Task.kind``; absent = ``"vqa"``,
  the format's first family) and hands the command to that family.

A family is a module with these names (imported only when a command needs it):

``PRESETS: dict[str, Callable[[], Config]]``
    preset name → a fresh run config. A config class has ``task_kind: ClassVar[str]`` (its
    family's kind, so that any config, preset or not, finds its trainer); a config has ``.train`` (`vlmoe.config.TrainConfig`),
    ``.data`` (str), ``.preset`` (str), ``.stages()``, ``.to_dict()``.
``config_from_dict(d: dict) -> Config``
    rebuild a config from ``to_dict()`` output (``ConfigError`` naming a bad field).
``make_task(cfg, resume_from: Path | None, meta: dict | None) -> Task``
    the `vlmoe.train.Task` of a run; when resuming, ``resume_from`` is the checkpoint folder
    and ``meta`` its config.json (the task restores its tokenizer and the like from there).
``eval_command(args) -> int``, ``ask_command(args) -> int``
    `vlmoe eval` / `vlmoe ask` on a checkpoint of this family (``args`` as parsed by the CLI:
    ``args.checkpoint``, ``args.json``, ``args.device``; eval: ``args.data``, ``args.split``;
    ask: ``args.image`` (may be None), ``args.question`` (may be None), ``args.choices``
    (None or a list of texts)). They raise the CLI's user errors for bad input.
``inspect_command(args) -> int`` (optional)
    `vlmoe inspect` on a checkpoint of this family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from vlmoe.config import ConfigError


@dataclass(frozen=True)
class Family:
    """One model family: its checkpoint ``kind`` (config.json "task"), the module holding its
    hooks (see the module docstring) and the names of its presets (listed here so that
    `--help` and a misspelt preset need no import of the family's code)."""

    kind: str
    module: str
    presets: tuple[str, ...]

    def hooks(self) -> ModuleType:
        return importlib.import_module(self.module)


FAMILIES: tuple[Family, ...] = (
    Family("vqa", "vlmoe.vqa_family", ("tiny", "default", "dense")),
    Family("contrastive", "vlmoe.limoe.family", ("limoe", "limoe-tiny", "limoe-dense")),
    Family("llava", "vlmoe.llava.family", ("moe-llava", "moe-llava-tiny")),
)


#: names that ``--checkpoint`` takes for a pretrained language model (as a ``.gguf`` file does)
PRETRAINED_LMS = ("smollm2",)


def is_pretrained_lm(path: str | Path) -> bool:
    """Whether ``--checkpoint path`` names a pretrained language model rather than a vlmoe
    checkpoint: ``smollm2``, a ``.gguf`` file, or a `transformers` folder (a config.json with
    "architectures" and no vlmoe "format")."""
    p = Path(path)
    if not p.is_dir():
        return str(path) in PRETRAINED_LMS or str(path).endswith(".gguf")
    try:
        import json

        meta = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "architectures" in meta and "format" not in meta


def all_presets() -> list[str]:
    """Every preset name of every family, in registry order."""
    return [p for f in FAMILIES for p in f.presets]


def family_of_preset(name: str) -> Family:
    """The family owning preset ``name``; an unknown name raises ConfigError listing all."""
    for f in FAMILIES:
        if name in f.presets:
            return f
    raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(all_presets())}")


def family_of_kind(kind: Any, where: str = "config.json") -> Family:
    """The family of a checkpoint whose config.json says ``"task": kind``."""
    for f in FAMILIES:
        if f.kind == kind:
            return f
    from vlmoe.checkpoint import CheckpointError

    kinds = ", ".join(f.kind for f in FAMILIES)
    raise CheckpointError(f"{where}: task: expected one of {kinds}, got {kind!r}")


def family_of_checkpoint(path: str | Path) -> tuple[Family, dict[str, Any]]:
    """(family, config.json as a dict) of checkpoint folder ``path`` (CheckpointError if it
    is missing, unreadable or of an unknown kind)."""
    from vlmoe.checkpoint import load_checkpoint_meta, resolve_checkpoint_dir

    if is_pretrained_lm(path):
        return family_of_kind("llava"), {}  # a pretrained language model, text only
    meta, _ = load_checkpoint_meta(path)
    where = str(resolve_checkpoint_dir(path) / "config.json")
    return family_of_kind(meta.get("task", "vqa"), where), meta


__all__ = ["FAMILIES", "Family", "all_presets", "family_of_checkpoint", "family_of_kind",
           "family_of_preset"]  # fmt: skip
