"""Start a benchmark's worker as W local processes of one gloo group (what torchrun does,
in a few lines, so that a benchmark needs no launcher): shared by the bench scripts."""

from __future__ import annotations

import os
import socket
import subprocess


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_ranks(argv: list[str], world: int, threads: int, timeout: float, what: str) -> None:
    """Run ``argv`` as ranks 0..world-1 (one process, without a group, when world is 1), each
    with ``threads`` torch threads; wait at most ``timeout`` s; exit naming ``what`` if a rank
    failed or hung (hung ranks are killed)."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLMOE_DIST_TIMEOUT="120")
        env.pop("WORLD_SIZE", None)
        if world > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(subprocess.Popen(argv, env=env))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise SystemExit(f"{what}: a worker failed")
