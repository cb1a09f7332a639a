"""The `vlmoe` command: a thin layer over `main(argv)`, which tests call directly.

Every subcommand maps to one function; user mistakes (bad data, checkpoint, config, device)
print one line `vlmoe: error: ...` on stderr and return a non-zero code, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

if typing.TYPE_CHECKING:
    from vlmoe.config import RunConfig
    from vlmoe.train import TrainResult

from vlmoe.checkpoint import CheckpointError
from vlmoe.config import ConfigError
from vlmoe.data import DataError
from vlmoe.families import all_presets
from vlmoe.train.parallel import DistributedError
from vlmoe.train.step import NonFiniteError
from vlmoe.validate import (
    UsageError,
    check_checkpoint_out,
    check_data_spec,
    check_input_file,
    check_namespace,
    float_arg,
    int_arg,
    json_line,
)

USER_ERRORS: tuple[type[Exception], ...] = (
    NonFiniteError,
    DataError,
    CheckpointError,
    ConfigError,
    DistributedError,
)
#: subcommands that live in their own modules: each has add_arguments(parser) and run(args) -> int
EXTRA_COMMANDS = {
    "inspect": "vlmoe.inspect",
    "compare": "vlmoe.compare",
    "serve": "vlmoe.serve.command",
    "export-hf": "vlmoe.export_hf",
}


#: the most torch threads a command accepts (more only adds contention)
MAX_THREADS = 1024


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UsageError (one `vlmoe: error:` line, exit 1)
    instead of printing usage and exiting 2. Subparsers inherit the class."""

    def error(self, message: str) -> typing.NoReturn:
        where = self.prog.removeprefix("vlmoe").strip()
        raise UsageError(f"{where + ': ' if where else ''}{message} (see {self.prog} --help)")


def parse_device(name: str) -> str:
    """A --device value → a torch device string; unavailable devices raise UsageError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if not re.fullmatch(r"cuda(:[0-9]{1,4})?", name):
        raise UsageError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}")
    if not torch.cuda.is_available():
        raise UsageError(
            f"--device {name}: CUDA is not available on this machine (use --device cpu)"
        )
    index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"--device {name}: this machine has {count} CUDA device(s)")
    return name


def _fresh_out(base: str, resume: bool) -> str:
    """The default checkpoint folder: `base`, or `base-2`, `base-3`, … so that a second
    `vlmoe train` never overwrites the first run's checkpoint."""
    if resume or not Path(base).exists():
        return base
    n = 2
    while Path(f"{base}-{n}").exists():
        n += 1
    return f"{base}-{n}"


def _train_config(args: argparse.Namespace) -> RunConfig:
    """The preset with the command line's overrides, validated (ConfigError / DataError)."""
    from vlmoe.families import family_of_preset

    cfg = family_of_preset(args.preset).hooks().PRESETS[args.preset]()
    if args.data is not None:
        cfg.data = args.data
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    if args.lr is not None:
        cfg.train.lr = args.lr
    if args.save_every is not None:
        cfg.train.save_every = args.save_every
    if args.save_minutes is not None:
        cfg.train.save_minutes = args.save_minutes
    if args.tensorboard:
        cfg.train.tensorboard = True
    _augment_switch(cfg, args)
    cfg.train.__post_init__()  # re-validate overridden fields
    check_data_spec(cfg.data)
    if args.stage is not None or args.init_from is not None:
        _select_stage(cfg, args)
    return cfg


def _augment_switch(cfg: RunConfig, args: argparse.Namespace) -> None:
    """--no-augment, and no preset augmentation on a user's --data: the presets' is made for
    easy-VQA's pictures (one shape on a light background, answers that survive an upside-down
    flip), where it keeps every answer true; on other pictures it could change one. The scene
    head (`model.scene_loss`) learns easy-VQA's colours and shapes, which other data do not
    name: off for --data too; its extra pictures are augmented ones: off with --no-augment.
    Answers averaged over flipped views (`model.flip_views`) need pictures whose answers
    survive a flip and a model trained on upside-down ones: off for both."""
    from vlmoe.data.augment import AugmentConfig

    scene = getattr(cfg.model, "scene_loss", 0.0) > 0
    if args.no_augment or cfg.data != "easy-vqa":
        cfg.train.scene_extra = 0
        if getattr(cfg.model, "flip_views", 1) > 1:
            cfg.model = dataclasses.replace(cfg.model, flip_views=1)
    if scene and cfg.data != "easy-vqa":
        cfg.model = dataclasses.replace(cfg.model, scene_loss=0.0)
    if not cfg.train.augment.enabled and not scene:
        return
    if args.no_augment:
        cfg.train.augment = AugmentConfig()
    elif cfg.data != "easy-vqa":
        cfg.train.augment = AugmentConfig()
        print(
            f"vlmoe train: the {args.preset} preset's augmentation, scene head and flipped"
            " views are off for --data (they are made for easy-VQA's pictures: one shape on a"
            " light background)",
            file=sys.stderr,
        )


