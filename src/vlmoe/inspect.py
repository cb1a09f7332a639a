"""`vlmoe inspect`: run a checkpoint over a data split, record every MoE FFN's routing, and
write a report — pictures first, numbers behind them.

Files written to --out (default: CHECKPOINT/inspect):

    report.md, report.html   summary: load, specialisation, findings (html: images inline)
    load.png                 expert load per layer and modality
    specialization.png       NMI of the chosen expert with modality, question kind, answer,
                             word, position, patch content — beside random routing
    patches.png              sample images with the top-1 expert of every patch and word
    text_experts.md          most frequent / over-represented words per text expert
    routing.json             every number above, machine-readable

The work is in `vlmoe.analysis`; this module is the command and the glue.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlmoe.checkpoint import CheckpointError
from vlmoe.data import DataError

if TYPE_CHECKING:
    from vlmoe.analysis.stats import FFNTrace
    from vlmoe.checkpoint import Checkpoint
    from vlmoe.data import VQASplit


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vlmoe.cli import MAX_THREADS, add_checkpoint_data_arguments
    from vlmoe.validate import int_arg

    add_checkpoint_data_arguments(
        p, "split to analyse (default: test; a JSONL file's test split is the whole file)"
    )
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/inspect)")
    p.add_argument(
        "--samples",
        type=int_arg(0, 1000),
        default=8,
        help="sample images in patches.png (default: 8)",
    )
    p.add_argument(
        "--max-questions",
        type=int_arg(1),
        default=None,
        metavar="N",
        help="analyse only the first N questions of the split",
    )
    p.add_argument(
        "--batch-size",
        type=int_arg(1, 1 << 20),
        default=256,
        help="questions per forward pass (default: 256)",
    )
    p.add_argument(
        "--permutations",
        type=int_arg(0, 1000),
        default=5,
        help="shuffles for the random-routing baseline of each NMI (default: 5)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument(
        "--threads",
        type=int_arg(1, MAX_THREADS),
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)",
    )
    p.add_argument(
        "--json", action="store_true", help="print a one-line JSON summary instead of text"
    )


def run(args: argparse.Namespace) -> int:
    """Look inside a checkpoint's routing: expert load, specialisation, pictures (report.md/html).

    Runs the model over a data split (default: the easy-VQA test set), records every MoE FFN's
    routing decisions and writes report.md, report.html, load.png, specialization.png,
    patches.png, text_experts.md and routing.json to --out.
    """
    from vlmoe.cli import parse_device
    from vlmoe.families import family_of_checkpoint

    if args.threads is not None:
        if args.threads < 1:
            raise DataError(f"--threads: expected >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    family, _ = family_of_checkpoint(args.checkpoint)
    if family.kind != "vqa":  # another family inspects its own checkpoints
        hooks = family.hooks()
        if not hasattr(hooks, "inspect_command"):
            raise DataError(
                f"--checkpoint {args.checkpoint}: no inspect for {family.kind} checkpoints"
            )
        return hooks.inspect_command(args)
    result = inspect_checkpoint(
        args.checkpoint,
        data=args.data,
        split=args.split,
        out=args.out,
        samples=args.samples,
        max_questions=args.max_questions,
        batch_size=args.batch_size,
        permutations=args.permutations,
        device=parse_device(args.device),
    )
    meta = result["meta"]
    if args.json:
        print(
            json.dumps(
                {
                    "out": meta["out"],
                    "seconds": meta["seconds"],
                    "questions": meta["questions"],
                    "ffns": list(result["ffns"]),
                    "findings": result["findings"],
                }
            )
        )
        return 0
    print(
        f"{meta['data']}: {meta['questions']:,} questions, {len(result['ffns'])} MoE FFNs, "
        f"{meta['seconds']:.1f} s"
    )
    for line in result["findings"]:
        print("  - " + line.replace("**", ""))
    print(f"report: {Path(meta['out']) / 'report.html'} (and report.md, *.png, routing.json)")
    return 0


def inspect_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    out: str | Path | None = None,
    samples: int = 8,
    max_questions: int | None = None,
    batch_size: int = 256,
    permutations: int = 5,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Analyse `checkpoint` on a data split and write the report files; return the
    routing.json content. Bad paths raise CheckpointError / DataError (one line)."""
    from vlmoe.analysis import analyse

    _check_options(samples, max_questions, batch_size)
    t0 = time.perf_counter()
    ck = _load_moe_checkpoint(checkpoint, device)
    out_dir = Path(out) if out is not None else ck.path / "inspect"
    ds = _load_split(ck, data, split, max_questions)
    _prepare_out(out_dir)  # after every input is read: a bad input leaves no empty folder
    t_load = time.perf_counter()
    traces, pred_Q = _route(ck, ds, batch_size, device)
    t_fwd = time.perf_counter()
    patch_size = ck.config.model.patch_size
    result = analyse(
        traces, ds, ck.tokenizer, patch_size=patch_size, permutations=permutations, seed=seed
    )
    accuracy = _accuracy(pred_Q, ds, ck.answers)
    t_an = time.perf_counter()
    picks = _pick_samples(ds, samples)
    _write_plots(result, traces, ds, ck, pred_Q, picks, out_dir)
    t_plot = time.perf_counter()
    meta = _meta(ck, ds, split, traces, accuracy, picks, permutations, out_dir)
    meta.update(_timing(t0, t_load, t_fwd, t_an, t_plot))
    result = {"meta": meta, **result}
    _write_reports(result, out_dir)
    return result


