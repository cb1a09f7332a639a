"""One training engine for every model family.

task.py      what the trainer needs from a model family (``Task``) and VL-MoE's ``VQATask``
step.py      ``train_step``: forward, loss + aux, backward, gradient sync, clip, step
loop.py      ``train`` / ``Trainer``: stages, logging, validation, checkpoints, resume
optim.py     AdamW parameter groups by what a parameter is, warm-up + cosine schedule
metrics.py   metric windows, routing summaries, collapse monitor, metrics.jsonl / TensorBoard
parallel.py  the process group: DeviceMesh, FSDP2, expert parallelism, DCP state
"""

from vlmoe.train.loop import StopSignals, Trainer, TrainResult, train
from vlmoe.train.metrics import CollapseMonitor
from vlmoe.train.step import train_step
from vlmoe.train.task import Task, VQATask, prepare_data

__all__ = [
    "CollapseMonitor",
    "StopSignals",
    "Task",
    "TrainResult",
    "Trainer",
    "VQATask",
    "prepare_data",
    "train",
    "train_step",
]
