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
from typing import Any

import numpy as np
import torch

from vlmoe.checkpoint import CheckpointError
from vlmoe.data import DataError


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

    if args.threads is not None:
        if args.threads < 1:
            raise DataError(f"--threads: expected >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
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
    from vlmoe.analysis import VARIABLES, analyse, collect_routing
    from vlmoe.analysis.plots import plot_load, plot_patches, plot_specialization
    from vlmoe.analysis.report import build_report, build_text_experts, to_html, to_markdown
    from vlmoe.checkpoint import load_checkpoint
    from vlmoe.data import load_data

    if samples < 0:
        raise DataError(f"--samples: expected >= 0, got {samples}")
    if max_questions is not None and max_questions <= 0:
        raise DataError(f"--max-questions: expected > 0, got {max_questions}")
    if batch_size <= 0:
        raise DataError(f"--batch-size: expected > 0, got {batch_size}")
    t0 = time.perf_counter()
    ck = load_checkpoint(checkpoint, device)
    mcfg = ck.config.model
    if not mcfg.uses_moe:
        raise CheckpointError(
            f"{ck.path}: this model has no MoE layers (preset {ck.config.preset!r}); nothing to inspect"
        )
    out_dir = Path(out) if out is not None else ck.path / "inspect"
    spec = data or ck.config.data
    ds = load_data(spec, split, mcfg.image_size, ck.config.train.val_fraction, ck.config.train.seed)
    _prepare_out(out_dir)  # after every input is read: a bad input leaves no empty folder
    if max_questions is not None and max_questions < len(ds):
        ds = ds.subset(range(max_questions))
    t_load = time.perf_counter()

    traces, pred_Q = collect_routing(
        ck.model, ds, ck.tokenizer, ck.answers, batch_size=batch_size, device=device
    )
    if not traces:
        raise CheckpointError(f"{ck.path}: the model routed no tokens through an MoE layer")
    t_fwd = time.perf_counter()
    result = analyse(
        traces, ds, ck.tokenizer, patch_size=mcfg.patch_size, permutations=permutations, seed=seed
    )
    answer_id = {a: i for i, a in enumerate(ck.answers)}
    gold_Q = np.array([answer_id.get(a, -1) for a in ds.answers], dtype=np.int64)
    # answers outside the model's answer set count as wrong (as in `vlmoe eval`)
    accuracy = float(((pred_Q == gold_Q) & (gold_Q >= 0)).mean()) if len(ds) else None
    t_an = time.perf_counter()

    num_experts = {n: t.num_experts for n, t in traces.items()}
    picks = _pick_samples(ds, samples)
    sample_objs = _samples(traces, ds, ck.tokenizer, ck.answers, pred_Q, picks, mcfg.num_patches)
    plot_load(result["ffns"], out_dir / "load.png")
    plot_specialization(result["ffns"], VARIABLES, out_dir / "specialization.png")
    plot_patches(sample_objs, result["position_mode"], num_experts, out_dir / "patches.png")
    t_plot = time.perf_counter()

    result["meta"] = {
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
        "seconds": round(time.perf_counter() - t0, 2),
        "timing": {
            "load": round(t_load - t0, 2),
            "forward": round(t_fwd - t_load, 2),
            "analysis": round(t_an - t_fwd, 2),
            "plots": round(t_plot - t_an, 2),
        },
    }
    result = {"meta": result.pop("meta"), **result}
    doc = build_report(result, VARIABLES)
    (out_dir / "report.md").write_text(to_markdown(doc))
    (out_dir / "report.html").write_text(to_html(doc, out_dir))
    (out_dir / "text_experts.md").write_text(to_markdown(build_text_experts(result)))
    (out_dir / "routing.json").write_text(json.dumps(_finite(result), indent=1) + "\n")
    return result


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
