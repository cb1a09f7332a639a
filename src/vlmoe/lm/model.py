"""A LLaMA-family causal decoder whose FFNs are dense or ``vlmoe.moe.MoE``.

Shape legend: B batch, L query positions, P cached (past) positions, D model dim, H query
heads, G key-value heads (GQA, H % G == 0), Dh head dim, V vocabulary, N target positions.

Architecture (SmolLM2 / LLaMA): token embedding → n_layers × [x + Attn(RMSNorm(x)),
x + FFN(RMSNorm(x))] → RMSNorm → LM head (tied to the embedding by default). Attention uses
rotate-half RoPE (θ from the config) and grouped-query attention; the FFN is SwiGLU with the
``vlmoe.moe`` expert layout (``w_in_DH = [gate ‖ up]``, ``w_out_FD``), so a dense FFN copies
into experts without reshuffling (``vlmoe.lm.upcycle``).

``CausalLM.forward`` takes token ids or input embeddings (image tokens can be prepended), an
optional padding mask and an optional ``KVCache``, and returns ``ModelOutput``. With labels, the
vocabulary head runs only at positions whose target is not -100: on a CPU the [.., 49k] head
is most of the cost of a short answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmoe.models.output import ModelOutput, RoutingRecord
from vlmoe.moe import DenseFFN, MoE, MoEConfig, dense_ffn

__all__ = ["CausalLM", "KVCache", "LMConfig", "LMMoEConfig"]


@dataclass
class LMMoEConfig:
    """Which decoder layers carry an MoE FFN, and that MoE's settings."""

    layers: list[int] = field(default_factory=list)
    """Decoder layer indices with an MoE FFN (the others stay dense)."""
    num_experts: int = 4
    """Routed experts E per MoE layer."""
    top_k: int = 2
    """Experts per token k."""
    d_ff: int | None = None
    """Hidden size of each expert; None = the dense ``d_ff`` (copy upcycling)."""
    router: str = "softmax"
    """A ``vlmoe.moe`` router name."""
    normalize_top_k: bool = True
    """Renormalise the k weights to sum to 1 (needed for upcycled == dense at step 0)."""
    load_balance_weight: float = 0.01
    """Switch balance-loss weight (MoE-LLaVA: 0.01)."""
    z_loss_weight: float = 0.0
    """Router z-loss weight (MoE-LLaVA uses none)."""

    def moe_config(self, d_model: int, dense_d_ff: int) -> MoEConfig:
        """The ``MoEConfig`` of one MoE layer of a decoder with these dims."""
        return MoEConfig(
            d_model=d_model,
            d_ff=self.d_ff or dense_d_ff,
            num_experts=self.num_experts,
            top_k=self.top_k,
            router=self.router,
            normalize_top_k=self.normalize_top_k,
            load_balance_weight=self.load_balance_weight,
            z_loss_weight=self.z_loss_weight,
        )


@dataclass
class LMConfig:
    """Dimensions of a LLaMA-family decoder (SmolLM2-135M: 49152, 576, 30, 9, 3, 1536, 1e5)."""

    vocab_size: int
    """Vocabulary size V."""
    d_model: int
    """Model dim D."""
    n_layers: int
    """Decoder layers."""
    n_heads: int
    """Query heads H."""
    n_kv_heads: int
    """Key-value heads G (GQA); must divide ``n_heads``."""
    d_ff: int
    """Dense SwiGLU hidden size F."""
    rope_theta: float = 10000.0
    """RoPE base θ."""
    norm_eps: float = 1e-5
    """RMSNorm ε."""
    max_seq_len: int = 2048
    """Context length (size of the RoPE table; prompts plus answers must fit)."""
    tie_embeddings: bool = True
    """LM head shares the token-embedding matrix."""
    moe: LMMoEConfig | None = None
    """MoE FFN layers (None: all dense)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: must be a positive int, got {v!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model: {self.d_model} must split into {self.n_heads} even heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} must divide n_heads {self.n_heads}")
        if isinstance(self.moe, dict):
            self.moe = LMMoEConfig(**self.moe)
        bad = [i for i in (self.moe.layers if self.moe else []) if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"moe.layers: {bad} outside 0..{self.n_layers - 1}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``LMConfig(**d)`` rebuilds it."""
        return dataclasses.asdict(self)


