"""One question through a checkpoint: the answers and what every MoE FFN did with each patch
and word, as a JSON-ready dict.

Every call into the model is in `run_model` (one function, so that a change of the model's
calling convention touches one place). Everything else here reads its `ModelOutput`:
``logits`` [1, A] and ``routing`` (one `RoutingRecord` per MoE FFN called).

Legend: T routed tokens of one FFN, K top-k, E experts, A answers, P patches, L text positions.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlmoe.checkpoint import Checkpoint, load_checkpoint
from vlmoe.data import Batch, WordTokenizer
from vlmoe.data.batching import model_pixels
from vlmoe.models.output import RoutingRecord

#: questions longer than this are refused (the model reads at most max_text_len words anyway)
MAX_QUESTION_CHARS = 500
CLS_TOKEN = "[CLS]"


@dataclass
class ServedModel:
    """A checkpoint loaded for serving.

    id          short name used by the API ("a", "b")
    layers      one dict per MoE FFN, in forward order: name, layer, modality
                ("vision" | "text" | "vl"), num_experts, top_k
    train_load  MoE FFN name → mean share of token-expert assignments per expert [E] over the
                training run's routing log (metrics.jsonl), absent when the log has none
    batcher     runs concurrent questions to this model as one forward (`Batcher`)
    """

    id: str
    checkpoint: Checkpoint
    layers: list[dict[str, Any]] = field(default_factory=list)
    train_load: dict[str, list[float]] = field(default_factory=dict)
    batcher: Batcher | None = None

    @property
    def image_size(self) -> int:
        return self.checkpoint.config.model.image_size

    @property
    def grid(self) -> int:
        """Patches per side: image patch p covers row p // grid, column p % grid."""
        cfg = self.checkpoint.config.model
        return cfg.image_size // cfg.patch_size


def load_served_model(path: str, model_id: str, device: str = "cpu") -> ServedModel:
    """Load a checkpoint folder (CheckpointError on a bad one) and learn its MoE FFNs from one
    warm-up forward on a grey image."""
    ck = load_checkpoint(path, device)
    served = ServedModel(model_id, ck, train_load=training_load(ck.metrics), batcher=Batcher(ck))
    S = served.image_size
    grey = torch.full((3, S, S), 128, dtype=torch.uint8)
    out = run_model(ck.model, make_batch([grey], ["?"], ck))
    served.layers = [
        {
            "name": r.name,
            "layer": r.layer,
            "modality": r.modality,
            "num_experts": int(r.stats.tokens_per_expert.numel()),
            "top_k": int(r.routing.indices.shape[1]),
        }
        for r in out.routing
    ]
    return served


@torch.no_grad()
def run_model(model: torch.nn.Module, batch: Batch) -> Any:
    """The one call into the model: `batch` → its ModelOutput (logits [B, A], routing)."""
    return model(batch)


def make_batch(images_CHW: list[torch.Tensor], questions: list[str], ck: Checkpoint) -> Batch:
    """uint8 images [3, S, S] and their questions → one Batch on the model's device (text
    padded to the longest question)."""
    ids_BL, mask_BL = ck.tokenizer.encode_batch(questions, max_len=ck.config.model.max_text_len)
    images = model_pixels(torch.stack(images_CHW))  # as in training: [-1, 1]
    B = len(questions)
    batch = Batch(images, ids_BL, mask_BL, torch.full((B,), -100), torch.arange(B))
    return batch.to(next(ck.model.parameters()).device)


@dataclass
class SampleRouting:
    """One MoE FFN's routing of one sample: positions [T] (patch index or text position),
    indices / weights [T, K] (the chosen experts best first, -1 / 0 for an unused slot)."""

    name: str
    layer: int
    modality: str
    num_experts: int
    positions: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


@dataclass
class _Pending:
    image: torch.Tensor
    question: str
    done: bool = False
    result: tuple[torch.Tensor, list[SampleRouting], float, int] | None = None
    error: BaseException | None = None


