"""The decoder on tiny random configs: HF parity, loss on targets, KV cache, upcycling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import tiny_model

from vlmoe.lm import generate, upcycle
from vlmoe.lm.upcycle import moe_layer_indices

IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def _hf_llama(m):
    transformers = pytest.importorskip("transformers")
    c = m.config
    hc = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=True,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hc).eval()
    sd, F_ = m.state_dict(), c.d_ff
    new = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
    for i in range(c.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in names.items():
            new[h + f"self_attn.{theirs}.weight"] = sd[p + f"attn.{ours}.weight"]
        new[h + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        new[h + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        new[h + "mlp.gate_proj.weight"] = sd[p + "ffn.w_in_DH"][:, :F_].t()
        new[h + "mlp.up_proj.weight"] = sd[p + "ffn.w_in_DH"][:, F_:].t()
        new[h + "mlp.down_proj.weight"] = sd[p + "ffn.w_out_FD"].t()
    hf.load_state_dict(new, strict=False)
    return hf


def test_matches_transformers_llama():
    m = tiny_model(rope_theta=1e5)
    hf = _hf_llama(m)
    with torch.no_grad():
        ours, theirs = m(IDS).logits, hf(IDS).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_loss_only_on_targets_equals_full_cross_entropy():
    m = tiny_model()
    labels = IDS.clone()
    labels[:, :7] = -100
    out = m(IDS, labels=labels)
    full = m(IDS).logits
    ref = F.cross_entropy(full[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1))
    assert out.logits.shape == (2 * 5, 300)  # labels at 7..11: 5 targets per row
    assert torch.allclose(out.task_loss, ref, atol=1e-6)
    assert int(out.metrics["count"]) == 10
    out.loss.backward()
    assert m.layers[0].attn.wq.weight.grad.abs().sum() > 0


def test_kv_cache_generation_equals_recomputation():
    m = tiny_model()
    a = generate(m, IDS, max_new_tokens=10, use_cache=True)
    b = generate(m, IDS, max_new_tokens=10, use_cache=False)
    assert a.shape == (2, 10) and torch.equal(a, b)


def test_left_padded_batch_generates_like_each_row_alone():
    m = tiny_model()
    short = IDS[1, 5:]
    batch = torch.stack([IDS[0], torch.cat([torch.zeros(5, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    got = generate(m, batch, attention_mask=mask, max_new_tokens=6)
    alone = generate(m, short[None], max_new_tokens=6)
    assert torch.equal(got[1], alone[0])
    assert torch.equal(got[0], generate(m, IDS[:1], max_new_tokens=6)[0])


def test_stop_token_and_sampling():
    m = tiny_model()
    first = generate(m, IDS[:1], max_new_tokens=5)[0, 0].item()
    out = generate(m, IDS[:1], max_new_tokens=5, stop_ids=[first], pad_id=0)
    assert out.tolist() == [[first]]  # stops after the stop token
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    s1 = generate(m, IDS, max_new_tokens=8, temperature=1.0, generator=g1)
    s2 = generate(m, IDS, max_new_tokens=8, temperature=1.0, generator=g2)
    assert torch.equal(s1, s2)
    # a tiny nucleus keeps only the top token: sampling becomes greedy
    tiny_p = generate(m, IDS, max_new_tokens=8, temperature=1.0, top_p=1e-6, generator=g1)
    assert torch.equal(tiny_p, generate(m, IDS, max_new_tokens=8))


def test_upcycled_equals_dense_at_init_and_records_routing():
    m = tiny_model()
    labels = IDS.clone()
    with torch.no_grad():
        dense = m(IDS).logits
        upcycle(m, num_experts=4, top_k=2, layers="every_other")
        out = m(IDS, labels=labels)
        up = m(IDS).logits
    assert m.moe_layers() == [0, 2] and m.config.moe.layers == [0, 2]
    assert (dense - up).abs().max() < 1e-5
    assert [r.layer for r in out.routing] == [0, 2]
    assert out.routing[0].token_index.shape == (24, 2)
    assert out.aux_loss > 0  # the balance loss (0.01 · ~1) is on
    total, active = m.param_counts()
    assert total > active  # 4 experts stored, 2 active per token


def test_upcycled_noise_breaks_symmetry_and_layer_choice():
    m = tiny_model()
    with torch.no_grad():
        dense = m(IDS).logits
        upcycle(m, layers=[1, 3], noise=0.1)
        assert (dense - m(IDS).logits).abs().max() > 1e-4
    assert moe_layer_indices(5, "all") == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="layers"):
        moe_layer_indices(4, [7])
    with pytest.raises(ValueError, match="no dense FFN"):
        upcycle(m, layers=[1])


def test_few_token_decode_path_equals_grouped_experts():
    from vlmoe.lm.model import _few_token_experts

    m = upcycle(tiny_model(), layers="all", noise=0.5, router_std=1.0)
    moe = m.layers[1].ffn
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d, _, _ = moe.route(x)
        want = moe.experts(x, d.indices, d.weights)
        got = _few_token_experts(moe, x, d.indices, d.weights)
    assert len(d.indices.unique()) > 2  # several experts in play
    assert torch.allclose(got, want, atol=1e-5)


def test_input_embeddings_with_a_prefix_generate_like_ids():
    m = tiny_model()
    emb = m.embed(IDS).detach()
    with torch.no_grad():
        assert torch.equal(m(inputs_embeds=emb).logits, m(IDS).logits)
    # a soft prefix (what image tokens will be) followed by text: cache == recomputation
    prefix = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    x = torch.cat([prefix, emb], 1)
    a = generate(m, inputs_embeds=x, max_new_tokens=6)
    b = generate(m, inputs_embeds=x, max_new_tokens=6, use_cache=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(m, IDS, max_new_tokens=6))  # the prefix matters


def test_prompt_past_the_context_length_is_a_clear_error():
    from vlmoe.data.errors import DataError

    m = tiny_model(max_seq_len=16)
    with pytest.raises(DataError, match="12 tokens \\+ 8 new exceed the context length 16"):
        generate(m, IDS, max_new_tokens=8)


def test_upcycled_model_rebuilds_from_its_config_dict():
    import json

    from vlmoe.lm import CausalLM, LMConfig

    m = upcycle(tiny_model(), num_experts=3, top_k=1, layers=[1], noise=0.1)
    again = CausalLM(LMConfig(**json.loads(json.dumps(m.config.to_dict())))).eval()
    again.load_state_dict(m.state_dict())
    assert again.moe_layers() == [1] and again.config == m.config
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, m(IDS).logits)
