"""Distributed training on PyTorch's composable APIs: DeviceMesh, FSDP2, DTensor experts, DCP.

Launch with PyTorch's launcher; ``Engine.from_env`` joins the process group that torchrun's
environment variables describe (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and is a
plain single-process engine without them::

    torchrun --nproc-per-node 2 -m vlmoe train --preset tiny

Layout. W processes form a 2-D ``DeviceMesh`` ``("dp", "ep")`` of shape ``(W / ep, ep)``:

    * experts: every MoE layer's E experts are split over the ``"ep"`` dimension
      (``vlmoe.moe.parallel.ExpertParallelMoE``; tokens travel by all-to-all). The expert
      weights become DTensor parameters ``Shard(0)`` on the ``"ep"`` sub-mesh, so their
      optimiser state is sharded too and a checkpoint knows which rows each rank holds;
      expert-parallel groups that repeat over ``"dp"`` hold equal copies;
    * everything else: FSDP2 ``fully_shard`` over all W ranks (each transformer block one unit,
      then the root; the expert weights are ``ignored_params``), or with ``fsdp=False``
      replicated and all-reduced by hand after ``backward()``;
    * data: the global batch is cut in W contiguous slices (``rank_slice``), so W ranks
      together see the 1-process batch.

Why W processes equal 1 (loss per step within float rounding): each rank's task loss is the
mean over its B/W samples; the auxiliary losses are taken over global-batch statistics (the
MoE layers reduce them over the whole world); the all-to-all and the statistics all-reduce
differentiate J = Σ_r L_r = W · L, so every gradient is scaled by 1/W: FSDP2's reduce-scatter
averages the dense gradients, and ``finish_gradients`` sums the expert gradients over ``"dp"``
and divides by W. ``clip_grad_norm_`` takes the global norm (FSDP2 shards summed over ranks,
expert shards once per expert).

Checkpoints (``save_state`` / ``load_state``) go through ``torch.distributed.checkpoint``
(DCP): model, optimiser and extra tensors (RNG state ...) keyed by the single-process names,
each rank writing its own shards, so a run saved by N processes resumes on M (1 included: DCP
runs without a process group). DCP's reader unpickles its ``.metadata`` file and
``torch.load``s non-tensor entries with ``weights_only=False``; both would run code from a
stranger's checkpoint, so ``load_state`` reads with an allow-list unpickler and
``weights_only=True`` (``CheckpointError`` on anything else).

Failures: every collective runs under the process group's timeout (``VLMOE_DIST_TIMEOUT``,
default 120 s). A rank that dies closes its sockets, so the others fail at their next
collective; ``describe_failure`` turns that into one line ``distributed: ...`` and
``exit_on_failure`` prints it as ``vlmoe: error: ...`` and leaves at once.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from vlmoe.checkpoint import CheckpointError
from vlmoe.moe.parallel import ExpertParallelMoE, ShardedExperts, expert_parallel

ENV_TIMEOUT = "VLMOE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
EXTRA_PREFIX = "extra."

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENV_TIMEOUT",
    "DistributedError",
    "Engine",
    "ParallelPlan",
    "describe_failure",
    "exit_on_failure",
    "is_distributed_failure",
    "launched",
    "timeout_from_env",
]


class DistributedError(RuntimeError):
    """The distributed launch is misconfigured or a peer failed; the message says which."""


# --------------------------------------------------------------------------------------------
# launch and failure reporting
# --------------------------------------------------------------------------------------------


def launched() -> bool:
    """True when started by a launcher (torchrun) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def timeout_from_env(default: float = DEFAULT_TIMEOUT_S) -> float:
    """Seconds from ``VLMOE_DIST_TIMEOUT`` (default ``default``); a bad value raises."""
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise DistributedError(f"{ENV_TIMEOUT}={raw!r}: expected a number of seconds") from None
    if not v > 0:
        raise DistributedError(f"{ENV_TIMEOUT}={raw!r}: expected a positive number of seconds")
    return v


_FAILURE_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


