"""Autoregressive generation for ``CausalLM``: greedy or temperature / top-p sampling.

With ``use_cache`` the prompt is run once (prefill) into a ``KVCache`` and every new token
costs one position; without it the whole sequence is recomputed each step (the reference the
cache is tested against). Rows of a batch may be left-padded (``attention_mask``); a row that
emits a stop id is finished and gets ``pad_id`` from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from vlmoe.data.errors import DataError

from .model import CausalLM

__all__ = ["generate", "next_token"]


def next_token(
    logits_BV: Tensor, temperature: float = 0.0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """Pick one token per row ``[B, V] -> [B]``: argmax when ``temperature <= 0``, else a
    sample from ``softmax(logits / temperature)`` restricted to the top-p nucleus."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    probs = torch.softmax(logits_BV.float() / temperature, -1)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, p_sorted)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: Tensor | None = None,
    *,
    inputs_embeds: Tensor | None = None,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """New tokens ``[B, N]`` (N ≤ ``max_new_tokens``) after a prompt of ids ``[B, L]`` or
    embeddings ``[B, L, D]`` (left-padded rows: ``attention_mask [B, L]``).

    Stops when every row has emitted one of ``stop_ids`` (the stop token is kept; later
    positions are ``pad_id``). ``on_token([B])`` is called with each new column (streaming).
    Raises ``DataError`` when prompt + answer would pass the context length.
    """
    x = model.embed(input_ids) if inputs_embeds is None else inputs_embeds
    B, L, _ = x.shape
    if L + max_new_tokens > model.config.max_seq_len:
        raise DataError(
            f"prompt: {L} tokens + {max_new_tokens} new exceed the context length "
            f"{model.config.max_seq_len}"
        )
    mask = torch.ones(B, L, dtype=torch.long) if attention_mask is None else attention_mask.long()
    cache = model.new_cache(B, L + max_new_tokens) if use_cache else None
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    out: list[Tensor] = []
    step_in = x
    for _ in range(max_new_tokens):
        am = mask if attention_mask is not None or not use_cache else None
        res = model(inputs_embeds=step_in, attention_mask=am, cache=cache, last_only=True,
                    routing=False)  # fmt: skip
        tok = next_token(res.logits[:, -1], temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        done = done | torch.isin(tok, stops)
        if bool(done.all()):
            break
        emb = model.embed(tok[:, None])
        step_in = emb if use_cache else torch.cat([step_in, emb], 1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
    return torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long)
