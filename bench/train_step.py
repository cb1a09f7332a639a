"""Train-step throughput: the `default` VL-MoE model against its dense twin (equal active params).

    python bench/train_step.py [--preset default] [--repeats 7] [--batch-size 128] [--threads N]

Both models see the same real easy-VQA batch (images, questions, labels) and run the full
training step: forward, loss (+ aux losses), backward, AdamW step. Runs alternate between the
two models so that machine noise hits both alike; the table reports the median step time over
`--repeats` timed steps (after warm-up), samples/s, and the MoE/dense ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from vlmoe.config import dense, get_preset
from vlmoe.data import WordTokenizer, iterate_batches, load_easyvqa
from vlmoe.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = get_preset(args.preset)
    bs = args.batch_size or base.train.batch_size
    split = load_easyvqa("train", image_size=base.model.image_size)
    tok = WordTokenizer.build(split.questions)
    answers = sorted(set(split.answers))
    batch = next(
        iterate_batches(split, tok, answers, bs, shuffle=True, max_len=base.model.max_text_len)
    )

    variants = {"moe": base, "dense twin": dense(get_preset(args.preset))}
    models, opts = {}, {}
    for name, cfg in variants.items():
        mcfg = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, num_answers=len(answers))
        torch.manual_seed(0)
        models[name] = build_model(mcfg).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)

    def step(name: str) -> float:
        m, o = models[name], opts[name]
        t = time.perf_counter()
        out = m(batch.images, batch.input_ids, batch.attention_mask, batch.labels)
        o.zero_grad(set_to_none=True)
        out.loss.backward()
        o.step()
        return time.perf_counter() - t

    times: dict[str, list[float]] = {n: [] for n in variants}
    for i in range(args.warmup + args.repeats):
        for n in variants:  # alternate so that load changes hit both variants alike
            dt = step(n)
            if i >= args.warmup:
                times[n].append(dt)

    print(
        f"preset={args.preset} batch={bs} threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print(
        f"{'model':<12} {'total params':>13} {'active params':>14} {'step ms':>9} {'samples/s':>10} {'ratio':>7}"
    )
    ref = statistics.median(times["dense twin"])
    for n, ts in times.items():
        med = statistics.median(ts)
        tot, act = models[n].param_counts()
        print(
            f"{n:<12} {tot:>13,} {act:>14,} {med * 1e3:>9.1f} {bs / med:>10.1f} {med / ref:>6.2f}x"
        )


if __name__ == "__main__":
    main()