def is_distributed_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed collective (a peer died, hung or timed out) or a launch error.

    Gloo reports a dead peer as a plain ``RuntimeError`` naming gloo and the connection, NCCL
    and the store as ``torch.distributed.DistError``.
    """
    if isinstance(e, (DistributedError, dist.DistError)):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _FAILURE_MARKERS)


def describe_failure(e: BaseException) -> str | None:
    """One line ``distributed: ...`` for a distributed failure (the CLI prints it after
    ``vlmoe: error:``), or None if ``e`` is not one."""
    if not is_distributed_failure(e):
        return None
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    if isinstance(e, DistributedError):
        return first if first.startswith("distributed:") else f"distributed: {first}"
    rank = os.environ.get("RANK", "?")
    return (
        f"distributed: rank {rank}: a collective failed — another process died, hung or timed "
        f"out ({type(e).__name__}: {first[:300]})"
    )


def exit_on_failure(e: BaseException) -> None:
    """If ``e`` is a distributed failure under a launcher: print ``vlmoe: error: distributed:
    ...`` and leave at once (``os._exit(1)``); otherwise return.

    Leaving at once is the point: tearing the process group down, or any exit handler, may
    block on the dead or stuck peer, so a bounded exit must skip them.
    """
    if launched() and (msg := describe_failure(e)) is not None:
        print(f"vlmoe: error: {msg}", file=sys.stderr, flush=True)
        os._exit(1)


def _join_group(device: str, timeout_s: float | None) -> tuple[int, int, str]:
    """Join torchrun's process group → ``(rank, world_size, device)``. NCCL for a CUDA device
    (each rank on ``cuda:LOCAL_RANK``), gloo otherwise; ``timeout_s`` bounds everything."""
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
            "launch with torchrun (e.g. torchrun --nproc-per-node 2 -m vlmoe train ...)"
        )
    timeout = timeout_from_env() if timeout_s is None else float(timeout_s)
    if not timeout > 0:
        raise DistributedError(f"--dist-timeout: expected a positive number, got {timeout_s}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "gloo"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda: CUDA is not available on this machine")
        device, backend = f"cuda:{os.environ['LOCAL_RANK']}", "nccl"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw = {"device_id": torch.device(device)} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout), **kw)  # fmt: skip
        except (dist.DistError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {rank}: cannot join the process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({first})"
            ) from None
    return rank, world, device


# --------------------------------------------------------------------------------------------
# reading a DCP checkpoint without running its code
# --------------------------------------------------------------------------------------------

_DCP = "torch.distributed.checkpoint."
#: the classes a DCP ``.metadata`` pickle may name (torch 2.13); anything else is refused
_SAFE_GLOBALS = {
    (_DCP + "metadata", n)
    for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
              "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")
} | {
    (_DCP + "filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # name → torch.layout lookup (KeyError otherwise)
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: dataclasses of ``torch.distributed.checkpoint``, torch
    dtypes and sizes, plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        ok = (module, name) in _SAFE_GLOBALS
        ok = ok or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not ok:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata goes through ``_MetadataUnpickler`` and whose
    storage entries must name files inside the checkpoint folder."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                md = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found (not a DCP checkpoint)") from None
        except Exception as e:
            raise CheckpointError(f"{path}: not a valid DCP metadata file ({e})") from None
        if not isinstance(md, Metadata):
            raise CheckpointError(f"{path}: expected DCP Metadata, got {type(md).__name__}")
        for info in (md.storage_data or {}).values():
            rel = getattr(info, "relative_path", None)
            if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
                raise CheckpointError(f"{path}: storage entry {rel!r} is not a file in the folder")
        md.storage_meta = md.storage_meta or dcp.metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _SafePlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln] or [str(e)[:200]]
            raise CheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn}: refused to unpickle ({lines[0]})"
            ) from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------


@dataclass
class ParallelPlan:
    """How W processes split the model.

    ep: expert-parallel size (0 = all W processes); data-parallel size dp = W / ep.
    fsdp: shard the dense (non-expert) parameters and their optimiser state over all W ranks
        with FSDP2 (True), or replicate them and all-reduce their gradients (False).
    """

    ep: int = 0
    fsdp: bool = True


def _expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ShardedExperts)
            for p in m.parameters(recurse=False)]  # fmt: skip


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class Engine:
    """This process's place in the run and the collective steps of training.

    With ``world_size == 1`` (no process group, ``mesh`` None) every method is the plain
    single-process operation, so a training loop has one code path.
    """

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    plan: ParallelPlan = field(default_factory=ParallelPlan)
    mesh: DeviceMesh | None = None

    @classmethod
    def from_env(
        cls, device: str = "cpu", timeout_s: float | None = None, plan: ParallelPlan | None = None
    ) -> Engine:
        """Join torchrun's process group and build the ``("dp", "ep")`` mesh; a single-process
        engine when WORLD_SIZE is unset or 1. A plan that does not fit W raises
        ``DistributedError``."""
        plan = plan or ParallelPlan()
        if not launched():
            return cls(device=device, plan=plan)
        rank, world, device = _join_group(device, timeout_s)
        ep = plan.ep or world
        if ep < 1 or world % ep:
            raise DistributedError(
                f"expert-parallel size {plan.ep}: must divide the {world} processes"
            )
        kind = torch.device(device).type
        mesh = init_device_mesh(kind, (world // ep, ep), mesh_dim_names=("dp", "ep"))
        return cls(rank, world, device, ParallelPlan(ep, plan.fsdp), mesh)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _group(self, dim: str) -> dist.ProcessGroup:
        assert self.mesh is not None
        return self.mesh.get_group(dim)

    # ------------------------------------------------------------------ set-up
    def local_batch_size(self, global_batch: int) -> int:
        """This rank's share of a global batch; it must divide evenly (else DistributedError)."""
        if global_batch % self.world_size:
            raise DistributedError(
                f"train.batch_size: the global batch {global_batch} does not split evenly "
                f"over {self.world_size} processes (use a multiple of {self.world_size})"
            )
        return global_batch // self.world_size

    def rank_slice(self, t: Tensor) -> Tensor:
        """This rank's contiguous 1/W of ``t`` along dim 0 (all of it for one process)."""
        if not self.active:
            return t
        n = self.local_batch_size(t.shape[0])
        return t[self.rank * n : (self.rank + 1) * n]

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Make every rank's ``model`` rank 0's, shard the experts on ``"ep"`` (DTensor
        ``Shard(0)``) and the dense parameters with FSDP2 (or keep them replicated).

        Call on every rank before building the optimiser; returns the model (the same object,
        changed in place). One process: returned unchanged.
        """
        if not self.active:
            return model
        ep = self.plan.ep
        for m in model.modules():
            n = getattr(getattr(m, "config", None), "num_experts", None)
            if isinstance(n, int) and n % ep:
                raise DistributedError(
                    f"model.moe.num_experts: {n} experts cannot be split over {ep} "
                    "expert-parallel processes (expert parallelism needs a multiple)"
                )
        self._broadcast_from_rank0(model)
        model = expert_parallel(model, self._group("ep"))
        ep_mesh = self.mesh["ep"]
        for m in model.modules():
            if isinstance(m, ExpertParallelMoE):
                m.stats_group = None  # balancing statistics over the whole world's batch
            if isinstance(m, ShardedExperts):
                for name, p in list(m.named_parameters(recurse=False)):
                    d = DTensor.from_local(p.data, ep_mesh, [Shard(0)], run_check=False)
                    setattr(m, name, nn.Parameter(d, requires_grad=p.requires_grad))
        if self.plan.fsdp:
            self._fully_shard(model)
        return model

    @torch.no_grad()
    def _broadcast_from_rank0(self, model: nn.Module) -> None:
        """Every parameter and buffer ← rank 0's (one flat broadcast per dtype)."""
        groups: dict[torch.dtype, list[Tensor]] = {}
        for t in [*model.parameters(), *model.buffers()]:
            groups.setdefault(t.dtype, []).append(t.data)
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.broadcast(flat, src=0)
            for t, v in zip(ts, torch.split(flat, [t.numel() for t in ts]), strict=True):
                t.copy_(v.view_as(t))

    def _fully_shard(self, model: nn.Module) -> None:
        """FSDP2 over the whole world: each element of every ``ModuleList`` (transformer
        blocks) is a unit — all-gathered just before it runs — then the root; expert
        weights are left out (they are sharded on ``"ep"`` already)."""
        from torch.distributed.fsdp import fully_shard

        world = init_device_mesh(torch.device(self.device).type, (self.world_size,))
        ignored = set(_expert_params(model))
        units: list[nn.Module] = []
        inside: set[int] = set()
        for m in model.modules():  # pre-order: outermost lists first; units must not nest
            if isinstance(m, nn.ModuleList) and id(m) not in inside:
                units += list(m)
                inside.update(id(x) for u in m for x in u.modules())
        for u in units:
            if any(p not in ignored for p in u.parameters()):
                fully_shard(u, mesh=world, ignored_params=ignored)
        fully_shard(model, mesh=world, ignored_params=ignored)

    # ------------------------------------------------------------------ gradients
    @torch.no_grad()
    def finish_gradients(self, model: nn.Module) -> None:
        """After ``backward()``: make every gradient the 1-process gradient of the global-batch
        mean loss. Expert shards: summed over ``"dp"`` (their copies), divided by W; dense
        parameters: FSDP2 averaged them already, or (``fsdp=False``) one all-reduce mean per
        dtype here."""
        if not self.active:
            return
        W, dp = self.world_size, self.world_size // self.plan.ep
        experts = _expert_params(model)
        for p in experts:
            if p.grad is None:  # keep the flat layout identical on every rank
                p.grad = torch.zeros_like(p)
        ex_grads = [_local(p.grad) for p in experts]
        if dp > 1:
            _all_reduce_flat(ex_grads, self._group("dp"))
        for g in ex_grads:
            g.div_(W)
        if not self.plan.fsdp:
            ids = {id(p) for p in experts}
            dense = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
            for p in dense:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _all_reduce_flat([p.grad for p in dense], None)
            for p in dense:
                p.grad.div_(W)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model: the global L2
        norm of all gradients (each FSDP2 shard and expert row counted once), returned as a
        0-dim float32 tensor equal on every rank; gradients scaled in place if above."""
        if not self.active:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        dp = self.world_size // self.plan.ep
        ex = {id(p) for p in _expert_params(model)}
        grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]
        sq = torch.zeros(2, dtype=torch.float32, device=self.device)  # [sharded, replicated]
        for p, g in grads:
            s = _local(g).detach().float().pow(2).sum()
            if id(p) in ex:
                sq[0] += s / dp  # each expert row lives on dp ranks
            elif isinstance(g, DTensor):
                sq[0] += s
            else:
                sq[1] += s
        shard = sq[:1].clone()
        dist.all_reduce(shard)
        total = (shard[0] + sq[1]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for _, g in grads:
            _local(g).mul_(coef.to(g.dtype))
        return total

    # ------------------------------------------------------------------ metrics
    def all_reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """``{name: Σ over ranks}`` (float64; one all-reduce); the input for one process."""
        if not self.active or not values:
            return dict(values)
        v = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(v)
        return dict(zip(values, v.tolist(), strict=True))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def shutdown(self) -> None:
        """Barrier, then leave the process group (no-op for one process). Both are needed: on
        torch 2.13 + gloo a process that exits without them may die of SIGABRT."""
        if self.active and dist.is_initialized():
            try:
                dist.barrier()
                dist.destroy_process_group()
            except Exception:  # after a failed collective the group may be unusable
                pass

    # ------------------------------------------------------------------ state
    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The single-process state dict (same names, full tensors) on every rank, e.g. for
        ``model.safetensors``. Collective."""
        if not self.active:
            return model.state_dict()
        opts = StateDictOptions(full_state_dict=True)
        return get_model_state_dict(model, options=opts)

    def save_state(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                   extra_tensors: dict[str, Tensor] | None = None) -> None:  # fmt: skip
        """Write model, optimiser and rank 0's ``extra_tensors`` as a DCP checkpoint into
        ``folder`` (replacing it), loadable by any number of processes. Collective; every rank
        returns once the folder is in place. Written to ``.NAME.tmp`` beside it and renamed
        by rank 0, so a crash never leaves half a checkpoint under ``folder``."""
        folder = Path(folder)
        tmp, old = (folder.with_name(f".{folder.name}.{s}") for s in ("tmp", "old"))
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        msd, osd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": msd, "optim": osd}
        if self.is_main and extra_tensors:  # only rank 0 writes them: rank 0's values
            state["extra"] = dict(extra_tensors)
        with _quiet_if(not self.active):
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))
        self.barrier()
        if self.is_main:
            if folder.exists():
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load_state(self, folder: Path, model: nn.Module,
                   optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:  # fmt: skip
        """Load a ``save_state`` checkpoint written by any number of processes into this
        run's (sharded) model and optimiser, in place; returns the extra tensors. Collective.
        Code in the checkpoint is never run: a metadata file naming anything but DCP's
        classes, or an entry that needs unpickling, raises ``CheckpointError``."""
        reader = _SafeReader(Path(folder))
        md = reader.read_metadata()
        msd, osd = get_state_dict(model, optimizer)
        extras = {
            k[len(EXTRA_PREFIX) :]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for k, m in md.state_dict_metadata.items()
            if k.startswith(EXTRA_PREFIX) and isinstance(m, TensorStorageMetadata)
        }
        state: dict[str, Any] = {"model": msd, "optim": osd, "extra": extras}
        try:
            with _quiet_if(not self.active):
                dcp.load(state, storage_reader=reader, planner=_SafePlanner())
        except dcp.api.CheckpointException as e:
            for f in e.failures.values():
                f = f[0] if isinstance(f, tuple) else f  # DCP's (exception, traceback)
                if isinstance(f, CheckpointError):
                    raise CheckpointError(str(f)) from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{folder}: cannot load this checkpoint ({first})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])  # fmt: skip
        return state["extra"]


@contextlib.contextmanager
def _quiet_if(cond: bool) -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save in a single process" warning: one
    process without a process group is a supported layout here, not a mistake."""
    with warnings.catch_warnings():
        if cond:
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        yield


def _all_reduce_flat(ts: list[Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum ``ts`` over ``group`` in place: one all-reduce per dtype, through a flat buffer."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in ts:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group_ts])
        dist.all_reduce(flat, group=group)
        for t, v in zip(group_ts, torch.split(flat, [t.numel() for t in group_ts]), strict=True):
            t.copy_(v.view_as(t))
