"""`vlmoe compare --family generative`: the tiny preset's dense checkpoint continued dense vs
upcycled, 2 seeds × 3 steps, end to end through main([...]). Bad `--from` values are cases of
`tests/bad_input_cases.py` (CASES: a VQA checkpoint, a missing folder; LLAVA_CASES: an
upcycled checkpoint, the text-only smollm2)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from vlmoe.cli import main

STEPS, SEEDS = 3, 2


@pytest.fixture(scope="module")
def gcompare(llava_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(--out folder, stdout) of the comparison from the tiny run's OUT-dense checkpoint."""
    out = tmp_path_factory.mktemp("gcompare") / "cmp"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["compare", "--family", "generative", "--from", str(llava_run.with_name("run-dense")),
                   "--steps", str(STEPS), "--seeds", str(SEEDS), "--eval-every", "2",
                   "--val-questions", "16", "--out", str(out)])  # fmt: skip
    assert rc == 0
    return out, stdout.getvalue()


def _summary(out: Path) -> dict:
    return json.loads((out / "compare.json").read_text())


def _lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_outputs_exist_parse_and_the_table_is_printed(gcompare):
    out, stdout = gcompare
    s = _summary(out)
    assert s["steps"] == STEPS and s["seeds"] == [0, 1] and s["val_questions"] == 16
    assert list(s["variants"]) == ["dense", "moe"]
    assert s["command"].startswith("vlmoe compare --family generative --from ")
    md = (out / "compare.md").read_text()
    assert "| dense |" in md and "| moe |" in md and "curves.png" in md
    assert "| dense |" in stdout and "| moe |" in stdout and "Δ loss vs dense" in stdout
    from PIL import Image

    with Image.open(out / "curves.png") as im:
        im.load()
        assert im.size[0] > 400 and im.size[1] > 200


def test_each_variant_has_one_run_per_seed(gcompare):
    out, _ = gcompare
    for name, v in _summary(out)["variants"].items():
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        assert all(r["steps"] == STEPS for r in v["runs"])
        for seed in range(SEEDS):
            folder = out / "runs" / name / f"seed{seed}"
            for f in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"):
                assert (folder / f).is_file(), (folder, f)
            assert not (folder / "trainer_state").exists()  # dropped: never resumed
            run = json.loads((folder / "config.json").read_text())["run"]
            assert run["train"]["seed"] == seed
        assert v["val_loss_std"] >= 0 and 0 <= v["val_accuracy_mean"] <= 1
        assert v["samples_per_s_median"] > 0


def test_step_zero_is_the_dense_model_for_both_variants_and_every_seed(gcompare):
    # upcycling copies each dense FFN into every expert: at step 0 the MoE computes the dense
    # function; the validation split is the checkpoint's whatever the seed (train.split_seed)
    out, _ = gcompare
    s = _summary(out)
    firsts = [r["curve"][0] for v in s["variants"].values() for r in v["runs"]]
    assert all(p["step"] == 0 for p in firsts)
    assert max(p["loss"] for p in firsts) - min(p["loss"] for p in firsts) < 1e-4
    accs = [p["accuracy"] for p in firsts]
    assert max(accs) - min(accs) <= 1 / 16 + 1e-9  # an argmax tie may flip in float rounding
    steps = [p["step"] for p in s["variants"]["moe"]["runs"][0]["curve"]]
    assert steps == [0, 2, 3]  # step 0, every 2 steps, the last


def test_only_the_moe_variant_routes_and_has_experts(gcompare):
    out, _ = gcompare
    s = _summary(out)
    for seed in range(SEEDS):
        moe, dense = (out / "runs" / n / f"seed{seed}" for n in ("moe", "dense"))
        assert any(m["kind"] == "routing" for m in _lines(moe))
        assert not any(m["kind"] == "routing" for m in _lines(dense))
        assert any(".ffn.experts." in k for k in _keys(moe))
        assert any(k.endswith(".ffn.router.weight") for k in _keys(moe))
        assert not any(".ffn.experts." in k or ".router." in k for k in _keys(dense))
    d, m = s["variants"]["dense"], s["variants"]["moe"]
    assert d["params_total"] == d["params_active"]
    assert m["params_total"] > m["params_active"] > d["params_active"]


def test_both_variants_share_data_order_lr_and_trainable_set_per_seed(gcompare):
    out, _ = gcompare
    runs = {n: v["runs"] for n, v in _summary(out)["variants"].items()}
    # step 1's training loss is computed on the first batch before any update; the two
    # models are the same function then, so equal losses mean the same first batch
    for seed in range(SEEDS):
        assert runs["dense"][seed]["first_train_loss"] == pytest.approx(
            runs["moe"][seed]["first_train_loss"], abs=1e-4
        )
    assert runs["dense"][0]["first_train_loss"] != runs["dense"][1]["first_train_loss"]
    cfgs = {n: json.loads((out / "runs" / n / "seed0" / "config.json").read_text())["run"]["train"]
            for n in runs}  # fmt: skip
    for key in ("lr", "warmup_steps", "batch_size", "epochs", "split_seed"):
        assert cfgs["dense"][key] == cfgs["moe"][key], key
    (sd,), (sm,) = cfgs["dense"]["stages"], cfgs["moe"]["stages"]
    assert sd["trainable"] == sm["trainable"] == ["lm.layers.*.ffn.*"]
    assert (sd["name"], sm["name"]) == ("dense", "moe")


def test_paired_delta_is_the_mean_of_per_seed_differences(gcompare):
    out, _ = gcompare
    v = _summary(out)["variants"]
    diffs = [m["final_val_loss"] - d["final_val_loss"]
             for d, m in zip(v["dense"]["runs"], v["moe"]["runs"], strict=True)]  # fmt: skip
    assert v["moe"]["delta_vs_dense_mean"] == pytest.approx(sum(diffs) / len(diffs))
    assert v["dense"]["delta_vs_dense_mean"] == 0
