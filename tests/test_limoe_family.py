"""The LIMoE (contrastive) family end to end through `vlmoe.cli.main`: train the `limoe-tiny`
preset, eval --json, ask --choices, stop + resume, a user's JSONL pairs, and the error lines
of ask on a contrastive checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import last_json, run_cli
from easy_vqa import get_test_image_paths

from vlmoe.cli import main
from vlmoe.data.pairs import easyvqa_captions

TRAIN = ["train", "--preset", "limoe-tiny", "--no-progress", "--json", "--threads", "1"]


@pytest.fixture(scope="module")
def limoe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(checkpoint, train summary) of one `vlmoe train --preset limoe-tiny`."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("limoe") / "ck"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*TRAIN, "--out", str(out)]) == 0
    return out, last_json(buf.getvalue())


def _losses(ck: Path) -> dict[int, float]:
    lines = [json.loads(s) for s in (ck / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if m["kind"] == "train"}


def test_train_writes_a_contrastive_checkpoint(limoe_run):
    ck, summary = limoe_run
    assert summary["step"] == summary["total_steps"] == 10  # 320 pairs // 32
    meta = json.loads((ck / "config.json").read_text())
    assert meta["task"] == "contrastive" and meta["run"]["preset"] == "limoe-tiny"
    assert meta["run"]["model"]["vocab_size"] > 24  # taken from the tokenizer
    assert (ck / "tokenizer.json").is_file()
    kinds = summary["test_per_kind"]
    assert {"zero_shot", "zero_shot_color", "zero_shot_shape", "retrieval_i2t_r1",
            "retrieval_t2i_r5"} <= set(kinds)  # fmt: skip
    assert summary["test_accuracy"] == kinds["zero_shot"]
    lines = [json.loads(s) for s in (ck / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in lines if m["kind"] == "val"]
    assert val and 0 < val[-1]["loss"] < 10  # a contrastive loss (ln 32 ≈ 3.5 at chance)
    routing = [m for m in lines if m["kind"] == "routing"][-1]["layers"]
    assert set(routing) == {"layer1.vision", "layer1.text"}  # one pool, seen per modality


def test_eval_json_agrees_with_the_trainers_test(limoe_run, capsys):
    ck, summary = limoe_run
    rc, out, err = run_cli(capsys, "eval", "--checkpoint", str(ck), "--json")
    assert rc == 0, err
    res = last_json(out)
    z, r = res["zero_shot"], res["retrieval"]
    assert z["count"] == 1000 and r["count"] == 64  # the test images; 64 held-out emoji
    assert z["accuracy"] == pytest.approx(100 * summary["test_accuracy"])
    assert z["color_accuracy"] >= z["accuracy"] and z["shape_accuracy"] >= z["accuracy"]
    for d in ("i2t", "t2i"):
        assert 0 <= r[f"{d}_r1"] <= r[f"{d}_r5"] <= 100 and 1 <= r[f"{d}_mean_rank"] <= 64
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", str(ck))
    assert rc == 0 and "zero-shot over the captions" in out and "R@5" in out


def test_ask_ranks_the_choices(limoe_run, capsys):
    ck, _ = limoe_run
    img = get_test_image_paths()[0]
    choices = ["a red circle", "a blue rectangle", "a green triangle"]
    rc, out, err = run_cli(capsys, "ask", "--checkpoint", str(ck), "--image", img, "--json",
                           "--choices", *choices)  # fmt: skip
    assert rc == 0, err
    res = last_json(out)
    probs = [t["prob"] for t in res["top"]]
    assert sorted(t["text"] for t in res["top"]) == sorted(choices)
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
    assert res["answer"] == res["top"][0]["text"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--image", "IMG"], "--choices: a contrastive checkpoint ranks given texts"),
        (["--choices", "a red circle"], "--image: a contrastive checkpoint ranks texts"),
        (["--image", "IMG", "--choices", "a", " "], "--choices: text 2 is empty"),
    ],
)
def test_ask_errors_are_one_line(limoe_run, capsys, extra, needle):
    ck, _ = limoe_run
    img = get_test_image_paths()[0]
    argv = ["ask", "--checkpoint", str(ck), *[img if a == "IMG" else a for a in extra]]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 1 and out == ""
    assert err.strip().splitlines() == [err.strip()] and needle in err, err


def test_stop_and_resume_follow_the_uninterrupted_run(limoe_run, tmp_path, capsys):
    ck, _ = limoe_run
    out = tmp_path / "ck"
    rc, _, err = run_cli(capsys, *TRAIN, "--out", str(out), "--stop-after", "4")
    assert rc == 0, err
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 4
    rc, stdout, err = run_cli(capsys, *TRAIN, "--out", str(out), "--resume")
    assert rc == 0, err
    assert last_json(stdout)["step"] == 10
    full, resumed = _losses(ck), _losses(out)
    assert sorted(resumed) == sorted(full) == [2, 4, 6, 8, 10]
    for step in (6, 8, 10):  # after the resume: the same data order, weights, optimiser
        assert resumed[step] == pytest.approx(full[step], rel=1e-4), step


def test_a_users_jsonl_pairs_train_and_evaluate(tmp_path, capsys):
    pairs = easyvqa_captions("test", image_size=32)
    paths = get_test_image_paths()
    lines = [{"image": paths[i], "text": pairs.texts[i]} for i in range(48)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "ck"
    argv = [*TRAIN, "--data", str(data), "--out", str(out), "--batch-size", "8", "--epochs", "2"]
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    summary = last_json(stdout)
    # 10% of the 48 pairs held out: 43 train → 5 batches of 8 an epoch; no test split
    assert summary["total_steps"] == 10 and "test_accuracy" not in summary
    assert 0 <= summary["val_accuracy"] <= 1  # image→text R@1 on the 5 held-out pairs
    rc, stdout, err = run_cli(capsys, "eval", "--checkpoint", str(out), "--json")
    assert rc == 0, err
    assert last_json(stdout)["retrieval"]["count"] == 48  # the whole file


def test_inspect_reports_modality_shares(limoe_run, tmp_path, capsys):
    ck, _ = limoe_run
    out = tmp_path / "insp"
    rc, stdout, err = run_cli(capsys, "inspect", "--checkpoint", str(ck), "--out", str(out),
                              "--max-questions", "200", "--json")  # fmt: skip
    assert rc == 0, err
    res = last_json(stdout)
    layer = res["layers"]["layer1"]
    # 200 easy-VQA test pairs: 16 patches each; every word of every caption, [CLS] included
    assert layer["vision"]["tokens"] == 200 * 16
    assert layer["text"]["tokens"] == sum(len(t.split()) + 1 for t in easyvqa_captions("test", 32).texts[:200])  # fmt: skip
    for m in ("vision", "text"):
        assert sum(layer[m]["share"]) == pytest.approx(1, abs=1e-3)
        assert 1 <= layer[m]["experts_taking"] <= 4
    experts = layer["experts"]
    assert sum(e["image_tokens"] for e in experts) == 200 * 16
    assert all(0 <= e["text_share_of_expert"] <= 1 for e in experts)
    words = {w for e in experts for w in e["top_words"]}
    assert "[CLS]" in words and "a" in words
    assert {p.name for p in out.iterdir()} >= {"modality.png", "patches.png", "report.md",
                                               "report.html", "routing.json"}  # fmt: skip
    assert "text share of expert" in (out / "report.md").read_text()


def test_load_summary_counts_the_experts_that_take_text():
    from vlmoe.limoe.inspect import load_summary

    s = load_summary([90, 6, 4, 0])
    assert s["experts_taking"] == 2 and s["top_share"] == 0.9  # 4% < 5%: not taken
    assert s["load_entropy"] == pytest.approx(-(0.9 * math.log(0.9) + 0.06 * math.log(0.06) + 0.04 * math.log(0.04)), abs=1e-4)  # fmt: skip
    assert load_summary([1, 1, 1, 1])["load_entropy"] == pytest.approx(math.log(4), abs=1e-4)


def test_compare_contrastive_quick(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc, stdout, err = run_cli(capsys, "compare", "--family", "contrastive", "--quick", "--steps", "3",
                              "--seeds", "1", "--variants", "dense", "limoe", "--out", str(out))  # fmt: skip
    assert rc == 0, err
    summary = json.loads((out / "compare.json").read_text())
    v = summary["variants"]
    assert list(v) == ["dense", "limoe"] and summary["steps"] == 3
    for name in v:
        run = v[name]["runs"][0]
        assert run["steps"] == 3 and 0 < run["final_val_loss"] < 10
        assert 0 <= v[name]["zero_shot_mean"] <= 1
    assert v["dense"]["text_spread"] == {}  # no experts to collapse onto
    spread = v["limoe"]["text_spread"]["layer1"]
    assert 1 <= spread["experts_taking"]["mean"] <= 4 and spread["experts_taking"]["std"] == 0
    assert (
        "| limoe |" in stdout and (out / "curves.png").is_file() and (out / "compare.md").is_file()
    )


def test_two_processes_train_and_the_checkpoint_loads_in_one(tmp_path, capsys):
    """torchrun, 2 processes (experts sharded, FSDP2): the Task contract holds (each rank its
    block of the global batch, every rank the same evaluation); one process reads the result."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vlmoe", *TRAIN, "--out", str(out), "--stop-after", "4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLMOE_DIST_TIMEOUT": "60"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 4
    rc, stdout, err = run_cli(capsys, "eval", "--checkpoint", str(out), "--json")
    assert rc == 0, err
    assert last_json(stdout)["zero_shot"]["count"] == 1000