def _check_options(samples: int, max_questions: int | None, batch_size: int) -> None:
    """Reject option values that cannot work (DataError naming the option) before any loading."""
    if samples < 0:
        raise DataError(f"--samples: expected >= 0, got {samples}")
    if max_questions is not None and max_questions <= 0:
        raise DataError(f"--max-questions: expected > 0, got {max_questions}")
    if batch_size <= 0:
        raise DataError(f"--batch-size: expected > 0, got {batch_size}")


def _load_moe_checkpoint(checkpoint: str | Path, device: str) -> Checkpoint:
    """The checkpoint on `device`; CheckpointError when it is unreadable or has no MoE layer."""
    from vlmoe.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint, device)
    if not ck.config.model.uses_moe:
        raise CheckpointError(
            f"{ck.path}: this model has no MoE layers (preset {ck.config.preset!r}); nothing to inspect"
        )
    return ck


def _load_split(
    ck: Checkpoint, data: str | None, split: str, max_questions: int | None
) -> VQASplit:
    """The split to analyse: `data` (default: the checkpoint's training data) at the model's
    image size, carved with the run's val_fraction and seed, cut to its first `max_questions`."""
    from vlmoe.data import load_data

    spec = data or ck.config.data
    train = ck.config.train
    ds = load_data(spec, split, ck.config.model.image_size, train.val_fraction, train.data_seed)
    if max_questions is not None and max_questions < len(ds):
        ds = ds.subset(range(max_questions))
    return ds


def _route(
    ck: Checkpoint, ds: VQASplit, batch_size: int, device: str
) -> tuple[dict[str, FFNTrace], np.ndarray]:
    """Run the model over every question of `ds`: ({FFN name: routing trace}, predicted answer
    index int64 [Q]); CheckpointError when no token went through an MoE layer."""
    from vlmoe.analysis import collect_routing

    traces, pred_Q = collect_routing(
        ck.model, ds, ck.tokenizer, ck.answers, batch_size=batch_size, device=device
    )
    if not traces:
        raise CheckpointError(f"{ck.path}: the model routed no tokens through an MoE layer")
    return traces, pred_Q


def _accuracy(pred_Q: np.ndarray, ds: VQASplit, answers: list[str]) -> float | None:
    """Share of questions whose predicted answer index (int [Q]) is the gold answer; None for an
    empty split. Gold answers outside the model's answer set count as wrong (as in `vlmoe eval`)."""
    answer_id = {a: i for i, a in enumerate(answers)}
    gold_Q = np.array([answer_id.get(a, -1) for a in ds.answers], dtype=np.int64)
    return float(((pred_Q == gold_Q) & (gold_Q >= 0)).mean()) if len(ds) else None


def _write_plots(
    result: dict[str, Any],
    traces: dict[str, FFNTrace],
    ds: VQASplit,
    ck: Checkpoint,
    pred_Q: np.ndarray,
    picks: list[int],
    out_dir: Path,
) -> None:
    """load.png, specialization.png and patches.png (the questions `picks`) into `out_dir`."""
    from vlmoe.analysis import VARIABLES
    from vlmoe.analysis.plots import plot_load, plot_patches, plot_specialization

    num_experts = {n: t.num_experts for n, t in traces.items()}
    num_patches = ck.config.model.num_patches
    sample_objs = _samples(traces, ds, ck.tokenizer, ck.answers, pred_Q, picks, num_patches)
    plot_load(result["ffns"], out_dir / "load.png")
    plot_specialization(result["ffns"], VARIABLES, out_dir / "specialization.png")
    plot_patches(sample_objs, result["position_mode"], num_experts, out_dir / "patches.png")


