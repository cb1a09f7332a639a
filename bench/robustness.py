"""Robustness table: a checkpoint's easy-VQA test accuracy on re-rendered, shifted images.

    python bench/robustness.py --checkpoint DIR [--baseline DIR2] [--json OUT.json]
                               [--max-images N] [--seed S] [--threads T] [--shifts NAME ...]

One row per shift and severity (see `vlmoe.robustness.default_shifts`): what the checkpoint's
family measures, overall and per kind (VL-MoE: answer accuracy per question kind over the
test questions; LIMoE: zero-shot caption accuracy per image, colour and shape), on the images
drawn again by vlmoe's renderer from the (colour, shape) each easy-VQA test image shows. The first two rows are the unshifted figures:
the original test images, and the renderer at easy-VQA's own settings. With --baseline, a
column gives the other checkpoint's accuracy on the same images. Prints a markdown table; with
--json writes {"checkpoint", "rows", "summary", ["baseline"]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vlmoe.checkpoint import CheckpointError
from vlmoe.data import DataError
from vlmoe.families import family_of_checkpoint
from vlmoe.robustness import Shift, default_shifts, markdown_table, run_shifts, summarize


def _rows(path: str, args: argparse.Namespace) -> list[dict]:
    family, _ = family_of_checkpoint(path)
    make = getattr(family.hooks(), "robustness_evaluator", None)
    if make is None:
        raise CheckpointError(f"{path}: no robustness table for {family.kind} checkpoints yet")
    evaluator, image_size = make(path)
    log = lambda s: print(f"  {Path(path).name}: {s}", file=sys.stderr, flush=True)  # noqa: E731
    return run_shifts(evaluator, image_size, _chosen(args.shifts), max_images=args.max_images,
                      seed=args.seed, log=log)  # fmt: skip


def _chosen(names: list[str] | None) -> list[Shift] | None:
    """The default rows whose shift name is one of ``names`` (all rows when None)."""
    if not names:
        return None
    shifts = default_shifts()
    rows = [sh for sh in shifts if sh.name in names]
    unknown = sorted(set(names) - {sh.name for sh in rows})
    if unknown:
        known = sorted({sh.name for sh in shifts})
        raise DataError(f"--shifts: unknown {unknown}; expected names from {known}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder (vlmoe train --out)")
    ap.add_argument("--baseline", default=None, help="a second checkpoint to show beside it")
    ap.add_argument("--json", default=None, help="write the rows and summary here")
    ap.add_argument("--max-images", type=int, default=0, help="first N test images (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="renderer seed")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shifts", nargs="+", default=None, metavar="NAME",
                    help='only these rows, e.g. "easy-VQA test images" "another program"')  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        rows = _rows(args.checkpoint, args)
        base = _rows(args.baseline, args) if args.baseline else None
    except (CheckpointError, DataError) as e:
        print(f"vlmoe: error: {e}", file=sys.stderr)
        return 1
    print(f"checkpoint: {args.checkpoint}" + (f"  (baseline: {args.baseline})" if base else ""))
    print(f"{rows[0]['n']} examples per row, renderer seed {args.seed}\n")
    print(markdown_table(rows, base))
    if base:
        print("\nbaseline:", markdown_table(base).split("\n\n")[-1].strip())
    print(f"\n{time.time() - t0:.0f} s")
    if args.json:
        out = {"checkpoint": args.checkpoint, "rows": rows, "summary": summarize(rows)}
        if base:
            out["baseline"] = {
                "checkpoint": args.baseline,
                "rows": base,
                "summary": summarize(base),
            }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
