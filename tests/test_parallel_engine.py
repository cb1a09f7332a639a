"""``vlmoe.train.parallel``: FSDP2 + expert parallel on real gloo processes vs 1 process.

The multi-process tests start real ranks of ``tests/engine_worker.py`` on a free local port,
each under a timeout; the 1-process runs are the same worker called in this process.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_worker import build, free_port, main, run_ranks, worker_env
from safetensors.torch import load_file

from vlmoe.checkpoint import CheckpointError
from vlmoe.train.parallel import DistributedError, Engine

WORKER = Path(__file__).parent / "engine_worker.py"
STEPS, SAVE_AT = 6, 3


def run_worker(args: list[str], timeout: float = 300) -> None:
    """2 ranks of the engine worker with ``args`` (fails with a rank's stderr)."""
    run_ranks([sys.executable, str(WORKER), *args], timeout=timeout)


def read(out: Path) -> tuple[dict[str, float], dict[str, float]]:
    r = json.loads((out / "losses.json").read_text())
    return r["loss"], r["grad_norm"]


def assert_same_curve(a: dict[str, float], b: dict[str, float], tol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same 6 training steps by 1 process (here) and by 2 gloo processes (FSDP2 + expert
    parallel), each saving a DCP checkpoint after step 3."""
    root = tmp_path_factory.mktemp("engine")
    one, two = root / "one", root / "two"
    one.mkdir(), two.mkdir()
    main([str(one), str(STEPS), "--save-at", str(SAVE_AT)])
    run_worker([str(two), str(STEPS), "--save-at", str(SAVE_AT)])
    return {"one": one, "two": two}


def test_two_process_fsdp2_expert_parallel_equals_one_process(runs):
    (l1, n1), (l2, n2) = read(runs["one"]), read(runs["two"])
    assert list(l1) == [str(s) for s in range(1, STEPS + 1)]
    assert_same_curve(l1, l2)
    # the gradient norm sees a wrong gradient scale that AdamW's update would hide
    assert_same_curve(n1, n2)
    assert max(n1.values()) > 0.5  # clipping (max_norm 0.5) was exercised
    counts = [json.loads((runs[k] / "losses.json").read_text())["param_counts"] for k in runs]
    assert counts[0] == counts[1] == list(build().param_counts())
    # training moved the weights, the same way in both runs
    a, b = (
        load_file(runs["one"] / "full-final.safetensors"),
        load_file(runs["two"] / "full-final.safetensors"),
    )
    init = load_file(runs["one"] / "full-init.safetensors")
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)


def test_full_state_dict_on_two_ranks_is_the_one_process_state_dict(runs):
    one = build().state_dict()
    two = load_file(runs["two"] / "full-init.safetensors")
    assert two.keys() == one.keys()
    for k in one:
        assert two[k].shape == one[k].shape and torch.equal(two[k], one[k]), k


@pytest.mark.parametrize("saved_by", ["one", "two"])
def test_dcp_checkpoint_resumes_on_another_process_count(runs, tmp_path, saved_by):
    """Saved after step 3 by 1 (2) processes, resumed by 2 (1): steps 4..6 as uninterrupted."""
    state = runs[saved_by] / "state"
    assert (state / ".metadata").is_file() and not list(state.parent.glob(".state.*"))
    if saved_by == "one":
        run_worker([str(tmp_path), str(STEPS), "--resume", str(state)])
    else:
        main([str(tmp_path), str(STEPS), "--resume", str(state)])
    (ref, ref_n), (got, got_n) = read(runs["one"]), read(tmp_path)
    assert list(got) == [str(s) for s in range(SAVE_AT + 1, STEPS + 1)]
    assert_same_curve({k: ref[k] for k in got}, got)
    assert_same_curve({k: ref_n[k] for k in got}, got_n)


def test_two_process_data_parallel_replicated_equals_one_process(runs, tmp_path):
    """ep=1 (dp=2: each rank holds every expert) with replicated dense parameters (no FSDP)."""
    run_worker([str(tmp_path), str(STEPS), "--ep", "1", "--no-fsdp"])
    (l1, n1), (l2, n2) = read(runs["one"]), read(tmp_path)
    assert_same_curve(l1, l2)
    assert_same_curve(n1, n2)


class _Payload:
    """Unpickling this would create the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_load_state_refuses_a_metadata_file_that_would_run_code(runs, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(runs["one"] / "state", state)
    marker = tmp_path / "pwned"
    (state / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    model = build()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"\.metadata: .*refusing to load posix\.mkdir"):
        Engine().load_state(state, model, opt)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="file not found"):
        Engine().load_state(tmp_path / "nowhere", model, opt)


def test_load_state_refuses_an_entry_that_would_run_code(tmp_path):
    model = build()
    opt = torch.optim.AdamW(model.parameters())
    marker = tmp_path / "pwned"
    # non-tensor entries are saved pickled; one a fresh optimiser asks for is "lr"
    opt.param_groups[0]["lr"] = _Payload(marker)
    Engine().save_state(tmp_path / "state", model, opt, {"step": torch.tensor(1)})
    fresh = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        Engine().load_state(tmp_path / "state", model, fresh)
    assert not marker.exists()


def test_single_process_engine_is_plain():
    e = Engine()
    assert e.is_main and e.mesh is None and e.local_batch_size(32) == 32
    t = torch.arange(6)
    assert e.rank_slice(t) is t
    assert e.all_reduce_sums({"a": 1.5}) == {"a": 1.5}
    with pytest.raises(DistributedError, match="does not split evenly"):
        Engine(world_size=3).local_batch_size(32)
    assert Engine(rank=1, world_size=2).rank_slice(torch.arange(6)).tolist() == [3, 4, 5]


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_dead_or_stuck_rank_ends_the_other_with_one_error_line(tmp_path, sig):
    """SIGKILL (sockets close) or SIGSTOP (collectives time out after 5 s) rank 1 mid-training:
    rank 0 exits non-zero with one ``vlmoe: error: distributed: ...`` line, within 60 s."""
    port = free_port()
    argv = [sys.executable, str(WORKER), str(tmp_path), "1000000"]
    logs = [tmp_path / f"err{r}.txt" for r in range(2)]
    procs = []
    for r in range(2):
        with open(logs[r], "w") as f:
            env = worker_env(r, 2, port, timeout_s=5)
            procs.append(subprocess.Popen(argv, env=env, stderr=f, stdout=subprocess.DEVNULL))
    try:
        deadline = time.time() + 90
        while "step 2 " not in logs[0].read_text():  # training has started
            assert time.time() < deadline and procs[0].poll() is None, logs[0].read_text()
            time.sleep(0.2)
        os.kill(procs[1].pid, getattr(signal, sig))
        t0 = time.time()
        rc = procs[0].wait(timeout=60)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.wait()
    text = logs[0].read_text()
    err = text.strip().splitlines()
    assert rc == 1 and elapsed < 60, text[-2000:]
    assert err[-1].startswith("vlmoe: error: distributed: rank 0:"), err[-5:]
    assert "Traceback" not in text