def _meta(
    ck: Checkpoint,
    ds: VQASplit,
    split: str,
    traces: dict[str, FFNTrace],
    accuracy: float | None,
    picks: list[int],
    permutations: int,
    out_dir: Path,
) -> dict[str, Any]:
    """routing.json's "meta": what was analysed, with which model and settings, and where the
    files are (the caller appends "seconds" and "timing", see `_timing`)."""
    mcfg = ck.config.model
    return {
        "checkpoint": str(ck.path),
        "preset": ck.config.preset,
        "data": ds.source,
        "split": split,
        "questions": len(ds),
        "tokens_routed": int(sum(t.tokens for t in traces.values())),
        "accuracy": accuracy,
        "samples": [int(q) for q in picks],
        "model": {
            "image_size": mcfg.image_size,
            "patch_size": mcfg.patch_size,
            "d_model": mcfg.d_model,
            "n_layers": mcfg.n_layers,
            "moe_layers": list(mcfg.moe_layers),
            "num_experts": mcfg.moe.num_experts,
            "top_k": mcfg.moe.top_k,
            "router": mcfg.moe.router,
        },
        "permutations": permutations,
        "out": str(out_dir),
    }


def _timing(t0: float, t_load: float, t_fwd: float, t_an: float, t_plot: float) -> dict[str, Any]:
    """routing.json's "seconds" (from `t0` until now) and "timing" (per phase), in seconds
    rounded to 0.01, from `time.perf_counter()` stamps taken at the end of each phase."""
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "timing": {
            "load": round(t_load - t0, 2),
            "forward": round(t_fwd - t_load, 2),
            "analysis": round(t_an - t_fwd, 2),
            "plots": round(t_plot - t_an, 2),
        },
    }


def _write_reports(result: dict[str, Any], out_dir: Path) -> None:
    """report.md, report.html (the PNGs already in `out_dir` inlined), text_experts.md and
    routing.json (NaN/inf as null) from the routing.json content `result`."""
    from vlmoe.analysis import VARIABLES
    from vlmoe.analysis.report import build_report, build_text_experts, to_html, to_markdown

    doc = build_report(result, VARIABLES)
    (out_dir / "report.md").write_text(to_markdown(doc))
    (out_dir / "report.html").write_text(to_html(doc, out_dir))
    (out_dir / "text_experts.md").write_text(to_markdown(build_text_experts(result)))
    (out_dir / "routing.json").write_text(json.dumps(_finite(result), indent=1) + "\n")


def _prepare_out(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out_dir}: cannot create the folder ({e.strerror})") from None


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _pick_samples(ds: Any, n: int) -> list[int]:
    """n question rows, each on a different image, spread evenly over the split (the first
    question of each picked image)."""
    if n <= 0 or len(ds) == 0:
        return []
    _, first_q = np.unique(ds.image_index.numpy(), return_index=True)
    first_q = np.sort(first_q)
    at = np.unique(np.linspace(0, len(first_q) - 1, min(n, len(first_q))).round().astype(int))
    return [int(q) for q in first_q[at]]


def _samples(traces, ds, tokenizer, answers, pred_Q, picks, num_patches):  # noqa: ANN001, ANN202
    from vlmoe.analysis.plots import Sample

    g = int(round(num_patches**0.5))
    id_to_word = {i: w for w, i in tokenizer.vocab().items()}
    out = []
    for q in picks:
        vision, text = {}, {}
        words = ["[CLS]"] + tokenizer.tokens(ds.questions[q])
        for name, tr in traces.items():
            m = tr.question == q
            pos, e = tr.position[m].astype(np.int64), tr.top1[m].astype(np.int64)
            if tr.modality == "vision":
                grid = np.full(g * g, -1, dtype=np.int64)
                grid[pos] = e
                vision[name] = grid.reshape(g, g)
            else:
                ids = tr.word[m] if tr.word is not None else np.zeros_like(pos)
                order = np.argsort(pos, kind="stable")
                text[name] = [
                    (words[p] if p < len(words) else id_to_word.get(int(i), "?"), int(x))
                    for p, x, i in zip(pos[order], e[order], ids[order], strict=True)
                ]
        p = int(pred_Q[q])
        out.append(
            Sample(
                image=ds.images[ds.image_index[q]].numpy(),
                question=ds.questions[q],
                answer=ds.answers[q],
                predicted=answers[p] if 0 <= p < len(answers) else "?",
                vision=vision,
                text=text,
            )
        )
    return out
