"""Helpers for the language-model tests: a tiny random decoder and a tiny byte-level vocabulary."""

from __future__ import annotations

import torch

from vlmoe.lm import CausalLM, LMConfig
from vlmoe.lm.gguf import TokenizerData

TINY = dict(vocab_size=300, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=96)


def tiny_model(seed: int = 0, **kw) -> CausalLM:
    """A random 4-layer decoder (GQA 4q/2kv); norm weights randomised so they matter."""
    torch.manual_seed(seed)
    m = CausalLM(LMConfig(**(TINY | kw)))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m.eval()


def tiny_tokenizer_data(vocab_size: int = 300) -> TokenizerData:
    """A byte-level vocabulary: 3 specials, 256 byte symbols, then merged pieces."""
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_syms = sorted(ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
    pieces = [m.replace(" ", "") for m in merges]
    tokens = specials + byte_syms + pieces
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types = [3] * 3 + [1] * (vocab_size - 3)
    return TokenizerData("gpt2", tokens, merges, types, 1, 2, 2, None)