class Batcher:
    """Runs the questions that arrive while a forward is under way as the next forward, one
    batch (at most `max_batch`) at a time. Under load this costs a few batched forwards instead
    of one batch-1 forward per request queued behind a lock; alone, a request runs at once.
    No thread of its own: the first waiting caller runs each batch ("leader" hand-off)."""

    def __init__(self, ck: Checkpoint, max_batch: int = 16) -> None:
        self.ck, self.max_batch = ck, max_batch
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._busy = False

    def run(
        self, image_CHW: torch.Tensor, question: str
    ) -> tuple[torch.Tensor, list[SampleRouting], float, int]:
        """→ (logits [A], routing per MoE FFN, forward ms, batch size it ran in)."""
        p = _Pending(image_CHW, question)
        with self._cond:
            self._queue.append(p)
            while not p.done:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                self._cond.release()
                try:
                    self.forward(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if p.error is not None:
            raise p.error
        assert p.result is not None
        return p.result

    def forward(self, batch: list[_Pending]) -> None:
        """One forward for `batch`; each item gets its result (or the error) and is done."""
        try:
            b = make_batch([p.image for p in batch], [p.question for p in batch], self.ck)
            t0 = time.perf_counter()
            out = run_model(self.ck.model, b)
            ms = (time.perf_counter() - t0) * 1e3
            logits_BA = out.logits.float().cpu()
            for i, p in enumerate(batch):
                p.result = (logits_BA[i], [_sample(r, i) for r in out.routing], ms, len(batch))
        except BaseException as e:  # every waiter must wake, whatever went wrong
            for p in batch:
                p.error = e
        for p in batch:
            p.done = True


def _sample(rec: RoutingRecord, i: int) -> SampleRouting:
    mask_T = rec.token_index[:, 0].cpu() == i
    return SampleRouting(
        rec.name,
        rec.layer,
        rec.modality,
        int(rec.stats.tokens_per_expert.numel()),
        rec.token_index[:, 1].cpu()[mask_T],
        rec.routing.indices.cpu()[mask_T],
        rec.routing.weights.float().cpu()[mask_T],
    )


def question_tokens(tokenizer: WordTokenizer, question: str, max_len: int) -> list[str]:
    """The text tokens the model reads, one per text position: [CLS], then the words, cut at
    max_len like the encoding."""
    return ([CLS_TOKEN] + tokenizer.tokens(question))[:max_len]


def ask(served: ServedModel, image_CHW: torch.Tensor, question: str, top: int = 5) -> dict:
    """Answer `question` about uint8 image [3, S, S] and describe the routing.

    Returns {"model", "task": "answer", "answer", "top": [{"answer", "prob"}],
    "question": {"text", "tokens", "unknown", "truncated"}, "image": {"size", "grid", "png"},
    "layers": [layer_json(...)], "timing_ms": {"model", "batch"}}: "batch" is how many
    concurrent questions shared the forward. Generative checkpoints will add
    "answer_text" (and text positions past the question, for generated words); the keys here
    stay as they are.
    """
    ck = served.checkpoint
    assert served.batcher is not None
    logits_A, routing, model_ms, batch_size = served.batcher.run(image_CHW, question)
    probs_A = logits_A.softmax(-1)
    p, i = probs_A.topk(min(top, probs_A.numel()))
    ranked = [
        {"answer": ck.answers[j], "prob": round(float(q), 5)} for q, j in zip(p, i, strict=True)
    ]
    max_len = ck.config.model.max_text_len
    tokens = question_tokens(ck.tokenizer, question, max_len)
    words = ck.tokenizer.tokens(question)
    return {
        "model": served.id,
        "task": "answer",
        "answer": ranked[0]["answer"],
        "top": ranked,
        "question": {
            "text": question,
            "tokens": tokens,
            "unknown": ck.tokenizer.unknown_words(question),
            "truncated": len(words) + 1 > max_len,
        },
        "image": {"size": served.image_size, "grid": served.grid, "png": png_data_url(image_CHW)},
        "layers": [layer_json(r, served.train_load.get(r.name)) for r in routing],
        "timing_ms": {"model": round(model_ms, 2), "batch": batch_size},
    }


def layer_json(rec: SampleRouting, train_load: list[float] | None) -> dict[str, Any]:
    """One MoE FFN's routing of one request.

    positions [T]: patch index (row-major) for vision, text position (index into the
    question's tokens) for text; experts / weights [T][K]: the chosen experts, best first, and
    their mixing weights (-1 / 0 for an unused slot); load [E]: this request's share of
    token-expert assignments per expert (sums to 1); train_load [E] or None: the same, averaged
    over training.
    """
    kept = rec.indices[rec.indices >= 0]
    counts_E = torch.bincount(kept, minlength=rec.num_experts).float()
    return {
        "name": rec.name,
        "layer": rec.layer,
        "modality": rec.modality,
        "num_experts": rec.num_experts,
        "top_k": int(rec.indices.shape[1]),
        "positions": rec.positions.tolist(),
        "experts": rec.indices.tolist(),
        "weights": [[round(w, 4) for w in row] for row in rec.weights.tolist()],
        "load": [round(float(x), 4) for x in counts_E / counts_E.sum().clamp_min(1)],
        "train_load": train_load,
    }


def training_load(metrics: list[dict[str, Any]]) -> dict[str, list[float]]:
    """MoE FFN name → share per expert [E], the mean over every routing line of the training
    log (`{"kind": "routing", "layers": {name: {"share": [...]}}}`); lines of other kinds or
    of another shape are skipped (the log is informational)."""
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for line in metrics:
        layers = line.get("layers") if line.get("kind") == "routing" else None
        if not isinstance(layers, dict):
            continue
        for name, v in layers.items():
            share = v.get("share") if isinstance(v, dict) else None
            if not isinstance(share, list) or not all(isinstance(s, int | float) for s in share):
                continue
            if name in sums and len(sums[name]) != len(share):
                continue
            acc = sums.setdefault(name, [0.0] * len(share))
            sums[name] = [a + float(s) for a, s in zip(acc, share, strict=True)]
            counts[name] = counts.get(name, 0) + 1
    return {n: [round(s / counts[n], 4) for s in acc] for n, acc in sums.items()}


def png_data_url(image_CHW: torch.Tensor) -> str:
    """uint8 [3, S, S] → "data:image/png;base64,…": the image as the model saw it."""
    buf = io.BytesIO()
    Image.fromarray(image_CHW.permute(1, 2, 0).cpu().numpy()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def model_info(served: ServedModel) -> dict[str, Any]:
    """What /api/info says about one model: name, sizes, answers, MoE FFNs with colours."""
    from vlmoe.analysis.plots import expert_colors

    ck, cfg = served.checkpoint, served.checkpoint.config
    total, active = ck.model.param_counts() if hasattr(ck.model, "param_counts") else (0, 0)
    layers = []
    for layer in served.layers:
        rgb = expert_colors(layer["num_experts"])
        colors = ["#" + "".join(f"{round(255 * c):02x}" for c in col[:3]) for col in rgb]
        layers.append(
            {**layer, "colors": colors, "train_load": served.train_load.get(layer["name"])}
        )
    return {
        "id": served.id,
        "name": ck.path.name,
        "preset": cfg.preset,
        "task": "answer",
        "image_size": cfg.model.image_size,
        "patch_size": cfg.model.patch_size,
        "grid": served.grid,
        "max_text_len": cfg.model.max_text_len,
        "answers": list(ck.answers),
        "params_total": int(total),
        "params_active": int(active),
        "layers": layers,
    }