def _select_stage(cfg: RunConfig, args: argparse.Namespace) -> None:
    """--stage N: keep stage N alone, written where a full run writes it (OUT-NAME, the last
    stage OUT; OUT = --out or checkpoints/PRESET) and started from stage N-1's folder, or
    from --from DIR. --from alone: the first stage starts from DIR's weights."""
    import dataclasses

    stages, base = cfg.stages(), args.out or f"checkpoints/{cfg.preset}"
    n = args.stage or 1
    if n > len(stages):
        raise UsageError(f"--stage: preset {cfg.preset} has {len(stages)} stage(s), got {n}")
    init = args.init_from or (f"{base}-{stages[n - 2].name}" if n > 1 else "")
    if init and not Path(init).is_dir():
        how = (
            "give --from DIR" if args.init_from else f"run --stage {n - 1} first or give --from DIR"
        )
        raise UsageError(f"--from: {init}: checkpoint folder not found ({how})")
    chosen = [
        dataclasses.replace(s, init_from=init) if i == n - 1 else s for i, s in enumerate(stages)
    ]
    if args.stage is not None:
        chosen = [chosen[n - 1]]
        if args.out is None or n < len(stages):
            args.out = base if n == len(stages) else f"{base}-{stages[n - 1].name}"
    cfg.train.stages = tuple(chosen)


def _report_training(res: TrainResult, as_json: bool) -> int:
    """Print what `vlmoe train` produced: one JSON object, or lines for a person."""
    summary = {
        "checkpoint": str(res.out_dir),
        "step": res.step,
        "total_steps": res.total_steps,
        "seconds": round(res.seconds, 1),
    }
    if res.stopped_by:
        summary["stopped_by"] = res.stopped_by
    if res.val is not None:
        summary["val_accuracy"] = res.val.accuracy
    if res.test is not None:
        summary["test_accuracy"] = res.test.accuracy
        summary["test_per_kind"] = {k: v["accuracy"] for k, v in res.test.per_kind.items()}
    if as_json:
        print(json_line(summary))
        return 0
    print(f"checkpoint: {res.out_dir}  (step {res.step}/{res.total_steps}, {res.seconds:.0f} s)")
    if res.val is not None:
        print(f"validation accuracy: {res.val.accuracy:.4f}")
    if res.test is not None:
        kinds = ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in res.test.per_kind.items())
        print(f"test accuracy: {res.test.accuracy:.4f} on {res.test.n} examples ({kinds})")
    elif res.step < res.total_steps:
        why = f"stopped by {res.stopped_by}" if res.stopped_by else "stopped early"
        print(f"{why}; checkpoint saved; continue with: vlmoe train --out {res.out_dir} --resume")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train any family's preset (default: VL-MoE's `default` on easy-VQA); report test figures."""
    from vlmoe.train import train

    cfg = _train_config(args)
    out = args.out or _fresh_out(f"checkpoints/{cfg.preset}", args.resume)
    # every argument and path is checked above: from here on the run may write
    check_checkpoint_out(out, resume=args.resume, overwrite=args.overwrite)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from vlmoe.train.parallel import Engine, describe_failure

    # under torchrun (WORLD_SIZE > 1): join the process group; rank 0 logs, prints and saves
    engine = Engine.from_env(parse_device(args.device), args.dist_timeout)
    try:
        res = train(cfg, out, device=engine.device, resume=args.resume,
                    stop_after=args.stop_after, progress=not args.no_progress, engine=engine)  # fmt: skip
    except Exception as e:
        if engine.world_size > 1 and (msg := describe_failure(e)) is not None:
            # A peer died or hangs: tearing the process group down (or any exit handler) may
            # block on that peer, so report in one line and leave at once — a bounded exit,
            # never a hang.
            print(f"vlmoe: error: {msg}", file=sys.stderr, flush=True)
            os._exit(1)
        engine.shutdown()
        raise
    engine.shutdown()
    rc = _report_training(res, args.json) if engine.is_main else 0
    if res.stopped_by:  # the shell's convention for a run ended by a signal
        return 130 if res.stopped_by == "SIGINT" else 143
    return rc


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a split: what each model family measures (VQA accuracy per
    question kind; zero-shot and retrieval for contrastive; exact match for generative)."""
    from vlmoe.families import family_of_checkpoint

    family, _ = family_of_checkpoint(args.checkpoint)
    return family.hooks().eval_command(args)


def cmd_ask(args: argparse.Namespace) -> int:
    """Ask a trained checkpoint about an image (or rank --choices, or chat without an image)."""
    from vlmoe.families import family_of_checkpoint

    if args.image is not None:
        check_input_file(args.image, "--image", "image file")  # before the slower checkpoint
    family, _ = family_of_checkpoint(args.checkpoint)
    return family.hooks().ask_command(args)


