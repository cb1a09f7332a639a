"""Read a LLaMA-family GGUF file into our decoder's config, state dict and tokenizer data.

Uses the ``gguf`` package (the llama.cpp project's own reader). Quantised tensors (Q4_1,
Q8_0, …; whatever ``gguf.quants`` dequantises) become fp32. Two llama.cpp conventions are
undone here:

* GGUF lists a tensor's dims innermost first (``[in, out]``); the torch shape is the reverse.
* llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` so that its RoPE rotates
  adjacent pairs: within each head the rows ``[2, hd/2]`` are stored as ``[hd/2, 2]``. We use
  the rotate-half RoPE, so the rows are put back (``unpermute_qk``).

Names map to ``vlmoe.lm.model.CausalLM``'s state dict (``gguf_to_state_dict``); the FFN's gate
and up projections are stored as one ``w_in_DH = [gate ‖ up]`` (the layout of
``vlmoe.moe.DenseFFN`` and of every ``vlmoe.moe`` expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmoe.data.errors import one_line

from .errors import WeightsError
from .model import LMConfig

__all__ = [
    "GGUFContents",
    "TokenizerData",
    "gguf_to_state_dict",
    "permute_qk",
    "read_gguf",
    "unpermute_qk",
    "write_gguf",
]

SUPPORTED_ARCHS = ("llama",)


@dataclass
class TokenizerData:
    """The tokenizer as a GGUF file stores it (``tokenizer.ggml.*``)."""

    model: str
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None


@dataclass
class GGUFContents:
    """What ``read_gguf`` returns: decoder config, fp32 state dict, tokenizer data."""

    config: LMConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: TokenizerData


def _open(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises many kinds on a truncated/corrupt file
        raise WeightsError(f"{path}: corrupt or truncated GGUF file ({one_line(e)})") from None


def _field(reader: Any, path: Path, key: str, default: Any = ...) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise WeightsError(f"{path}: GGUF metadata lacks {key!r}")
        return default
    return f.contents()


def _f32(v: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5, not
    9.999999747e-06), so configs written from Python values read back equal."""
    return float(str(np.float32(v)))


