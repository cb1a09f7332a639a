"""Hugging Face interop: LlamaForCausalLM (dense) / MixtralForCausalLM (upcycled) round trips."""

from __future__ import annotations

import pytest
import torch
from lm_helpers import tiny_model

from vlmoe.lm import upcycle

transformers = pytest.importorskip("transformers")
from vlmoe.lm.hf import from_hf, load_hf, save_hf, to_hf  # noqa: E402


def _upcycled(layers="every_other"):
    m = upcycle(tiny_model(), layers=layers, noise=0.1, seed=3)
    with torch.no_grad():  # a router that really chooses: experts differ (noise) and so do picks
        for b in m.layers:
            if hasattr(b.ffn, "router"):
                b.ffn.router.weight.normal_(0, 1.0)
    return m.eval()


@pytest.mark.parametrize("kind", ["dense", "every_other", "all"])
def test_transformers_gives_the_same_logits_and_the_folder_loads_back(kind, tmp_path):
    m = tiny_model() if kind == "dense" else _upcycled(kind)
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    want = m(ids).logits
    save_hf(m, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.float32
    )
    expected = "LlamaForCausalLM" if kind == "dense" else "MixtralForCausalLM"
    assert type(hf).__name__ == expected
    with torch.no_grad():
        assert float((hf(ids).logits - want).abs().max()) <= 1e-4
    back, tok = load_hf(tmp_path / "hf")
    assert tok is None and back.moe_layers() == m.moe_layers()
    torch.testing.assert_close(back(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_from_hf_inverts_to_hf_exactly():
    m = _upcycled()
    back = from_hf(to_hf(m))
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