def add_checkpoint_data_arguments(p: argparse.ArgumentParser, split_help: str) -> None:
    """--checkpoint, --data and --split, shared by the commands that read a checkpoint."""
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by vlmoe train")
    p.add_argument(
        "--data", default=None, help="'easy-vqa' or a JSONL file (default: the training data)"
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help=split_help)


def _add_train_arguments(t: argparse.ArgumentParser) -> None:
    """`vlmoe train`'s options; numbers are range- and NaN-checked as they are parsed."""
    t.add_argument(
        "--preset", default="default",
        help=f"named config: {', '.join(all_presets())} (default: default)",
    )  # fmt: skip
    t.add_argument("--data", default=None, help="'easy-vqa' (default) or a JSONL file")
    t.add_argument("--out", default=None, help="checkpoint folder (default: checkpoints/PRESET)")
    t.add_argument("--epochs", type=float_arg(0, lo_open=True), help="override the preset's epochs")
    t.add_argument("--seed", type=int_arg(0, 2**63 - 1), help="override the preset's seed")
    t.add_argument("--batch-size", type=int_arg(1), help="override the preset's batch size")
    t.add_argument(
        "--lr", type=float_arg(0, lo_open=True), help="override the preset's peak learning rate"
    )
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--no-augment", action="store_true",
                   help="train without the preset's image augmentation")  # fmt: skip
    t.add_argument(
        "--overwrite", action="store_true", help="replace an existing checkpoint in --out"
    )
    t.add_argument(
        "--stop-after",
        type=int_arg(1),
        default=None,
        metavar="STEPS",
        help="stop and save after this many steps (resume later with --resume)",
    )
    t.add_argument(
        "--threads",
        type=int_arg(1, MAX_THREADS),
        default=None,
        help="torch intra-op threads (default: torch's choice; 1 is faster on a busy machine)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--dist-timeout",
        type=float_arg(0, lo_open=True),
        default=None,
        metavar="SECONDS",
        help="under torchrun: timeout of every collective, after which a run with a dead or "
        "stuck process fails (default: $VLMOE_DIST_TIMEOUT or 120)",
    )
    t.add_argument("--save-every", type=int_arg(0), default=None, metavar="STEPS",
                   help="also checkpoint every STEPS steps (default: each epoch's end)")  # fmt: skip
    t.add_argument("--save-minutes", type=float_arg(0), default=None, metavar="MIN",
                   help="also checkpoint every MIN minutes of training (default 10; 0 = off)")  # fmt: skip
    t.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to OUT-tensorboard")  # fmt: skip
    t.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    t.add_argument("--stage", type=int_arg(1), default=None, metavar="N",
                   help="run stage N of a staged preset alone, from stage N-1's checkpoint")  # fmt: skip
    t.add_argument("--from", dest="init_from", default=None, metavar="DIR",
                   help="start (the first stage) from the weights of checkpoint DIR")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vlmoe", description="Sparse Mixture-of-Experts vision-language models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    _add_train_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    add_checkpoint_data_arguments(e, "easy-VQA split (default: test)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("ask", help=cmd_ask.__doc__, description=cmd_ask.__doc__)
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--image", default=None, help="image file (any size or mode)")
    a.add_argument("--choices", nargs="+", default=None, metavar="TEXT",
                   help="contrastive checkpoints: rank these texts against the image")  # fmt: skip
    a.add_argument("--device", default="cpu")
    a.add_argument("--json", action="store_true", help='print {"answer": ..., "top": [...]}')
    a.add_argument("question", nargs="?", default=None)
    a.set_defaults(func=cmd_ask)

    for name, module in EXTRA_COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        sp = sub.add_parser(
            name, help=(mod.run.__doc__ or "").split("\n")[0], description=mod.run.__doc__
        )
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the subcommand, return the exit code.

    Every user mistake (a bad argument, path, data or checkpoint file) prints one line
    `vlmoe: error: ...` on stderr and returns 1, before anything is written; `--help` returns 0.
    """
    # Pillow warns (UserWarning, DecompressionBombWarning) on the way to most decode errors
    # of a broken file; the error line that follows names the file, a warning would be noise.
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            raise UsageError(f"expected a command: {_commands(parser)} (see vlmoe --help)")
        check_namespace(args)
        if getattr(args, "device", None) is not None:
            parse_device(args.device)
        if getattr(args, "data", None) is not None:
            check_data_spec(args.data)
        return int(args.func(args) or 0)
    except (*USER_ERRORS, UsageError) as e:
        return _fail(str(e))
    except OSError as e:  # the machine, not the code: disk full, read-only, permissions
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}")
    except MemoryError:
        return _fail("out of memory (try a smaller --batch-size or model)")
    except KeyboardInterrupt:
        print("vlmoe: interrupted", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"vlmoe: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return 1


def _commands(parser: argparse.ArgumentParser) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return ", ".join(sub.choices)


if __name__ == "__main__":
    sys.exit(main())
