"""Hugging Face ``transformers`` interop for ``CausalLM`` (optional dependency).

A dense model exports as ``LlamaForCausalLM``; an upcycled one as ``MixtralForCausalLM``.
Mixtral has an MoE in every layer, vlmoe's upcycled model only in some: a dense layer is
written as E identical experts (any router then gives ``Σ_k w_k·FFN(x) = FFN(x)``, since the
top-k weights are renormalised), and config.json lists those layers in
``vlmoe_dense_layers``, so that `from_hf` turns them back into dense FFNs. Weights are mapped
in memory on the model objects, and the files are written and read by ``transformers``
itself (whose on-disk Mixtral layout differs from its in-memory one).

Name map (ours → transformers): ``embed`` → ``model.embed_tokens``; ``layers.i.attn.w{q,k,v,o}``
→ ``model.layers.i.self_attn.{q,k,v,o}_proj``; ``attn_norm`` / ``ffn_norm`` →
``input_layernorm`` / ``post_attention_layernorm``; dense ``ffn.w_in_DH [D, 2F]`` (gate ‖ up)
→ ``mlp.{gate,up}_proj [F, D]``, ``ffn.w_out_FD`` → ``mlp.down_proj``ᵀ; MoE ``ffn.router``
→ ``mlp.gate``, ``experts.w_in_EDH`` → ``mlp.experts.gate_up_proj``ᵀ, ``w_out_EFD`` →
``mlp.experts.down_proj``ᵀ; ``norm`` → ``model.norm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .model import CausalLM, LMConfig, LMMoEConfig
from .tokenizer import ChatTokenizer

__all__ = ["from_hf", "hf_config", "load_hf", "save_hf", "to_hf"]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hf_config(c: LMConfig) -> Any:
    """The ``LlamaConfig`` (dense) or ``MixtralConfig`` (any MoE layer) of ``c``."""
    import transformers

    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        rope_theta=c.rope_theta, head_dim=c.head_dim,
    )  # fmt: skip
    if c.moe is None or not c.moe.layers:
        return transformers.LlamaConfig(intermediate_size=c.d_ff, **common)
    m = c.moe
    if m.d_ff not in (None, c.d_ff) or m.router != "softmax" or not m.normalize_top_k:
        raise ValueError("moe: Mixtral needs copy-sized experts, a softmax router and "
                         "renormalised top-k weights")  # fmt: skip
    dense = [i for i in range(c.n_layers) if i not in m.layers]
    cfg = transformers.MixtralConfig(
        intermediate_size=c.d_ff, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.load_balance_weight / m.top_k, sliding_window=None, **common,
    )  # fmt: skip
    cfg.vlmoe_dense_layers = dense
    return cfg


def _layer_to_hf(sd: dict, i: int, c: LMConfig, E: int | None) -> dict[str, torch.Tensor]:
    p, h = f"layers.{i}.", f"model.layers.{i}."
    out = {h + f"self_attn.{t}_proj.weight": sd[p + f"attn.w{t}.weight"] for t in "qkvo"}
    out[h + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
    out[h + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    if p + "ffn.w_in_DH" in sd:  # dense
        w_in, w_out = sd[p + "ffn.w_in_DH"], sd[p + "ffn.w_out_FD"]
        if E is None:
            out[h + "mlp.gate_proj.weight"] = w_in[:, : c.d_ff].t()
            out[h + "mlp.up_proj.weight"] = w_in[:, c.d_ff :].t()
            out[h + "mlp.down_proj.weight"] = w_out.t()
            return out
        # a dense layer in Mixtral: E identical experts, a zero router
        w_in, w_out = w_in.expand(E, *w_in.shape), w_out.expand(E, *w_out.shape)
        router = torch.zeros(E, c.d_model, dtype=w_in.dtype)
    else:
        w_in, w_out = sd[p + "ffn.experts.w_in_EDH"], sd[p + "ffn.experts.w_out_EFD"]
        router = sd[p + "ffn.router.weight"]
    out[h + "mlp.gate.weight"] = router
    out[h + "mlp.experts.gate_up_proj"] = w_in.transpose(1, 2)
    out[h + "mlp.experts.down_proj"] = w_out.transpose(1, 2)
    return out


@torch.no_grad()
def to_hf(lm: CausalLM) -> Any:
    """A ``transformers`` model (fp32, eval) computing the same logits as ``lm``."""
    import transformers

    c, sd = lm.config, {k: v.detach().float() for k, v in lm.state_dict().items()}
    hc = hf_config(c)
    E = hc.num_local_experts if isinstance(hc, transformers.MixtralConfig) else None
    cls = transformers.MixtralForCausalLM if E else transformers.LlamaForCausalLM
    hf = cls(hc).float().eval()
    new = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not c.tie_embeddings:
        new["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layers):
        new.update(_layer_to_hf(sd, i, c, E))
    missing, unexpected = hf.load_state_dict(new, strict=False)
    left = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    if left or unexpected:
        raise ValueError(f"export: unmatched weights {left[:3]} {unexpected[:3]}")
    if c.tie_embeddings:
        hf.tie_weights()
    return hf


def _config_from_hf(hc: Any) -> LMConfig:
    moe = None
    if getattr(hc, "num_local_experts", None):
        dense = set(getattr(hc, "vlmoe_dense_layers", []) or [])
        moe = LMMoEConfig(
            layers=[i for i in range(hc.num_hidden_layers) if i not in dense],
            num_experts=hc.num_local_experts, top_k=hc.num_experts_per_tok,
            load_balance_weight=float(hc.router_aux_loss_coef) * hc.num_experts_per_tok,
        )  # fmt: skip
    rope = getattr(hc, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))
    return LMConfig(
        vocab_size=hc.vocab_size, d_model=hc.hidden_size, n_layers=hc.num_hidden_layers,
        n_heads=hc.num_attention_heads, n_kv_heads=hc.num_key_value_heads,
        d_ff=hc.intermediate_size, rope_theta=float(theta), norm_eps=hc.rms_norm_eps,
        max_seq_len=hc.max_position_embeddings,
        tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)), moe=moe,
    )  # fmt: skip


@torch.no_grad()
def from_hf(hf: Any) -> CausalLM:
    """A ``CausalLM`` from a ``LlamaForCausalLM`` / ``MixtralForCausalLM`` (the inverse of
    `to_hf`; a Mixtral layer named in ``vlmoe_dense_layers`` becomes dense, from expert 0)."""
    c = _config_from_hf(hf.config)
    sd, new = hf.state_dict(), {}
    new["embed.weight"], new["norm.weight"] = (
        sd["model.embed_tokens.weight"],
        sd["model.norm.weight"],
    )
    if not c.tie_embeddings:
        new["lm_head.weight"] = sd["lm_head.weight"]
    moe_layers = set(c.moe.layers) if c.moe else set()
    for i in range(c.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        for t in "qkvo":
            new[p + f"attn.w{t}.weight"] = sd[h + f"self_attn.{t}_proj.weight"]
        new[p + "attn_norm.weight"] = sd[h + "input_layernorm.weight"]
        new[p + "ffn_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
        if h + "mlp.gate_proj.weight" in sd:
            gate, up = sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]
            new[p + "ffn.w_in_DH"] = torch.cat([gate, up]).t()
            new[p + "ffn.w_out_FD"] = sd[h + "mlp.down_proj.weight"].t()
        elif i in moe_layers:
            new[p + "ffn.router.weight"] = sd[h + "mlp.gate.weight"]
            new[p + "ffn.experts.w_in_EDH"] = sd[h + "mlp.experts.gate_up_proj"].transpose(1, 2)
            new[p + "ffn.experts.w_out_EFD"] = sd[h + "mlp.experts.down_proj"].transpose(1, 2)
        else:
            new[p + "ffn.w_in_DH"] = sd[h + "mlp.experts.gate_up_proj"][0].t()
            new[p + "ffn.w_out_FD"] = sd[h + "mlp.experts.down_proj"][0].t()
    lm = CausalLM(c)
    own = lm.state_dict()  # buffers Mixtral has no counterpart for (router bias) keep theirs
    own.update({k: v.contiguous().float() for k, v in new.items()})
    lm.load_state_dict(own)
    return lm.eval()


def save_hf(lm: CausalLM, folder: str | Path, tokenizer: ChatTokenizer | None = None) -> Any:
    """Write ``lm`` (and its tokenizer, with the ChatML template) as a ``transformers``
    folder that ``AutoModelForCausalLM.from_pretrained`` loads. Returns the HF model."""
    hf = to_hf(lm)
    hf.save_pretrained(str(folder))
    if tokenizer is not None:
        from transformers import PreTrainedTokenizerFast

        tok = tokenizer.tokenizer
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=tok.id_to_token(tokenizer.eos_id),
            pad_token=tok.id_to_token(tokenizer.pad_id),
        )  # fmt: skip
        fast.chat_template = CHATML_TEMPLATE
        fast.save_pretrained(str(folder))
    return hf


def load_hf(folder: str | Path) -> tuple[CausalLM, ChatTokenizer | None]:
    """A ``CausalLM`` (and its tokenizer, if the folder has one) from a ``transformers``
    Llama or Mixtral folder."""
    import transformers
    from tokenizers import Tokenizer

    transformers.utils.logging.disable_progress_bar()  # stderr is for one-line errors
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    lm = from_hf(hf)
    tok = None
    if (Path(folder) / "tokenizer.json").is_file():
        t = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
        eos = fast.eos_token_id if fast.eos_token_id is not None else 0
        pad = fast.pad_token_id if fast.pad_token_id is not None else eos
        tok = ChatTokenizer(t, int(eos), int(pad))
    return lm, tok