def config_from_metadata(reader: Any, path: Path) -> LMConfig:
    """``LMConfig`` from ``general.architecture`` and the ``{arch}.*`` fields."""
    arch = _field(reader, path, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise WeightsError(
            f"{path}: GGUF architecture {arch!r} is not supported, expected one of {SUPPORTED_ARCHS}"
        )
    n_vocab = _field(reader, path, f"{arch}.vocab_size", None)
    if n_vocab is None:
        n_vocab = len(_field(reader, path, "tokenizer.ggml.tokens"))
    names = [t.name for t in reader.tensors]
    return LMConfig(
        vocab_size=int(n_vocab),
        d_model=int(_field(reader, path, f"{arch}.embedding_length")),
        n_layers=int(_field(reader, path, f"{arch}.block_count")),
        n_heads=int(_field(reader, path, f"{arch}.attention.head_count")),
        n_kv_heads=int(_field(reader, path, f"{arch}.attention.head_count_kv")),
        d_ff=int(_field(reader, path, f"{arch}.feed_forward_length")),
        rope_theta=_f32(_field(reader, path, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=_f32(_field(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        max_seq_len=int(_field(reader, path, f"{arch}.context_length", 2048)),
        tie_embeddings="output.weight" not in names,
    )


def tokenizer_from_metadata(reader: Any, path: Path) -> TokenizerData:
    """The ``tokenizer.ggml.*`` fields (vocabulary, merges, types, special ids, template)."""
    tokens = list(_field(reader, path, "tokenizer.ggml.tokens"))
    return TokenizerData(
        model=str(_field(reader, path, "tokenizer.ggml.model")),
        tokens=tokens,
        merges=list(_field(reader, path, "tokenizer.ggml.merges", [])),
        token_types=[int(t) for t in _field(reader, path, "tokenizer.ggml.token_type", [])],
        bos_id=_field(reader, path, "tokenizer.ggml.bos_token_id", None),
        eos_id=_field(reader, path, "tokenizer.ggml.eos_token_id", None),
        pad_id=_field(reader, path, "tokenizer.ggml.padding_token_id", None),
        chat_template=_field(reader, path, "tokenizer.chat_template", None),
    )


def unpermute_qk(w_OD: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: per head, rows ``[hd/2, 2]`` → ``[2, hd/2]``.

    ``w_OD [n_head·hd, D]``; returns a new contiguous tensor of the same shape.
    """
    R, D = w_OD.shape
    return w_OD.reshape(n_head, R // n_head // 2, 2, D).transpose(1, 2).reshape(R, D).contiguous()


def permute_qk(w_OD: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation (the inverse of ``unpermute_qk``), for writing GGUF files."""
    R, D = w_OD.shape
    return w_OD.reshape(n_head, 2, R // n_head // 2, D).transpose(1, 2).reshape(R, D).contiguous()


def _dequantize(t: Any, path: Path) -> torch.Tensor:
    import gguf

    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise WeightsError(
            f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}"
        ) from None
    shape = tuple(int(s) for s in reversed(t.shape))
    # F32 tensors come back as read-only views of the memory-mapped file: copy them
    arr = np.array(arr, dtype=np.float32, copy=True).reshape(shape)
    return torch.from_numpy(arr)


def gguf_to_state_dict(
    raw: dict[str, torch.Tensor], config: LMConfig, path: Path
) -> dict[str, torch.Tensor]:
    """Rename llama.cpp tensors (torch-shaped, fp32) to ``CausalLM`` state-dict entries."""
    sd: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise WeightsError(f"{path}: GGUF file lacks tensor {name!r}")
        return raw[name]

    sd["embed.weight"] = take("token_embd.weight")
    sd["norm.weight"] = take("output_norm.weight")
    if not config.tie_embeddings:
        sd["lm_head.weight"] = take("output.weight")
    for i in range(config.n_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        sd[p + "attn_norm.weight"] = take(b + "attn_norm.weight")
        sd[p + "ffn_norm.weight"] = take(b + "ffn_norm.weight")
        sd[p + "attn.wq.weight"] = unpermute_qk(take(b + "attn_q.weight"), config.n_heads)
        sd[p + "attn.wk.weight"] = unpermute_qk(take(b + "attn_k.weight"), config.n_kv_heads)
        sd[p + "attn.wv.weight"] = take(b + "attn_v.weight")
        sd[p + "attn.wo.weight"] = take(b + "attn_output.weight")
        gate_FD, up_FD = take(b + "ffn_gate.weight"), take(b + "ffn_up.weight")
        sd[p + "ffn.w_in_DH"] = torch.cat([gate_FD, up_FD], 0).t().contiguous()
        sd[p + "ffn.w_out_FD"] = take(b + "ffn_down.weight").t().contiguous()
    return sd


def read_gguf(path: str | Path) -> GGUFContents:
    """Read a LLaMA-family GGUF file: config, fp32 state dict for ``CausalLM``, tokenizer data.

    Raises ``WeightsError`` (one line naming the file) for a missing, non-GGUF, truncated or
    corrupt file, an unsupported architecture or tensor type, or a missing tensor.
    """
    path = Path(path)
    reader = _open(path)
    config = config_from_metadata(reader, path)
    tok = tokenizer_from_metadata(reader, path)
    try:
        raw = {t.name: _dequantize(t, path) for t in reader.tensors}
    except (ValueError, IndexError) as e:  # data shorter than the header promised
        raise WeightsError(f"{path}: corrupt tensor data ({one_line(e)})") from None
    return GGUFContents(config, gguf_to_state_dict(raw, config, path), tok)


def _llama_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Our dense ``CausalLM`` state dict under llama.cpp names (Q/K permuted back)."""
    c, sd = model.config, model.state_dict()
    out = {"token_embd.weight": sd["embed.weight"], "output_norm.weight": sd["norm.weight"]}
    if not c.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        if p + "ffn.w_in_DH" not in sd:
            raise ValueError(f"layer {i}: only dense FFNs can be written to a llama GGUF")
        gate_DF, up_DF = sd[p + "ffn.w_in_DH"].chunk(2, dim=1)
        out |= {
            b + "attn_norm.weight": sd[p + "attn_norm.weight"],
            b + "ffn_norm.weight": sd[p + "ffn_norm.weight"],
            b + "attn_q.weight": permute_qk(sd[p + "attn.wq.weight"], c.n_heads),
            b + "attn_k.weight": permute_qk(sd[p + "attn.wk.weight"], c.n_kv_heads),
            b + "attn_v.weight": sd[p + "attn.wv.weight"],
            b + "attn_output.weight": sd[p + "attn.wo.weight"],
            b + "ffn_gate.weight": gate_DF.t(),
            b + "ffn_up.weight": up_DF.t(),
            b + "ffn_down.weight": sd[p + "ffn.w_out_FD"].t(),
        }
    return out


def write_gguf(path: str | Path, model: Any, tok: TokenizerData, qtype: str = "F32") -> None:
    """Write a dense ``CausalLM`` and its tokenizer data as a llama GGUF file.

    2-D weights are stored as ``qtype`` (``"F32"``, ``"Q8_0"``, ``"Q4_1"``, …: any type that
    ``gguf.quants`` can quantise; rows must be a multiple of its block size), norms in F32.
    """
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model(tok.model)
    w.add_token_list(tok.tokens)
    w.add_token_merges(tok.merges)
    w.add_token_types(tok.token_types)
    for key, v in (("eos", tok.eos_id), ("bos", tok.bos_id), ("pad", tok.pad_id)):
        if v is not None:
            getattr(w, f"add_{key}_token_id")(v)
    q = gguf.GGMLQuantizationType[qtype]
    for name, t in _llama_tensors(model).items():
        arr = t.detach().float().contiguous().numpy()
        if arr.ndim == 2 and q != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
