"""SmolLM2-135M load time and decode speed: dense vs upcycled MoE vs transformers, 1/2 threads.

    python bench/lm_generate.py                     # ~3-5 minutes on 2 CPU cores
    python bench/lm_generate.py --threads 1 --repeats 5 --new 32

Rows (batch 1, a ChatML prompt of ~60 tokens, ``--new`` new tokens, greedy, no stop token):

  * ``vlmoe dense``       ``vlmoe.lm.generate`` with the KV cache on the dequantised GGUF
  * ``vlmoe moe 4e top2`` the same model upcycled: 4 copies, top-2, every other layer (15 MoE)
  * ``vlmoe moe all``     4 experts top-2 in all 30 layers (the issue's transformers figure)
  * ``transformers``      ``LlamaForCausalLM.generate`` on the same fp32 weights (if installed)

Reported per thread count: median over ``--repeats`` of the whole call (prefill + decode) as
new tokens per second, the prefill alone, and decode-only tokens/s ((total − prefill)/new),
with ratios to the vlmoe dense row. Load rows: the cold GGUF read (parse + dequantise) and the
cached load (``load_pretrained`` from the safetensors cache).

On a machine shared with other busy processes, run it with ``OMP_WAIT_POLICY=PASSIVE``: with
OpenMP's default spinning, 2 threads ran 2-10× slower than 1 thread here while other jobs held
the cores (every small matmul waits for a descheduled spinning peer).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from generate import PROMPT, _median_time

from vlmoe.lm import generate, load_pretrained, read_gguf, upcycle
from vlmoe.lm.weights import SMOLLM2, fetch


def _hf_llama(model):
    try:
        import transformers
    except ImportError:
        return None
    c, sd = model.config, model.state_dict()
    hc = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=True,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hc).eval()
    new = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(c.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
            new[h + f"self_attn.{theirs}_proj.weight"] = sd[p + f"attn.{ours}.weight"]
        new[h + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        new[h + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        new[h + "mlp.gate_proj.weight"] = sd[p + "ffn.w_in_DH"][:, : c.d_ff].t()
        new[h + "mlp.up_proj.weight"] = sd[p + "ffn.w_in_DH"][:, c.d_ff :].t()
        new[h + "mlp.down_proj.weight"] = sd[p + "ffn.w_out_FD"].t()
    hf.load_state_dict(new, strict=False)
    return hf


def _runners(models: dict, ids: torch.Tensor, new: int) -> dict:
    out = {}
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    for name, m in models.items():
        if name == "transformers":
            out[name] = (lambda m=m: m.generate(ids, **kw), lambda m=m: m(ids))
        else:
            out[name] = (
                lambda m=m: generate(m, ids, max_new_tokens=new),
                lambda m=m: m(ids, last_only=True, routing=False),
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(max(a.threads))
    t = time.perf_counter()
    read_gguf(fetch(SMOLLM2))
    cold = time.perf_counter() - t
    t = time.perf_counter()
    dense, tok = load_pretrained("smollm2")
    cached = time.perf_counter() - t
    print(f"load: GGUF read + dequantise {cold:.1f} s; cached load {cached:.1f} s")
    models = {"vlmoe dense": dense}
    models["vlmoe moe 4e top2 every other"] = upcycle(copy.deepcopy(dense))
    models["vlmoe moe 4e top2 all"] = upcycle(copy.deepcopy(dense), layers="all")
    hf = _hf_llama(dense)
    if hf is not None:
        models["transformers"] = hf
    ids = torch.tensor([tok.chat_ids(PROMPT)])
    print(f"batch 1, prompt {ids.shape[1]} tokens, {a.new} new tokens, median of {a.repeats}")
    print(
        f"{'threads':>7}  {'model':<32} {'tok/s':>7} {'prefill ms':>10} {'decode tok/s':>12} {'× dense':>8}"
    )
    with torch.inference_mode():
        for n in a.threads:
            torch.set_num_threads(n)
            base = None
            for name, (gen, pre) in _runners(models, ids, a.new).items():
                total, prefill = _median_time(gen, a.repeats), _median_time(pre, a.repeats)
                dec = a.new / max(total - prefill, 1e-9)
                base = base or dec
                print(f"{n:>7}  {name:<32} {a.new / total:>7.1f} {prefill * 1e3:>10.0f} "
                      f"{dec:>12.1f} {dec / base:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
