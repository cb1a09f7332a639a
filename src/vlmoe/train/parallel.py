"""Interim engine: the trainer's view of the process group (replaced by the DeviceMesh engine)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlmoe.distributed import Dist, init_from_env


@dataclass
class ParallelPlan:
    ep: int = 0
    fsdp: bool = True


class Engine:
    """This process's place in the run and the collective steps of training."""

    def __init__(self, d: Dist) -> None:
        self.d = d
        self.rank, self.world_size, self.device = d.rank, d.world_size, d.device
        self.is_main = d.is_main

    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float | None = None,
                 plan: ParallelPlan | None = None) -> Engine:  # fmt: skip
        return cls(init_from_env(device, timeout_s))

    def parallelize(self, model: nn.Module) -> nn.Module:
        return self.d.parallelize(model)

    def local_batch_size(self, global_batch: int) -> int:
        return self.d.local_batch_size(global_batch)

    def rank_slice(self, t: Tensor) -> Tensor:
        return self.d.rank_slice(t)

    def finish_gradients(self, model: nn.Module) -> None:
        self.d.sync_gradients(model)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return self.d.clip_grad_norm_(model, max_norm)

    def all_reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        if not self.d.active:
            return dict(values)
        import torch.distributed as dist

        names = sorted(values)
        v = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
        dist.all_reduce(v)
        return dict(zip(names, v.tolist(), strict=True))

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return self.d.full_state_dict(model)

    def save_state(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                   extra: dict[str, Tensor]) -> None:  # fmt: skip
        state = {f"model.{k}": v for k, v in self.full_state_dict(model).items()}
        opt = self.d.full_optimizer_state(optimizer, model)
        meta = {"param_groups": opt["param_groups"], "state": {}}
        for i, st in opt["state"].items():
            meta["state"][str(i)] = sorted(st)
            for k, v in st.items():
                state[f"optim.{i}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
        state.update({f"extra.{k}": v for k, v in extra.items()})
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      str(folder / "state.safetensors"))  # fmt: skip
            (folder / "optimizer.json").write_text(json.dumps(meta))
        self.barrier()

    def load_state(self, folder: Path, model: nn.Module,
                   optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:  # fmt: skip
        state = load_file(str(folder / "state.safetensors"))
        meta = json.loads((folder / "optimizer.json").read_text())
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        opt_state = {int(i): {k: state[f"optim.{i}.{k}"] for k in ks}
                     for i, ks in meta["state"].items()}  # fmt: skip
        sd = {"state": opt_state, "param_groups": meta["param_groups"]}
        optimizer.load_state_dict(self.d.shard_optimizer_state(sd, optimizer, model))
        return {k[6:]: v for k, v in state.items() if k.startswith("extra.")}

    def barrier(self) -> None:
        self.d.barrier()

    def shutdown(self) -> None:
        self.barrier()
        self.d.shutdown()