def test_robustness_bench_measures_zero_shot_on_every_shift(limoe_run, tmp_path):
    """bench/robustness.py on a contrastive checkpoint: a row per shift with colour and shape
    kinds; its unshifted row is the zero-shot accuracy over the same test images."""
    import subprocess
    import sys

    from vlmoe.limoe.evaluate import zero_shot
    from vlmoe.limoe.task import load_contrastive
    from vlmoe.robustness import default_shifts

    ck, _ = limoe_run
    bench = Path(__file__).resolve().parents[1] / "bench" / "robustness.py"
    out = tmp_path / "rob.json"
    p = subprocess.run([sys.executable, str(bench), "--checkpoint", str(ck), "--max-images",
                        "16", "--json", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shift"], r["severity"]) for r in rows] == [
        (s.name, s.severity) for s in default_shifts()
    ]
    assert all(r["n"] == 16 and set(r["per_kind"]) == {"color", "shape"} for r in rows)
    loaded = load_contrastive(ck)
    pairs = easyvqa_captions("test", loaded.config.model.image_size)
    first = pairs.__class__(pairs.images[:16], pairs.texts[:16], pairs.labels[:16],
                            pairs.classes, pairs.names[:16], pairs.source)  # fmt: skip
    want = zero_shot(loaded.model, loaded.tokenizer, first, loaded.config.model.max_text_len)
    assert abs(rows[0]["accuracy"] - want["accuracy"] / 100) < 1e-9
