"""Decode speed of SmolLM2-135M: vlmoe's KV-cache `generate` against `transformers` `generate`
on the same weights, dense and upcycled, at batch 1 and 8, in one run.

    OMP_WAIT_POLICY=PASSIVE python bench/generate.py                # ~5 minutes, 1 thread
    python bench/generate.py --threads 2 --repeats 5 --batch 1 8

Models (greedy, a ChatML prompt of ~60 tokens, ``--new`` new tokens forced, no stop token):

  * ``dense``            vlmoe ``CausalLM``      vs ``LlamaForCausalLM``
  * ``moe all``          4 experts top-2 in all 30 layers vs ``MixtralForCausalLM`` (the
                         issue's transformers figure: 15.6 tok/s at batch 1)
  * ``moe every other``  MoE-LLaVA's layout (15 MoE layers) vs ``MixtralForCausalLM`` with the
                         dense layers as 4 identical experts (what `vlmoe export-hf` writes)

Upcycled experts get small noise and the routers random weights, so routing is not trivial.
Columns: median over ``--repeats`` of the whole call as new tokens/s (batch × new / time), the
decode-only rate ((total − prefill) per token step), and vlmoe ÷ transformers.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from vlmoe.lm import generate, load_pretrained, upcycle
from vlmoe.lm.hf import to_hf

PROMPT = (
    "Summarise in one sentence why the sky looks blue during the day and red at sunset, "
    "for a curious ten year old who has just asked about it on a walk."
)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _upcycled(dense, layers: str):
    m = upcycle(copy.deepcopy(dense), layers=layers, noise=0.01, seed=0)
    with torch.no_grad():
        for b in m.layers:
            if hasattr(b.ffn, "router"):
                b.ffn.router.weight.normal_(0, 0.5)
    return m.eval()


@torch.no_grad()
def _rates(model, hf, ids: torch.Tensor, new: int, repeats: int) -> tuple[float, ...]:
    """(vlmoe tok/s, vlmoe decode tok/s, hf tok/s, hf decode tok/s)."""
    B = ids.shape[0]
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    ours = _median_time(lambda: generate(model, ids, max_new_tokens=new), repeats)
    ours_pre = _median_time(lambda: model(ids, last_only=True, routing=False), repeats)
    theirs = _median_time(lambda: hf.generate(ids, **kw), repeats)
    theirs_pre = _median_time(lambda: hf(ids), repeats)
    dec = lambda total, pre: B * (new - 1) / max(total - pre, 1e-9)  # noqa: E731
    return B * new / ours, dec(ours, ours_pre), B * new / theirs, dec(theirs, theirs_pre)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dense, tok = load_pretrained("smollm2")
    models = {"dense": dense, "moe all": _upcycled(dense, "all"),
              "moe every other": _upcycled(dense, "every_other")}  # fmt: skip
    prompt = tok.chat_ids(PROMPT)
    print(f"SmolLM2-135M fp32, prompt {len(prompt)} tokens, {a.new} new, {a.threads} thread(s), "
          f"median of {a.repeats}")  # fmt: skip
    print(f"{'model':<17}{'batch':>6}{'vlmoe tok/s':>13}{'decode':>9}{'HF tok/s':>10}"
          f"{'decode':>9}{'vlmoe/HF':>10}")  # fmt: skip
    for name, m in models.items():
        hf = to_hf(m)
        hf.generation_config.eos_token_id = None  # forced length: no early stop on either side
        for B in a.batch:
            ids = torch.tensor([prompt] * B)
            r = _rates(m, hf, ids, a.new, a.repeats)
            print(f"{name:<17}{B:>6}{r[0]:>13.1f}{r[1]:>9.1f}{r[2]:>10.1f}{r[3]:>9.1f}"
                  f"{r[0] / r[2]:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
