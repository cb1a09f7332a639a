"""`GenerativeTask`: the MoE-LLaVA family as the trainer sees it (`vlmoe.train.Task`).

Data: a `VQASplit` (easy-VQA or JSONL ``{"image", "question", "answer"}``), answered in
words. In the stages named in ``model.captions`` a share of the questions is replaced by
captions: for easy-VQA, question i becomes "What is in the image?" → "a red triangle" about
the same image (colour and shape recovered per image from its questions), so every stage has the same
number of steps per epoch; other data has no captions and trains on its questions.
Stages named in ``model.moe_stages`` build the LM upcycled; `load_weights` copies a dense
checkpoint's FFN into every expert, so that stage starts exactly where the last one ended.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmoe.config import ConfigError, StageConfig
from vlmoe.data import VQASplit, load_data
from vlmoe.evaluate import EvalResult
from vlmoe.lm import CausalLM, ChatTokenizer, LMConfig, load_pretrained, upcycle
from vlmoe.train.task import load_matching, prepare_splits
from vlmoe.validate import check_batch_fits

from .config import LlavaConfig, LlavaRunConfig
from .data import (
    CAPTION_QUESTION,
    Example,
    collate,
    counterfactual_yes_no,
    normalize_answer,
    prompt_example,
    shard_order,
    split_texts,
    train_bpe,
)
from .model import LlavaModel, build_encoder, pooled_features

__all__ = ["GenerativeTask", "SplitData", "build_lm", "evaluate_generative", "upcycle_state"]


class SplitData:
    """A split with its tokenised examples and (frozen encoder) cached pooled features."""

    def __init__(self, split: VQASplit, tok: ChatTokenizer, features: torch.Tensor | None):
        self.split, self.features = split, features
        rows = split.image_index.tolist()
        self.examples = [prompt_example(tok, i, rows[i], q, a) for i, (q, a)
                         in enumerate(zip(split.questions, split.answers, strict=True))]  # fmt: skip

    def __len__(self) -> int:
        return len(self.examples)


def encode_split(encoder: nn.Module, split: VQASplit, cfg: LlavaConfig) -> torch.Tensor:
    """Pooled features ``[N, V, F]`` of every image of ``split``; for the pretrained encoder
    cached on disk under the vlmoe cache folder, keyed by the pixels and the settings (at 224
    px, EfficientNet-Lite0 takes ~2 minutes for easy-VQA's 4,000 training images)."""
    file = None
    if cfg.vision != "tiny":
        from vlmoe.lm.weights import cache_dir

        h = hashlib.sha256(split.images.numpy().tobytes())
        h.update(f"{cfg.vision}/{cfg.encoder_size}/{cfg.grid}".encode())
        file = cache_dir() / "features" / f"{h.hexdigest()[:20]}.pt"
        if file.is_file():
            return torch.load(file, weights_only=True)
    with torch.no_grad():
        out = torch.cat([pooled_features(encoder, split.images[i : i + 64], cfg)
                         for i in range(0, len(split.images), 64)])  # fmt: skip
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(file)
    return out


def build_lm(cfg: LlavaConfig, vocab_size: int, moe: bool, seed: int = 0) -> CausalLM:
    """The language model of a stage: SmolLM2 (pretrained) or a random LM of ``lm_dims``;
    upcycled (copies, new router) when ``moe``."""
    if cfg.lm == "smollm2":
        lm, _ = load_pretrained("smollm2")
    else:
        lm = CausalLM(LMConfig(vocab_size=vocab_size, **cfg.lm_dims))
    if moe:
        upcycle(lm, cfg.num_experts, cfg.top_k, cfg.moe_layers, cfg.load_balance_weight,
                router_std=cfg.router_std, seed=seed)  # fmt: skip
    return lm.train()


def upcycle_state(state: dict[str, torch.Tensor], own: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` with each dense FFN (``…ffn.w_in_DH`` / ``w_out_FD``) copied into all E
    experts where the model ``own`` (its state dict) has an MoE in that place."""
    out = dict(state)
    for key, v in state.items():
        for dense, experts in (("w_in_DH", "experts.w_in_EDH"), ("w_out_FD", "experts.w_out_EFD")):
            target = key.removesuffix(dense) + experts
            if key.endswith(".ffn." + dense) and target in own:
                out[target] = v[None].expand(own[target].shape[0], *v.shape).clone()
                del out[key]
    return out


class GenerativeTask:
    """MoE-LLaVA on a VQA split (see the module docstring)."""

    kind = "llava"

    def __init__(self, cfg: LlavaRunConfig, tokenizer: ChatTokenizer | None = None) -> None:
        self.cfg, m = cfg, cfg.model
        self.train_split, self.val_split = prepare_splits(cfg)  # type: ignore[arg-type]
        self.tokenizer = tokenizer or make_tokenizer(m, self.train_split)
        self.encoder = build_encoder(m) if m.freeze_vision else None
        self.train_data = self._data(self.train_split)
        self.val_data = self._data(self.val_split)
        self.captions = self._captions()
        self.stage: StageConfig | None = None
        self.lm_config: LMConfig | None = None

    def _data(self, split: VQASplit) -> SplitData:
        feats = None if self.encoder is None else encode_split(self.encoder, split, self.cfg.model)
        return SplitData(split, self.tokenizer, feats)

    def _captions(self) -> list[Example] | None:
        """Per training question, a caption example about its image (easy-VQA only; also
        keeps each image's (colour, shape) in ``self.attributes`` for `_example`)."""
        self.attributes: list[tuple[str, str]] | None = None
        self.image_words: list[list[int]] | None = None
        if self.cfg.data.lower() not in ("easy-vqa", "easyvqa", "easy_vqa"):
            return None
        from vlmoe.data.pairs import image_attributes

        attrs = self.attributes = image_attributes(self.train_split)
        # each image's caption words as the LM spells them inside a sentence (" red"); the
        # 24 (colour, shape) pairs are tokenised once, not once per image
        spelt = {(c, s): self.tokenizer.encode(f" {c}") + self.tokenizer.encode(f" {s}")
                 for c, s in set(attrs)}  # fmt: skip
        self.image_words = [spelt[a] for a in attrs]
        rows = self.train_split.image_index.tolist()
        return [prompt_example(self.tokenizer, i, r, CAPTION_QUESTION, "a {} {}".format(*attrs[r]))
                for i, r in enumerate(rows)]  # fmt: skip

    def build_model(self, stage: StageConfig) -> nn.Module:
        self.stage = stage
        m = self.cfg.model
        lm = build_lm(m, self.tokenizer.vocab_size, stage.name in m.moe_stages, self.cfg.train.seed)
        self.lm_config = lm.config
        return LlavaModel(m, lm, build_encoder(m))

    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = model.state_dict()
        if any(".ffn.experts." in k for k in state) and not any(".ffn.experts." in k for k in own):
            raise ConfigError("train.stages.init_from: that checkpoint is upcycled (MoE) and "
                              "this stage is dense; fine-tune it in an MoE stage "
                              "(e.g. vlmoe train --stage 3 --from DIR)")  # fmt: skip
        load_matching(model, upcycle_state(state, own))

    def batches_per_epoch(self, batch_size: int) -> int:
        check_batch_fits(len(self.train_split), batch_size, 1, self.train_split.source)
        return len(self.train_split) // batch_size

    def train_batches(
        self, batch_size: int, epoch: int, start: int, rank: int, world_size: int
    ) -> Iterator[Any]:
        d, t = self.train_data, self.cfg.train
        m = self.cfg.model
        share = m.captions.get(self.stage.name, 0.0) if self.stage is not None else 0.0
        for idx in shard_order(len(d), batch_size, t.seed, epoch, start, rank, world_size):
            exs = [self._example(i, epoch, share) for i in idx]
            words = self.image_words if m.align_words > 0 else None
            yield collate(exs, m.visual_tokens, self.tokenizer.pad_id, d.features,
                          d.split.images, image_words=words)  # fmt: skip

    def _example(self, i: int, epoch: int, share: float) -> Example:
        """Training example ``i`` of ``epoch``: its caption (with probability ``share``), its
        yes/no question re-drawn by `counterfactual_yes_no` (``model.balance_yes_no``), or
        the question as it is. A function of (seed, epoch, i): every rank and a resumed run
        see the same examples."""
        seed, d = self.cfg.train.seed, self.train_data
        if self.captions and caption_coin(seed, epoch, i, share):
            return self.captions[i]
        ex = d.examples[i]
        if not (self.cfg.model.balance_yes_no and self.attributes):
            return ex
        q, a = d.split.questions[i], d.split.answers[i]
        colour, shape = self.attributes[ex.image]
        q2, a2 = counterfactual_yes_no(q, a, colour, shape, uniforms(f"cf/{seed}/{epoch}/{i}"))
        return ex if (q2, a2) == (q, a) else prompt_example(self.tokenizer, i, ex.image, q2, a2)

    def evaluate(self, model: nn.Module, split: str, device: str) -> EvalResult | None:
        t = self.cfg.train
        if split == "val":
            data = self.val_data
        elif self.cfg.data.lower() == "easy-vqa":
            test = load_data("easy-vqa", "test", self.cfg.model.image_size)
            n = t.subset("test")
            data = self._data(test.subset(range(min(n, len(test)))) if n else test)
        else:
            return None
        if len(data) == 0:
            return None
        return evaluate_generative(model, data, self.tokenizer, t.eval_batch_size, device)

    def meta(self) -> dict[str, Any]:
        lm = self.lm_config.to_dict() if self.lm_config is not None else None
        return {"lm": lm, "eos_id": self.tokenizer.eos_id, "pad_id": self.tokenizer.pad_id}

    def write_assets(self, folder: Path) -> None:
        self.tokenizer.save(folder / "tokenizer.json")


def uniforms(key: str) -> tuple[float, float]:
    """Two numbers in [0, 1) drawn from a hash of ``key`` (no RNG state to carry)."""
    h = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return int.from_bytes(h[:8], "little") / 2**64, int.from_bytes(h[8:], "little") / 2**64


def caption_coin(seed: int, epoch: int, i: int, share: float) -> bool:
    """Whether example ``i`` of ``epoch`` is replaced by its caption: a hash of (seed, epoch,
    i) below ``share`` — the same on every rank and after a resume."""
    if share <= 0 or share >= 1:
        return share >= 1
    h = hashlib.blake2b(f"{seed}/{epoch}/{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < share


def make_tokenizer(cfg: LlavaConfig, train: VQASplit) -> ChatTokenizer:
    """SmolLM2's tokenizer, or a BPE trained on the training texts (``tokenizer="bpe"``)."""
    if cfg.tokenizer == "smollm2":
        return load_pretrained("smollm2")[1]
    return train_bpe(split_texts(train), cfg.bpe_vocab)


@torch.no_grad()
def evaluate_generative(
    model: nn.Module, data: SplitData, tok: ChatTokenizer, batch_size: int = 64,
    device: str | torch.device = "cpu", on_answer: Any = None, generate_all: bool = False,
) -> EvalResult:  # fmt: skip
    """Normalised exact match of the greedy answers to the reference answers, overall and
    per question kind; ``loss`` is the teacher-forced cross-entropy per answer token.
    ``on_answer(index, text)`` sees each answer.

    One teacher-forced forward per batch gives the loss and, per row, whether the argmax
    at every answer position (its end-of-turn included) is the reference token. Greedy
    decoding of such a row writes exactly the reference, so only the other rows are decoded
    (KV cache, batched, left padded): at 97% accuracy that is 3% of the generation work.
    ``generate_all`` decodes every row (the slow reference; equal up to float rounding).
    """
    was = model.training
    model.eval()
    V, ex = model.cfg.visual_tokens, data.examples
    limit = model.cfg.max_answer_tokens
    hits, loss_sum, tokens = torch.zeros(len(ex)), 0.0, 0
    for s in range(0, len(ex), batch_size):
        part = ex[s : s + batch_size]
        tf = collate(part, V, tok.pad_id, data.features, data.split.images).to(device)
        out = model(tf)
        n = int(out.metrics["count"])
        loss_sum, tokens = loss_sum + float(out.task_loss) * n, tokens + n
        sure = _greedy_is_reference(out.logits, tf.labels) & ~torch.tensor(
            [generate_all or len(e.answer) - 1 > limit for e in part]
        )
        for e, ok in zip(part, sure.tolist(), strict=True):
            if ok:
                hits[e.index] = 1.0
                if on_answer is not None:
                    on_answer(e.index, tok.decode(e.answer[:-1]))
        rest = [e for e, ok in zip(part, sure.tolist(), strict=True) if not ok]
        if rest:
            _generate_and_score(model, rest, data, tok, device, hits, on_answer)
    model.train(was)
    return _result(hits, loss_sum / max(tokens, 1), data.split.kinds)


def _greedy_is_reference(logits_NV: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: every target position of the row has its target as the argmax (the
    LM's ``logits`` hold the N target positions of ``labels`` in row-major order)."""
    sel = labels_BL[:, 1:] != -100
    wrong = (logits_NV.argmax(-1) != labels_BL[:, 1:][sel]).float()
    rows = sel.nonzero()[:, 0]
    misses = torch.zeros(labels_BL.shape[0], device=wrong.device).index_add_(0, rows, wrong)
    return (misses == 0).cpu()


def _generate_and_score(
    model: nn.Module, part: list[Example], data: SplitData, tok: ChatTokenizer,
    device: str | torch.device, hits: torch.Tensor, on_answer: Any,
) -> None:  # fmt: skip
    """Greedy answers of ``part`` (left-padded prompts, KV cache); marks ``hits``."""
    prompts = [Example(e.index, e.image, e.before, e.after, None) for e in part]
    b = collate(prompts, model.cfg.visual_tokens, tok.pad_id, data.features, data.split.images,
                left_pad=True)  # fmt: skip
    for e, ids in zip(part, model.generate(b.to(device), tok.eos_id, tok.pad_id), strict=True):
        text = tok.decode(ids)
        hits[e.index] = float(
            normalize_answer(text) == normalize_answer(data.split.answers[e.index])
        )
        if on_answer is not None:
            on_answer(e.index, text)


def _result(hits: torch.Tensor, loss: float, kinds: list[str]) -> EvalResult:
    per: dict[str, dict[str, float]] = {}
    for k in sorted(set(kinds)):
        sel = torch.tensor([x == k for x in kinds])
        per[k] = {"accuracy": float(hits[sel].mean()), "n": int(sel.sum())}
    acc = float(hits.mean()) if len(hits) else 0.0
    return EvalResult(acc, loss, len(hits), 0, per)
