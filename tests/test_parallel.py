"""Expert + data parallelism (``vlmoe.moe.parallel``, ``vlmoe.train.parallel``).

Single-process checks run in the test process; the multi-process ones start 2 real gloo
processes (``tests/parallel_worker.py`` or ``python -m vlmoe``) on free local ports, each
under a timeout, and compare with the single-process results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_worker import free_port, run_ranks, worker_env
from parallel_worker import CONFIGS, fixed_batch, tiny_config

from vlmoe.moe import MoE, MoEConfig
from vlmoe.moe.parallel import (
    ExpertParallelMoE,
    ShardedExperts,
    _block_transpose,
    expert_parallel,
)
from vlmoe.train.parallel import Engine, describe_failure

HERE = Path(__file__).parent
WORKER = HERE / "parallel_worker.py"


# ------------------------------------------------------------------ single process


def test_block_transpose_reorders_source_major_blocks_to_expert_major():
    counts_WL = torch.tensor([[2, 0, 1], [1, 3, 0]])
    # received rows: w0: e0 e0 | e2 ; w1: e0 | e1 e1 e1  →  rows 0..6
    perm = _block_transpose(counts_WL)
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 2]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_rank_expert_parallel_equals_moe(name):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**CONFIGS[name]))
    ep = ExpertParallelMoE.from_moe(moe)
    moe.eval(), ep.eval()  # no router noise: both must see the same logits
    x = torch.randn(3, 7, 16, requires_grad=True)
    mask = torch.rand(3, 7) > 0.3
    gid = torch.randint(0, 2, (3, 7))
    a, b = moe(x, token_mask=mask, group_ids=gid), ep(x, token_mask=mask, group_ids=gid)
    torch.testing.assert_close(b.output, a.output, atol=1e-6, rtol=0)
    assert a.aux_losses.keys() == b.aux_losses.keys()
    for k in a.aux_losses:
        torch.testing.assert_close(b.aux_losses[k], a.aux_losses[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.stats.tokens_per_expert, a.stats.tokens_per_expert)
    torch.testing.assert_close(b.stats.router_entropy, a.stats.router_entropy)
    torch.testing.assert_close(b.stats.dropped_fraction, a.stats.dropped_fraction)
    ga = torch.autograd.grad(a.output.square().sum() + a.aux_loss, [x, *moe.parameters()])
    gb = torch.autograd.grad(b.output.square().sum() + b.aux_loss, [x, *ep.parameters()])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-5)


def test_reduced_aux_losses_equal_the_plain_losses_in_one_process():
    from vlmoe.moe import losses as L

    cfg = MoEConfig(**CONFIGS["softmax_all_losses"])
    moe = MoE(cfg).eval()
    x = torch.randn(20, 16)
    d, chosen, noisy = moe.route(x)
    mask, gid = torch.rand(20) > 0.5, torch.tensor([0, 3] * 10)  # ids need not be 0..G-1
    a = moe.aux_losses(d, chosen, noisy, mask, gid)
    b = L.aux_losses(cfg, d.probs, d.logits, chosen, noisy, mask, gid, reduce=lambda v: v)
    assert a.keys() == b.keys() and len(a) == 5
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6)


def test_sharded_experts_load_full_or_local_weights_and_keep_state_dict_keys():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    ep = expert_parallel(moe)
    assert isinstance(ep, ExpertParallelMoE) and isinstance(ep.experts, ShardedExperts)
    assert ep.state_dict().keys() == moe.state_dict().keys()
    assert ep.param_counts() == moe.param_counts()
    assert Engine().full_state_dict(ep).keys() == moe.state_dict().keys()
    # a W-process layer loads single-process weights by keeping its rows (here W = 1: all)
    ep.load_state_dict(moe.state_dict())


def test_single_process_engine_is_a_no_op():
    e = Engine()
    assert e.is_main and e.world_size == 1 and e.local_batch_size(32) == 32
    t = torch.arange(6)
    assert torch.equal(e.rank_slice(t), t)
    with pytest.raises(Exception, match="does not split evenly"):
        Engine(rank=0, world_size=3).local_batch_size(32)


def test_describe_failure_only_claims_distributed_errors():
    assert describe_failure(ValueError("x")) is None
    from vlmoe.train.parallel import DistributedError

    assert describe_failure(DistributedError("boom")) == "distributed: boom"
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    assert describe_failure(gloo).startswith("distributed: rank ")


# ------------------------------------------------------------------ two processes


def test_two_process_expert_parallel_layer_equals_single_process(tmp_path):
    run_ranks([sys.executable, str(WORKER), "layer", str(tmp_path)], timeout=300)
    for rank in range(2):
        report = json.loads((tmp_path / f"layer-{rank}.json").read_text())
        assert report.keys() == set(CONFIGS)
        for name, diffs in report.items():
            assert diffs.pop("a2a_bytes") > 0, name
            bad = {k: v for k, v in diffs.items() if not v <= 1e-5}
            assert not bad, (rank, name, bad)


def _metrics(ck: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (ck / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["kind"] == kind]


def test_two_process_training_equals_one_process(tmp_path):
    """Per-step loss of a 2-process tiny run = the 1-process run with the same global batch;
    its checkpoint (full layout) loads in 1 process with the 2-process model's logits; a
    1-process checkpoint resumes in 2 processes on the same loss curve."""
    from vlmoe.checkpoint import load_checkpoint, load_trainer_state
    from vlmoe.data import load_data
    from vlmoe.evaluate import evaluate
    from vlmoe.train import train

    steps = 4
    one, two = tmp_path / "one", tmp_path / "two"
    two.mkdir()
    train(tiny_config(steps), one / "ck", progress=False)
    # a 1-process run stopped half way, for the 2 processes to resume (1 → 2 processes)
    train(tiny_config(steps), two / "resumed", progress=False, stop_after=steps // 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(WORKER), "train", str(two), str(steps), str(two / "resumed")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLMOE_DIST_TIMEOUT": "30"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]

    a, b = _metrics(one / "ck", "train"), _metrics(two / "ck", "train")
    assert load_checkpoint(two / "ck").model.scene_head is not None  # its path was exercised
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-4, (x, y)
        assert abs(x["aux_loss"] - y["aux_loss"]) <= 1e-4, (x, y)
        # accuracy is an argmax: float summation order (1 vs 2 processes) may flip a near-tie
        # of the barely trained tiny model, so allow one question in a hundred
        assert abs(x["accuracy"] - y["accuracy"]) <= 0.01, (x, y)
    # resumed by 2 processes from a 1-process checkpoint: the same steps as uninterrupted
    resumed = _metrics(two / "resumed", "train")
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    for x, y in zip(a, resumed, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-4, (x, y)
    for kind in ("val", "test"):
        (x,), (y,) = _metrics(one / "ck", kind), _metrics(two / "ck", kind)
        assert abs(x["loss"] - y["loss"]) <= 1e-4, kind
        assert abs(x["accuracy"] - y["accuracy"]) <= 0.01, kind
    ra, rb = _metrics(one / "ck", "routing"), _metrics(two / "ck", "routing")
    assert [m["layers"].keys() for m in ra] == [m["layers"].keys() for m in rb]
    for x, y in zip(ra, rb, strict=True):
        for name in x["layers"]:
            assert x["layers"][name]["share"] == pytest.approx(y["layers"][name]["share"], abs=1e-3)

    # the 2-process checkpoint is in the 1-process layout: same keys and shapes, close weights
    c1, c2 = load_checkpoint(one / "ck"), load_checkpoint(two / "ck")
    s1, s2 = c1.model.state_dict(), c2.model.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-4, rtol=0, msg=k)
    assert load_trainer_state(one / "ck")["step"] == load_trainer_state(two / "ck")["step"] == steps

    # loaded in 1 process: the logits the 2-process (expert-parallel) model gave
    batch = fixed_batch(c2)
    with torch.no_grad():
        logits = c2.model(batch).logits
    torch.testing.assert_close(logits, torch.load(two / "logits.pt"), atol=1e-5, rtol=0)
    # and the validation loss rank 0 logged for the final model
    cfg = c2.config
    val = load_data(cfg.data, "val", cfg.model.image_size, cfg.train.val_fraction, cfg.train.seed)
    val = val.subset(range(cfg.train.eval_subset))
    res = evaluate(c2.model, val, c2.tokenizer, c2.answers)
    (logged,) = _metrics(two / "ck", "val")
    assert abs(res.loss - logged["loss"]) <= 1e-4


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_dead_or_stuck_process_ends_the_run_with_an_error(tmp_path, sig):
    """SIGKILL (dead: sockets close) or SIGSTOP (stuck: the collective times out after
    --dist-timeout) one of two training processes: the other exits non-zero with one
    `vlmoe: error: distributed: ...` line, well within 60 s."""
    port = free_port()
    argv = [sys.executable, "-m", "vlmoe", "train", "--preset", "tiny", "--no-progress",
            "--out", str(tmp_path / "ck"), "--dist-timeout", "5",
            # far more steps than the test lets run: the kill must land mid-training, even
            # on a fast idle machine where one tiny epoch takes about a second
            "--epochs", "200"]  # fmt: skip
    logs = [tmp_path / f"err{r}.txt" for r in range(2)]
    procs = []
    for r in range(2):
        with open(logs[r], "w") as f:
            procs.append(
                subprocess.Popen(
                    argv, env=worker_env(r, 2, port), stderr=f, stdout=subprocess.DEVNULL
                )  # fmt: skip
            )
    try:
        deadline = time.time() + 120
        while "vlmoe train:" not in logs[0].read_text():  # training has started
            assert time.time() < deadline and procs[0].poll() is None, logs[0].read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(procs[1].pid, getattr(signal, sig))
        t0 = time.time()
        rc = procs[0].wait(timeout=60)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.wait()
    err = logs[0].read_text().strip().splitlines()
    print(err[-1], f"({elapsed:.1f} s)")
    assert rc != 0 and elapsed < 60
    assert err[-1].startswith("vlmoe: error: distributed:"), err[-5:]
    assert "Traceback" not in logs[0].read_text()
