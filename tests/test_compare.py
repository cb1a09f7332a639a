"""`vlmoe compare` end to end (--quick) and the analytic FLOP count against FlopCounterMode."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from cli_helpers import run_cli
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlmoe.compare import VARIANTS, compare_base, variant_configs, wide_d_ff
from vlmoe.config import dense, tiny
from vlmoe.data import Batch
from vlmoe.flops import flops_per_sample
from vlmoe.models import build_model


def _counted_flops(cfg, text_len: int) -> float:
    """FLOPs per sample of one forward, as FlopCounterMode counts them (no padding)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    B = 2
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    ids = torch.randint(0, cfg.vocab_size, (B, text_len))
    mask = torch.ones(B, text_len, dtype=torch.bool)
    # the math backend runs attention as visible bmm ops, which the counter sees; the fused
    # CPU kernel is not registered with it
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(Batch(images, ids, mask, None, torch.arange(B)))
    return fc.get_total_flops() / B


def _complete(model_cfg, **kw):
    return dataclasses.replace(model_cfg, vocab_size=40, num_answers=13, **kw)


@pytest.mark.parametrize("base", [tiny, compare_base], ids=["tiny", "compare"])
def test_flops_match_flop_counter_on_dense(base):
    cfg = _complete(dense(base()).model)
    for text_len in (5, 11):
        assert flops_per_sample(cfg, text_len).total == pytest.approx(
            _counted_flops(cfg, text_len), rel=1e-9
        )


def test_flops_match_flop_counter_with_a_full_resolution_stem_layer():
    cfg = _complete(dense(tiny()).model, stem_full_res=4)
    plain = flops_per_sample(_complete(dense(tiny()).model), 7).stem
    fl = flops_per_sample(cfg, 7)
    assert fl.total == pytest.approx(_counted_flops(cfg, 7), rel=1e-9)
    assert fl.stem > plain


def test_flops_match_flop_counter_with_a_head_that_reads_the_mean_text_token():
    cfg = _complete(dense(tiny()).model, head_text="cls+mean")
    plain = flops_per_sample(_complete(dense(tiny()).model), 7).head
    fl = flops_per_sample(cfg, 7)
    assert fl.total == pytest.approx(_counted_flops(cfg, 7), rel=1e-9)
    assert fl.head > plain


def test_flops_match_flop_counter_on_moe_reference_path():
    # the reference path is a loop of ordinary matmuls over the routed tokens, so the counter
    # sees exactly top_k expert FFNs per token plus the router
    m = tiny().model
    cfg = _complete(m, moe=dataclasses.replace(m.moe, impl="reference"))
    fl = flops_per_sample(cfg, 9)
    assert fl.total == pytest.approx(_counted_flops(cfg, 9), rel=1e-9)
    assert fl.router > 0 and fl.experts > 0
    assert fl.train == 3 * fl.total


def test_moe_and_dense_twin_have_equal_flops_and_dense_wide_matches_total_params():
    base = dataclasses.replace(compare_base(), model=_complete(compare_base().model))
    cfgs = variant_configs(base, list(VARIANTS))
    counts = {n: build_model(c.model).param_counts() for n, c in cfgs.items()}
    fl = {n: flops_per_sample(c.model, 8).total for n, c in cfgs.items()}
    assert fl["moe"] == pytest.approx(fl["dense"], rel=0.02)  # only the routers differ
    assert abs(counts["dense-wide"][0] / counts["moe"][0] - 1) < 0.02
    assert cfgs["dense-wide"].model.d_ff == wide_d_ff(cfgs["moe"])
    assert cfgs["dense-wide"].model.d_ff % 8 == 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    from vlmoe.cli import main

    rc = main(["compare", "--quick", "--out", str(out)])
    assert rc == 0
    return out


def test_quick_writes_every_file(quick_run):
    for name in ("compare.md", "compare.json", "curves.png"):
        assert (quick_run / name).stat().st_size > 0
    for v in VARIANTS:
        for seed in range(3):
            assert (quick_run / "runs" / v / f"seed{seed}" / "metrics.jsonl").is_file()
    from PIL import Image

    with Image.open(quick_run / "curves.png") as im:
        im.load()
        assert im.size[0] > 400 and im.size[1] > 200
    md = (quick_run / "compare.md").read_text()
    assert "| variant |" in md and "2·MACs" in md and "curves.png" in md
    for v in VARIANTS:
        assert f"| {v} |" in md


def test_quick_numbers_are_consistent(quick_run):
    s = json.loads((quick_run / "compare.json").read_text())
    v = s["variants"]
    assert list(v) == list(VARIANTS)
    for name, x in v.items():
        assert 0 < x["params_active"] <= x["params_total"], name
        assert len(x["runs"]) == 3 and [r["seed"] for r in x["runs"]] == [0, 1, 2]
        assert all(r["steps"] == s["steps"] for r in x["runs"])
        assert x["val_loss_std"] >= 0 and 0 <= x["val_accuracy_mean"] <= 1
        assert x["step_seconds_median"] > 0
        assert x["train_flops_per_sample"] == pytest.approx(3 * x["flops_per_sample"])
        steps = [p["step"] for p in x["curve"]]
        assert steps == sorted(steps) and steps[-1] == s["steps"] and len(steps) >= 2
    assert v["dense"]["params_active"] == v["dense"]["params_total"]
    assert abs(v["dense"]["params_active"] / v["moe"]["params_active"] - 1) < 0.02
    assert abs(v["dense-wide"]["params_total"] / v["moe"]["params_total"] - 1) < 0.10
    assert v["moe"]["params_total"] > v["moe-vision"]["params_total"] > v["dense"]["params_total"]
    assert v["dense"]["flops_per_sample"] < v["dense-wide"]["flops_per_sample"]
    # same seed ⇒ same data order and init ⇒ the paired difference of dense with itself is 0
    assert v["dense"]["delta_vs_dense_mean"] == 0


def test_same_seed_same_result(quick_run, tmp_path):
    # determinism: re-running one variant reproduces the recorded final loss of seed 0
    from vlmoe.cli import main

    rc = main(["compare", "--quick", "--seeds", "1", "--variants", "moe", "--out", str(tmp_path)])
    assert rc == 0
    again = json.loads((tmp_path / "compare.json").read_text())["variants"]["moe"]["runs"][0]
    first = json.loads((quick_run / "compare.json").read_text())["variants"]["moe"]["runs"][0]
    assert again["final_val_loss"] == pytest.approx(first["final_val_loss"], abs=1e-4)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--data", "no/such/file.jsonl"], "file not found"),
        (["--variants", "dense", "sparse"], "unknown"),
        (["--seeds", "0"], "--seeds"),
        (["--steps", "0"], "--steps"),
        (["--moe-layers", "x"], "--moe-layers"),
        (["--top-k", "9"], "top_k"),
    ],
)
def test_bad_arguments_give_one_clean_line(capsys, tmp_path, argv, needle):
    rc, out, err = run_cli(capsys, "compare", "--quick", "--out", str(tmp_path / "o"), *argv)
    assert rc == 1
    assert err.startswith("vlmoe: error:") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_jsonl_gives_clean_error(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "question": "what?"\n')
    rc, _, err = run_cli(capsys, "compare", "--quick", "--data", str(bad), "--out", str(tmp_path))
    assert rc == 1 and err.startswith("vlmoe: error:") and "Traceback" not in err