class KVCache:
    """Preallocated keys and values of every layer: ``[n_layers, B, G, max_len, Dh]`` each.

    ``length`` is the number of cached positions P; ``CausalLM.forward`` appends to it.
    """

    def __init__(
        self, config: LMConfig, batch: int, max_len: int, dtype: torch.dtype, device: Any = None
    ) -> None:
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k_BGLd: Tensor, v_BGLd: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values; return all of them so far ``[B, G, P+L, Dh]`` (views)."""
        s, n = self.length, k_BGLd.shape[2]
        if s + n > self.max_len:
            raise ValueError(f"KV cache: {s + n} positions exceed its size {self.max_len}")
        self.k[layer, :, :, s : s + n] = k_BGLd
        self.v[layer, :, :, s : s + n] = v_BGLd
        return self.k[layer, :, :, : s + n], self.v[layer, :, :, : s + n]


def rope_table(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """``cos, sin [max_len, Dh]`` for rotate-half RoPE (each frequency used for both halves)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x_BHLd: Tensor, cos_BLd: Tensor, sin_BLd: Tensor) -> Tensor:
    """Rotate-half RoPE: ``x·cos + rotate_half(x)·sin`` with per-sample positions."""
    x1, x2 = x_BHLd.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos_BLd[:, None].to(x_BHLd.dtype), sin_BLd[:, None].to(x_BHLd.dtype)
    return x_BHLd * cos + rot * sin


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` that normalises in fp32 whatever the input dtype (as LLaMA's reference).

    Why: in bf16 the mean of squares loses enough precision that SmolLM2's greedy answers
    change (measured: bf16 statistics turned "The capital of France is Paris." into noise).
    """

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), self.normalized_shape, None, self.eps)
        return y.to(x.dtype) * self.weight


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE: ``wq [H·Dh, D]``, ``wk``/``wv [G·Dh, D]``."""

    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.h, self.g, self.dh = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)

    def forward(self, x_BLD: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                cache: KVCache | None, layer: int) -> Tensor:  # fmt: skip
        """``x [B, L, D] -> [B, L, D]``; ``mask`` bool ``[B, 1, L, P+L]`` (True = attend) or
        None for a plain causal pass without past."""
        B, L, _ = x_BLD.shape
        q = self.wq(x_BLD).view(B, L, self.h, self.dh).transpose(1, 2)
        k = self.wk(x_BLD).view(B, L, self.g, self.dh).transpose(1, 2)
        v = self.wv(x_BLD).view(B, L, self.g, self.dh).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if L == 1:
            o = self._decode_attention(q, k, v, mask)
        else:
            causal = mask is None
            o = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, L, self.h * self.dh))

    def _decode_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """One query position, as two small batched matmuls over the G key-value groups.

        Why not SDPA: on CPU its kernel costs ~20 ms per call for one query against a strided
        cache view (measured, torch 2.13), 10× the rest of the layer.
        """
        B, _, _, dh = q.shape
        q_BGRd = q.reshape(B, self.g, self.h // self.g, dh)
        s_BGRS = torch.matmul(q_BGRd, k.transpose(-1, -2)) * dh**-0.5
        if mask is not None:  # [B, 1, 1, S] -> broadcast over groups and heads
            s_BGRS = s_BGRS.masked_fill(~mask, float("-inf"))
        o_BGRd = torch.matmul(torch.softmax(s_BGRS.float(), -1).to(v.dtype), v)
        return o_BGRd.reshape(B, self.h, 1, dh)


class Block(nn.Module):
    """Pre-norm decoder layer: attention then a dense ``DenseFFN`` or an ``MoE`` FFN."""

    def __init__(self, c: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.attn = Attention(c)
        self.ffn_norm = RMSNorm(c.d_model, eps=c.norm_eps)
        moe = c.moe is not None and layer in c.moe.layers
        self.ffn: nn.Module = (
            MoE(c.moe.moe_config(c.d_model, c.d_ff)) if moe else DenseFFN(c.d_model, c.d_ff)
        )

    def ffn_forward(self, h_BLD: Tensor, mask_BL: Tensor | None, full: bool) -> tuple[Tensor, Any]:
        """FFN output and the ``MoEOutput`` (None when dense, or for the fast inference path).

        ``full=False`` skips the MoE's aux losses and statistics (route + experts only): what
        generation wants, since neither is used there.
        """
        if isinstance(self.ffn, DenseFFN):
            return self.ffn(h_BLD), None
        if full:
            out = self.ffn(h_BLD, token_mask=mask_BL)
            return out.output, out
        x_TD = h_BLD.reshape(-1, h_BLD.shape[-1])
        d, _, _ = self.ffn.route(x_TD)
        if x_TD.shape[0] <= FEW_TOKENS and not torch.is_grad_enabled():
            return _few_token_experts(self.ffn, x_TD, d.indices, d.weights).view_as(h_BLD), None
        return self.ffn.experts(x_TD, d.indices, d.weights).view_as(h_BLD), None


FEW_TOKENS = 8


def _few_token_experts(moe: MoE, x_TD: Tensor, idx_TK: Tensor, w_TK: Tensor) -> Tensor:
    """``Σ_k w·FFN_e(x)`` looping over the experts actually chosen (decode-time fast path).

    For one decoding token the sort/grouped-matmul machinery costs more than the two matrix
    products it organises (measured 5.5 ms vs 4.0 ms per layer, D 576, F 1536, 1 thread).
    """
    ex = moe.experts
    y_TD = torch.zeros_like(x_TD)
    for e in idx_TK.unique().tolist():
        if e < 0:
            continue
        tok, slot = torch.where(idx_TK == e)
        y_ND = dense_ffn(x_TD[tok], ex.w_in_EDH[e], ex.w_out_EFD[e], ex.activation)
        y_TD.index_add_(0, tok, y_ND * w_TK[tok, slot, None].to(y_ND.dtype))
    return y_TD


class CausalLM(nn.Module):
    """LLaMA-family decoder with dense or MoE FFNs (see the module docstring).

    State dict: ``embed.weight [V, D]``, ``layers.{i}.{attn_norm, ffn_norm}.weight``,
    ``layers.{i}.attn.{wq, wk, wv, wo}.weight``, ``layers.{i}.ffn.*`` (``DenseFFN`` or
    ``MoE``), ``norm.weight``, and ``lm_head.weight`` only when embeddings are untied.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        cos, sin = rope_table(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ------------------------------------------------------------------ pieces
    def head(self, h_ND: Tensor) -> Tensor:
        """Vocabulary logits ``[..., D] -> [..., V]`` (tied: the embedding matrix)."""
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h_ND, w)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty ``KVCache`` for ``batch`` rows and up to ``max_len`` positions."""
        p = self.embed.weight
        return KVCache(self.config, batch, max_len, p.dtype, p.device)

    def _positions(self, B: int, L: int, past: int, attention_mask: Tensor | None) -> Tensor:
        """Position ids ``[B, L]``: count of real tokens before each one (left padding safe)."""
        if attention_mask is None:
            return torch.arange(past, past + L, device=self.rope_cos.device).expand(B, L)
        pos = attention_mask.long().cumsum(-1) - 1
        return pos[:, past : past + L].clamp_min(0)

    @staticmethod
    def _mask(attention_mask: Tensor | None, B: int, L: int, past: int) -> Tensor | None:
        """Bool ``[B, 1, L, P+L]`` causal ∧ not-padding, or None when plain causal will do."""
        if attention_mask is None and (past == 0 or L == 1):
            return None  # SDPA's own causal flag (L > 1) or no mask at all (one new token)
        S = past + L
        dev = attention_mask.device if attention_mask is not None else None
        qpos = torch.arange(past, S, device=dev)[:, None]
        kpos = torch.arange(S, device=dev)[None, :]
        m = (kpos <= qpos)[None, None].expand(B, 1, L, S)
        if attention_mask is not None:
            m = m & attention_mask[:, None, None, :S].bool()
            # a padding query would see no key at all (NaN rows): let it see itself
            m = m | (kpos == qpos)[None, None]
        return m

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        routing: bool = True,
        modality: str = "text",
    ) -> ModelOutput:
        """Run the decoder on ``input_ids [B, L]`` or ``inputs_embeds [B, L, D]``.

        attention_mask  [B, P+L] (1 = real token, 0 = padding) over cached and new positions
        labels          [B, L] next-token targets aligned with the inputs (shifted inside;
                        -100 = no loss). Then ``logits`` is ``[N, V]`` at the N target
                        positions only, ``task_loss`` their mean cross-entropy, ``metrics``
                        ``{"correct", "count"}`` token sums. Without labels ``logits`` is
                        ``[B, L, V]`` (``[B, 1, V]`` with ``last_only``).
        cache           a ``KVCache`` holding P past positions; the new ones are appended
        routing         collect MoE aux losses and ``RoutingRecord``s (False: inference fast
                        path, ``aux_loss`` 0, no records; ignored in training mode)
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, _ = x.shape
        past = 0 if cache is None else cache.length
        pos = self._positions(B, L, past, attention_mask)
        rope = (self.rope_cos[pos], self.rope_sin[pos])
        mask = self._mask(attention_mask, B, L, past)
        full = routing or self.training
        mask_BL = None if attention_mask is None else attention_mask[:, past : past + L].bool()
        aux = x.new_zeros((), dtype=torch.float32)
        records: list[RoutingRecord] = []
        for blk in self.layers:
            x = x + blk.attn(blk.attn_norm(x), rope, mask, cache, blk.layer)
            y, moe_out = blk.ffn_forward(blk.ffn_norm(x), mask_BL, full)
            x = x + y
            if moe_out is not None:
                aux = aux + moe_out.aux_loss
                records.append(self._record(blk.layer, modality, moe_out, B, L, past))
        if cache is not None:
            cache.length += L
        h = self.norm(x[:, -1:] if last_only and labels is None else x)
        if labels is None:
            return ModelOutput(None, None, aux, self.head(h), records)
        return self._with_loss(h, labels, aux, records)

    def _record(
        self, layer: int, modality: str, out: Any, B: int, L: int, past: int
    ) -> RoutingRecord:
        b = torch.arange(B).repeat_interleave(L)
        p = torch.arange(past, past + L).repeat(B)
        return RoutingRecord(layer, modality, out.stats, out.routing, torch.stack([b, p], 1))

    def _with_loss(self, h_BLD: Tensor, labels: Tensor, aux: Tensor, records: list) -> ModelOutput:
        tgt_BL = labels[:, 1:]
        sel = tgt_BL != -100
        logits_NV = self.head(h_BLD[:, :-1][sel])
        tgt_N = tgt_BL[sel]
        if tgt_N.numel() == 0:  # no targets: a zero loss that still reaches every parameter
            task = h_BLD.sum() * 0.0
        else:
            task = F.cross_entropy(logits_NV.float(), tgt_N)
        correct = (logits_NV.argmax(-1) == tgt_N).sum().detach()
        count = torch.tensor(tgt_N.numel())
        metrics = {"correct": correct, "count": count}
        return ModelOutput(task + aux, task, aux, logits_NV, records, metrics)

    # ------------------------------------------------------------------ accounting
    def moe_layers(self) -> list[int]:
        """Indices of the layers whose FFN is an ``MoE``."""
        return [b.layer for b in self.layers if isinstance(b.ffn, MoE)]

    def param_counts(self) -> tuple[int, int]:
        """``(total, active_per_token)`` parameters (active counts k experts per MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        for b in self.layers:
            if isinstance(b.ffn, MoE):
                t, a = b.ffn.param_counts()
                active -= t - a
        return total, active
