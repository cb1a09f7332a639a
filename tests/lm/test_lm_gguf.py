"""GGUF reading on small files written with the gguf writer, and bad files."""

from __future__ import annotations

import pytest
import torch
from lm_helpers import tiny_model, tiny_tokenizer_data

from vlmoe.lm import WeightsError, load_gguf, read_gguf, write_gguf
from vlmoe.lm.gguf import permute_qk, unpermute_qk


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.arange(12 * 3, dtype=torch.float32).reshape(12, 3)  # 2 heads of dim 6
    p = permute_qk(w, 2)
    # llama.cpp interleaves the two halves of each head: rows 0,3,1,4,2,5 of head 0
    assert p[:6, 0].tolist() == [0.0, 9.0, 3.0, 12.0, 6.0, 15.0]
    assert torch.equal(unpermute_qk(p, 2), w)


def test_f32_round_trip_is_exact(tmp_path):
    m = tiny_model()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, m, tiny_tokenizer_data())
    got = read_gguf(path)
    assert got.config == m.config
    sd = m.state_dict()
    assert set(got.state_dict) == set(sd)
    for k, v in got.state_dict.items():
        assert torch.equal(v, sd[k]), k
    assert got.tokenizer.tokens[1] == "<|im_start|>" and got.tokenizer.eos_id == 2


def test_q8_0_model_matches_within_quantisation_error(tmp_path):
    m = tiny_model()
    path = tmp_path / "q8.gguf"
    write_gguf(path, m, tiny_tokenizer_data(), qtype="Q8_0")
    q, _ = load_gguf(path, cache=tmp_path / "cache")
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m(ids).logits, q(ids).logits
    err = (a - b).abs().max() / a.abs().max()
    assert 0 < err < 0.05  # quantised, so not exact, but close (8-bit blocks of 32)
    # the second load comes from the dequantised cache and gives the same weights
    q2, _ = load_gguf(path, cache=tmp_path / "cache")
    assert all(torch.equal(x, y) for x, y in zip(q.parameters(), q2.parameters(), strict=True))


def test_not_gguf_and_truncated_and_wrong_arch(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, not a model")
    with pytest.raises(WeightsError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(WeightsError, match="no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")
    good = tmp_path / "tiny.gguf"
    write_gguf(good, tiny_model(), tiny_tokenizer_data())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cut.gguf: corrupt") as e:
        read_gguf(cut)
    assert "\n" not in str(e.value)

    import gguf

    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsError, match="architecture 'gpt2' is not supported"):
        read_gguf(other)
