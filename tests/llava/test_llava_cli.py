"""`vlmoe train / ask / eval` on MoE-LLaVA checkpoints, end to end through main([...])."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from cli_helpers import last_json, run_cli
from easy_vqa import get_test_image_paths
from safetensors.torch import load_file

IMAGE = get_test_image_paths()[0]


def test_three_stages_leave_three_checkpoints(llava_run: Path):
    names = {"align": llava_run.with_name("run-align"), "dense": llava_run.with_name("run-dense")}
    for folder in [*names.values(), llava_run]:
        meta = json.loads((folder / "config.json").read_text())
        assert meta["task"] == "llava"
        assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file()
    dense = load_file(str(names["dense"] / "model.safetensors"))
    final = load_file(str(llava_run / "model.safetensors"))
    assert "lm.layers.0.ffn.w_in_DH" in dense and "lm.layers.0.ffn.router.weight" in final
    assert json.loads((llava_run / "config.json").read_text())["lm"]["moe"]["layers"] == [0, 2]
    # stage 3 trained FFNs and routers only: attention is the dense stage's, exactly
    k = "lm.layers.1.attn.wq.weight"
    assert torch.equal(dense[k], final[k])
    align = load_file(str(names["align"] / "model.safetensors"))
    assert not torch.equal(align["projector.fc1.weight"], dense["projector.fc1.weight"])
    lines = [json.loads(x) for x in (llava_run / "metrics.jsonl").read_text().splitlines()]
    assert {m.get("stage") for m in lines if m["kind"] == "train"} == {"align", "dense", "moe"}
    assert any(m["kind"] == "routing" for m in lines) and any(m["kind"] == "test" for m in lines)


def test_ask_streams_the_answer_and_json_gives_the_same(llava_run: Path, capsys):
    rc, out, err = run_cli(capsys, "ask", "--checkpoint", str(llava_run), "--image", str(IMAGE),
                           "what color is the shape?")  # fmt: skip
    assert rc == 0 and err == ""
    rc, js, _ = run_cli(capsys, "ask", "--checkpoint", str(llava_run), "--image", str(IMAGE),
                        "--json", "what color is the shape?")  # fmt: skip
    assert rc == 0 and out.strip() == last_json(js)["answer"]
    rc, text, _ = run_cli(capsys, "ask", "--checkpoint", str(llava_run), "--json", "hello")
    assert rc == 0 and isinstance(last_json(text)["answer"], str)  # text-only chat


def test_eval_reports_exact_match_per_kind(llava_run: Path, tmp_path: Path, capsys):
    rows = [{"image": str(IMAGE), "question": q, "answer": a}
            for q, a in [("what color is the shape?", "red"), ("is there a circle?", "no"),
                         ("what shape is in the image?", "circle")]]  # fmt: skip
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", str(llava_run), "--data", str(data),
                         "--json")  # fmt: skip
    res = last_json(out)
    assert rc == 0 and res["n"] == 3 and set(res["per_kind"]) == {"color", "yes/no", "shape"}
    assert 0.0 <= res["accuracy"] <= 1.0
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", str(llava_run), "--data", str(data))
    assert rc == 0 and "exact match" in out and "yes/no" in out


def test_stage_flag_runs_one_stage_from_the_previous_one(llava_run: Path, tmp_path: Path, capsys):
    base = tmp_path / "run"
    shutil.copytree(llava_run.with_name("run-dense"), tmp_path / "run-dense")
    rc, out, err = run_cli(capsys, "train", "--preset", "moe-llava-tiny", "--out", str(base),
                           "--stage", "3", "--no-progress", "--json")  # fmt: skip
    assert rc == 0, err
    assert last_json(out)["checkpoint"] == str(base)
    assert json.loads((base / "config.json").read_text())["lm"]["moe"]["layers"] == [0, 2]
    # the same seed and data: stage 3 alone reproduces the full run's last stage
    a = load_file(str(base / "model.safetensors"))
    b = load_file(str(llava_run / "model.safetensors"))
    assert torch.equal(a["lm.layers.1.attn.wq.weight"], b["lm.layers.1.attn.wq.weight"])
    rc, _, err = run_cli(capsys, "train", "--preset", "moe-llava-tiny", "--out",
                         str(tmp_path / "other"), "--stage", "2")  # fmt: skip
    assert rc == 1 and "run --stage 1 first" in err and not (tmp_path / "other-dense").exists()


def test_stopped_run_resumes_to_the_same_weights(llava_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "moe-llava-tiny", "--out", str(out), "--no-progress", "--json"]
    rc, o, _ = run_cli(capsys, *argv, "--stop-after", "24")  # in the middle of stage 2
    assert rc == 0 and last_json(o)["step"] == 24
    rc, o, _ = run_cli(capsys, *argv, "--resume")
    assert rc == 0 and last_json(o)["step"] == 48
    a, b = (
        load_file(str(out / "model.safetensors")),
        load_file(str(llava_run / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_export_hf_writes_a_mixtral_folder_that_ask_reads(llava_run: Path, tmp_path: Path, capsys):
    hf = tmp_path / "hf"
    rc, out, err = run_cli(capsys, "export-hf", "--checkpoint", str(llava_run), "--out", str(hf),
                           "--json")  # fmt: skip
    assert rc == 0, err
    res = last_json(out)
    assert res["architecture"] == "MixtralForCausalLM" and res["max_logit_diff"] <= 1e-4
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["vlmoe_dense_layers"] == [1, 3] and (hf / "tokenizer.json").is_file()
    rc, out, _ = run_cli(capsys, "ask", "--checkpoint", str(hf), "--json", "hello")
    assert rc == 0 and isinstance(last_json(out)["answer"], str)
    rc, _, err = run_cli(capsys, "export-hf", "--checkpoint", str(llava_run), "--out", str(hf))
    assert rc == 1 and "not empty" in err  # an existing folder is never replaced silently


def test_inspect_shows_routing_of_image_prompt_and_generated_tokens(
    llava_run: Path, tmp_path, capsys
):
    out = tmp_path / "insp"
    rc, text, err = run_cli(capsys, "inspect", "--checkpoint", str(llava_run), "--max-questions",
                            "12", "--out", str(out), "--json")  # fmt: skip
    assert rc == 0, err
    res = last_json(text)
    assert res["questions"] == 12 and set(res["layers"]) == {"0", "2"}
    for kinds in res["layers"].values():
        # 4 visual tokens per question, top-2: 12 * 4 * 2 image assignments per layer
        assert sum(kinds["image"]) == 12 * 4 * 2 and sum(kinds["prompt"]) > 0
        assert len(kinds["generated"]) == 4
    assert json.loads((out / "routing.json").read_text())["questions"] == 12
    rc, _, err = run_cli(capsys, "inspect", "--checkpoint", str(llava_run.with_name("run-dense")))
    assert rc == 1 and "no MoE layer" in err


def test_fine_tune_a_trained_checkpoint_on_my_jsonl(llava_run: Path, tmp_path: Path, capsys):
    paths = get_test_image_paths()
    rows = [{"image": str(paths[i % 8]), "question": "what shape is in the image?",
             "answer": "circle"} for i in range(40)]  # fmt: skip
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    argv = ["train", "--preset", "moe-llava-tiny", "--data", str(data), "--out", str(out),
            "--no-progress", "--json"]  # fmt: skip
    rc, o, err = run_cli(capsys, *argv, "--stage", "3", "--from", str(llava_run))
    assert rc == 0, err
    # the checkpoint's tokenizer is kept (ids keep their meaning) and its weights were the start
    assert (out / "tokenizer.json").read_text() == (llava_run / "tokenizer.json").read_text()
    rc, _, err = run_cli(capsys, *argv[:-2], "--from", str(llava_run), "--out", str(tmp_path / "x"))
    assert rc == 1 and "--stage 3 --from" in err  # an upcycled checkpoint into a dense stage


def test_robustness_bench_measures_exact_match_on_every_shift(llava_run, tmp_path):
    """bench/robustness.py on a generative checkpoint: a row per shift and severity, per
    question kind; the unshifted row is `vlmoe eval`'s exact match on the same questions."""
    import subprocess
    import sys

    from vlmoe.data import load_easyvqa
    from vlmoe.llava.family import evaluate_split, load_llava
    from vlmoe.robustness import default_shifts

    bench = Path(__file__).resolve().parents[2] / "bench" / "robustness.py"
    out = tmp_path / "rob.json"
    p = subprocess.run([sys.executable, str(bench), "--checkpoint", str(llava_run),
                        "--max-images", "4", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shift"], r["severity"]) for r in rows] == [
        (s.name, s.severity) for s in default_shifts()
    ]
    ck = load_llava(llava_run)
    test = load_easyvqa("test", ck.config.model.image_size)
    sub = test.subset((test.image_index < 4).nonzero().flatten())
    want = evaluate_split(ck, sub)
    assert rows[0]["n"] == want.n and abs(rows[0]["accuracy"] - want.accuracy) < 1e-9
