"""Benchmark of one MoE layer against its dense equivalent and transformers' Mixtral block.

    python bench/moe_layer.py            # full table (~10 minutes on 2 CPU cores)
    python bench/moe_layer.py --quick    # smoke run: T=256 configs, 3 repeats, no HF/reference
    python bench/moe_layer.py --threads 1 --clock cpu   # on a shared, oversubscribed machine

Prints one table. For each config (T tokens, D, F, E experts, top-k):
    fwd ms        median forward time, inference (``torch.no_grad``)
    fwd+bwd ms    median forward + backward time (``out.backward(g)`` with a dense random g;
                  router, aux losses and weight gradients included)
    peak MB       peak bytes allocated by the CPU allocator during one forward + backward,
                  above what was allocated before it (parameters and input are outside),
                  read from ``torch.profiler``'s memory events (``profile_memory=True``).
                  Weight gradients are inside the step and count.
    act MB        the same with each weight gradient released the moment it is accumulated
                  (``register_post_accumulate_grad_hook``, as an optimizer-in-backward would):
                  activation + transient memory, comparable between layers whose parameter
                  counts differ by E/k.
    × dense       fwd+bwd time and act memory divided by the dense row's.
Rows: vlmoe dropless (impl "grouped"), vlmoe capacity 1.25 (impl "capacity"), vlmoe reference,
transformers ``MixtralSparseMoeBlock`` with each CPU experts implementation (eager, batched_mm,
grouped_mm; same weights and routing as vlmoe), and the dense SwiGLU FFN with hidden k·F —
the same active FLOPs per token, i.e. the limit a sparse layer can approach.
Timing: fp32, ``torch.get_num_threads()`` threads (``--threads``), 1 warm-up + N timed
repeats, median; ``--clock wall`` (default, ``perf_counter``) or ``--clock cpu``
(``process_time``: CPU seconds of this process, stable when other jobs share the cores; use
it with ``--threads 1``, since idle OpenMP workers spin and would be counted).
Allocator: by default the bench asks glibc (``mallopt``) to keep freed large blocks instead of
returning them to the OS — ``vlmoe.moe.keep_freed_memory()``, the CPU analogue of PyTorch's
CUDA caching allocator. Without it every tensor over 32 MiB is a fresh ``mmap`` whose pages
the kernel faults in and zeroes on first touch (~25 ms per 64 MiB here), a cost that falls
on every row but most on layers with many large temporaries. ``--system-malloc`` measures
the untouched allocator. The setting applies to all rows alike.
batched_mm gathers one [2F, D] weight matrix per token-expert pair; rows where that would
exceed 2 GiB are skipped.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from vlmoe.moe import DenseFFN, MoE, MoEConfig, from_hf_mixtral, keep_freed_memory, mixtral_block

CONFIGS = {
    "coarse": dict(D=512, F=1024, E=8, k=2),
    "fine": dict(D=512, F=256, E=64, k=8),
}


class _Out(nn.Module):
    """Uniform ``x -> y`` wrapper (vlmoe returns an MoEOutput; its aux loss is added)."""

    def __init__(self, m: nn.Module, kind: str) -> None:
        super().__init__()
        self.m, self.kind = m, kind

    def forward(self, x):
        if self.kind == "vlmoe":
            o = self.m(x)
            return o.output, o.aux_loss
        return self.m(x), None


def _step(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    y, aux = model(x)
    if aux is not None and aux.requires_grad:
        torch.autograd.backward([y, aux], [g, torch.ones_like(aux)])
    else:
        y.backward(g)


_clock = time.perf_counter


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up (allocator, thread pool, lazy inits)
    times = []
    for _ in range(repeats):
        t0 = _clock()
        fn()
        times.append(_clock() - t0)
    return 1e3 * statistics.median(times)


def _peak_mb(fn: Callable[[], None]) -> float:
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak / 2**20


def _measure(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    g = torch.randn_like(x)
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step():
        for p in params:
            p.grad = None
        _step(model, x, g)

    def fwd():
        with torch.no_grad():
            model(x)

    def mem_step():  # gradients are cleared before the profiled window, not inside it
        _step(model, x, g)

    res = {"fwd": _median_ms(fwd, repeats), "fwdbwd": _median_ms(train_step, repeats)}
    for p in params:
        p.grad = None
    res["peak"] = _peak_mb(mem_step)
    for p in params:
        p.grad = None
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params
    ]
    try:
        res["act"] = _peak_mb(mem_step)
    finally:
        for h in hooks:
            h.remove()
    return res


def _rows(T: int, D: int, F: int, E: int, k: int, hf: bool):
    """(name, module) for every contender; all share one set of weights."""
    torch.manual_seed(0)
    block = mixtral_block(D, F, E, k, experts_implementation="eager") if hf else None
    if block is not None:
        base = from_hf_mixtral(block)
    else:
        base = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k))
    base.train()

    def variant(**kw):
        m = MoE(MoEConfig(**{**base.config.__dict__, **kw}))
        m.load_state_dict(base.state_dict())
        return m.train()

    yield "vlmoe dropless", _Out(variant(impl="grouped"), "vlmoe")
    yield "vlmoe capacity 1.25", _Out(variant(impl="capacity", capacity_factor=1.25), "vlmoe")
    yield "vlmoe reference", _Out(variant(impl="reference"), "vlmoe")
    if block is not None:
        for impl in ("eager", "batched_mm", "grouped_mm"):
            if impl == "batched_mm" and T * k * 3 * F * D * 4 > 2 * 2**30:
                yield f"hf {impl}", None
                continue
            block.experts.config._experts_implementation = impl
            b = mixtral_block(D, F, E, k, experts_implementation=impl)
            b.load_state_dict(block.state_dict())
            yield f"hf {impl}", _Out(b.train(), "hf")
    dense = DenseFFN(D, k * F)
    yield f"dense SwiGLU (hidden k·F={k * F})", _Out(dense, "dense")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="T=256 only, 3 repeats, no HF/reference rows"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7; quick 3)")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts T")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--system-malloc", action="store_true", help="leave glibc malloc as is")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference rows")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    malloc = "system malloc" if args.system_malloc else "freed blocks kept"
    if not args.system_malloc and not keep_freed_memory():
        malloc = "system malloc (mallopt unavailable)"
    repeats = args.repeats or (3 if args.quick else 7)
    tokens = args.tokens or ([256] if args.quick else [4096, 256])
    hf = not args.no_hf and not args.quick
    if args.quick:
        args.no_reference = True
    if hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            hf = False

    print(
        f"# vlmoe MoE layer benchmark: fp32, CPU, {torch.get_num_threads()} threads, "
        f"median of {repeats}, {args.clock} clock, {malloc}, torch {torch.__version__}"
    )
    hdr = (
        f"| {'config':<36} | {'implementation':<30} | {'fwd ms':>8} | {'fwd+bwd ms':>10} | "
        f"{'× dense':>7} | {'peak MB':>8} | {'act MB':>7} | {'× dense':>7} |"
    )
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for T in tokens:
        for name in args.configs:
            c = CONFIGS[name]
            label = f"{name} T={T} D={c['D']} F={c['F']} E={c['E']} k={c['k']}"
            x = torch.randn(1, T, c["D"])
            rows = list(_rows(T, **c, hf=hf))
            rows = rows[-1:] + rows[:-1]  # the dense baseline first: every ratio needs it
            dense = None
            for row, model in rows:
                if model is None:
                    print(f"| {label:<36} | {row:<30} | {'skipped (weight gather > 2 GiB)':>57} |")
                    continue
                if args.no_reference and "reference" in row:
                    continue
                r = _measure(model, x, repeats)
                dense = dense or r
                print(
                    f"| {label:<36} | {row:<30} | {r['fwd']:>8.1f} | {r['fwdbwd']:>10.1f} | "
                    f"{r['fwdbwd'] / dense['fwdbwd']:>6.2f}× | {r['peak']:>8.0f} | "
                    f"{r['act']:>7.0f} | {r['act'] / dense['act']:>6.2f}× |",
                    flush=True,
                )
            del rows, model
            gc.collect()


if __name__ == "__main__":
    main()
