"""`vlmoe inspect` and the routing analysis: exact recovery of hand-set routing, the files of a
real run, clean errors, and the routing statistics written during training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from easy_vqa import get_test_image_paths
from PIL import Image

from vlmoe.analysis import analyse, collect_routing, nmi, specialization
from vlmoe.analysis.stats import conditional_specialization, patch_content
from vlmoe.config import ModelConfig
from vlmoe.data import WordTokenizer, encoded_questions, load_data
from vlmoe.models import build_model
from vlmoe.moe import MoEConfig
from vlmoe.train import CollapseMonitor

FILES = (
    "report.md",
    "report.html",
    "load.png",
    "specialization.png",
    "patches.png",
    "text_experts.md",
    "routing.json",
)


# ----------------------------------------------------------------------------- pure numbers


def test_nmi_exact_values():
    x = np.array([0, 0, 1, 1, 2, 2])
    assert nmi(x, x) == pytest.approx(1.0)
    assert nmi(x, np.array([5, 5, 7, 7, 9, 9])) == pytest.approx(1.0)  # a relabelling
    assert nmi(x, np.zeros(6, int)) == 0.0  # a constant label says nothing
    # a full product design: every (x, y) pair equally often → independent → exactly 0
    xx, yy = np.meshgrid(np.arange(4), np.arange(3), indexing="ij")
    assert nmi(xx.ravel(), yy.ravel()) == pytest.approx(0.0, abs=1e-12)


def test_specialization_baseline_is_small_and_u_expert_flags_a_function():
    rng = np.random.default_rng(0)
    word = rng.integers(0, 30, size=20_000)
    expert = word % 4  # routing is a function of the word, but 30 words share 4 experts
    s = specialization(
        expert, {"word": word, "noise": rng.integers(0, 5, 20_000)}, 4, permutations=3
    )
    assert s["word"]["u_expert"] == pytest.approx(1.0)
    assert 0.3 < s["word"]["nmi"] < 1.0
    assert 0.0 < s["word"]["baseline"] < 0.01
    assert s["noise"]["nmi"] < 0.01 and s["noise"]["nmi"] == pytest.approx(
        s["noise"]["baseline"], abs=2e-3
    )


def test_answer_within_kind_separates_kind_from_answer():
    rng = np.random.default_rng(0)
    kind = rng.integers(0, 3, 30_000)
    answer = kind * 4 + rng.integers(0, 4, 30_000)  # the kind is implied by the answer
    by_kind = conditional_specialization(kind, answer, kind, permutations=2)
    assert by_kind["nmi"] == pytest.approx(
        0.0, abs=1e-9
    )  # an expert per kind tells nothing more about the answer
    assert nmi(kind, answer) > 0.5  # … though the plain answer NMI is high
    by_answer = conditional_specialization(answer % 4, answer, kind, permutations=2)
    assert by_answer["nmi"] == pytest.approx(1.0) and by_answer["baseline"] < 0.01


def test_patch_content_finds_the_object():
    img = np.full((1, 3, 16, 16), 240, np.uint8)
    img[0, 0, 4:12, 4:8] = 10  # a red-channel block covering patch (1, 1) fully, (1, 2) half…
    c = patch_content(img, 4).reshape(4, 4)
    assert c[1, 1] == 2 and c[2, 1] == 2  # fully inside
    assert c[0, 0] == 0 and c[3, 3] == 0 and c[1, 2] == 0  # background
    img[0, 0, 4:12, 5:9] = 10
    assert patch_content(img, 4).reshape(4, 4)[1, 2] == 1  # edge


# ----------------------------------------------------------------------------- hand-set router


def _one_hot_pair(e: int, E: int, D: int, c: float = 10.0) -> torch.Tensor:
    """A vector whose LayerNorm ranks dim e first and dim (e + 1) % E second."""
    v = torch.zeros(D)
    v[e] = 2 * c
    v[(e + 1) % E] = c
    return v


@torch.no_grad()
def test_hand_set_routing_is_recovered_exactly():
    """Vision: patch p → expert p (16 patches, 16 experts). Text: word id w → expert w % 16.
    Attention and the conv stem are zeroed so that each FFN's router sees only the position
    (vision) or word (text) embedding, and router rows are one-hot."""
    split = load_data("easy-vqa", "test", 32).subset(range(48))
    tok = WordTokenizer.build(split.questions)
    answers = sorted(set(split.answers))
    E, D = 16, 32
    cfg = ModelConfig(
        image_size=32,
        patch_size=8,
        stem_channels=8,
        max_text_len=16,
        d_model=D,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        moe_layers=(0,),
        vocab_size=tok.vocab_size,
        num_answers=len(answers),
        moe=MoEConfig(d_model=D, d_ff=32, num_experts=E, top_k=2),
    )
    model = build_model(cfg).eval()
    blk = model.blocks[0]
    blk.attn.proj.weight.zero_()
    blk.attn.proj.bias.zero_()
    model.vision.stem[-1].weight.zero_()
    model.vision.stem[-1].bias.zero_()
    model.text.pos_LD.zero_()
    for p in range(16):
        model.vision.pos_PD[p] = _one_hot_pair(p, E, D)
    for w in range(tok.vocab_size):
        model.text.tok_VD.weight[w] = _one_hot_pair(w % E, E, D)
    for ffn in (blk.ffn_vision, blk.ffn_text):
        ffn.ffn.router.weight.zero_()
        ffn.ffn.router.weight[:, :E] = torch.eye(E)

    traces, _ = collect_routing(model, split, tok, answers, batch_size=20)
    assert set(traces) == {"layer0.vision", "layer0.text"}
    v, t = traces["layer0.vision"], traces["layer0.text"]
    assert np.array_equal(v.top1, v.position)  # every patch went to "its" expert
    assert np.array_equal(t.top1, t.word % E)  # every word went to "its" expert
    ids, lengths = encoded_questions(split, tok, cfg.max_text_len)
    valid = torch.arange(ids.shape[1]) < lengths[:, None]
    expected_text = np.bincount(ids[valid].numpy() % E, minlength=E)

    res = analyse(traces, split, tok, patch_size=8, permutations=3)
    fv, ft = res["ffns"]["layer0.vision"], res["ffns"]["layer0.text"]
    assert fv["share_top1"] == pytest.approx([1 / E] * E)
    assert fv["share"] == pytest.approx([1 / E] * E)  # second choices are p + 1: uniform too
    assert fv["dead"] == [] and fv["imbalance"] == pytest.approx(1.0) and fv["dropped"] == 0
    assert ft["share_top1"] == pytest.approx((expected_text / expected_text.sum()).tolist())
    sv, st = fv["specialization"], ft["specialization"]
    assert sv["position"]["nmi"] == pytest.approx(1.0)  # routing = patch position
    for var in ("question kind", "answer", "answer within kind"):  # every question: all patches
        assert sv[var]["nmi"] == pytest.approx(0.0, abs=1e-9), var
    assert st["word"]["u_expert"] == pytest.approx(1.0)  # routing is a function of the word
    assert sv["modality"]["by_construction"] and sv["modality"]["u_label"] == pytest.approx(1.0)
    assert res["position_mode"]["layer0.vision"]["expert"] == list(range(16))
    assert res["position_mode"]["layer0.vision"]["share"] == pytest.approx([1.0] * 16)
    # text_experts: expert e's words are exactly the words with id % E == e
    vocab = tok.vocab()
    for row in res["text_experts"]["layer0.text"]:
        for w in row["top_words"]:
            assert vocab[w["word"]] % E == row["expert"] and w["of_word"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- a real run


def test_inspect_tiny_checkpoint_writes_every_file(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "insp"
    rc, stdout, err = run_cli(
        capsys,
        "inspect",
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--max-questions",
        "200",
        "--samples",
        "3",
        "--permutations",
        "2",
    )
    assert rc == 0, err
    assert "report" in stdout
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("load.png", "specialization.png", "patches.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.size[0] > 200 and im.size[1] > 200
    res = json.loads((out / "routing.json").read_text())
    assert res["meta"]["questions"] == 200 and len(res["meta"]["samples"]) == 3
    assert set(res["ffns"]) == {"layer1.vision", "layer1.text"}
    for name, f in res["ffns"].items():
        assert sum(f["share"]) == pytest.approx(1.0), name
        assert sum(f["share_top1"]) == pytest.approx(1.0), name
        assert 0.0 <= f["entropy"] <= f["entropy_max"] + 1e-6
        assert f["imbalance"] >= 1.0 and f["dropped"] == 0.0
        for var, s in f["specialization"].items():
            assert 0.0 <= s["nmi"] <= 1.0 and 0.0 <= s["baseline"] <= 1.0, var
    assert res["ffns"]["layer1.vision"]["tokens"] == 200 * 16
    assert "word" in res["ffns"]["layer1.text"]["specialization"]
    md = (out / "report.md").read_text()
    assert "load.png" in md and "| `layer1.vision` |" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "src='load.png'" not in html
    assert "layer1.text" in (out / "text_experts.md").read_text()


def test_inspect_jsonl_data_and_default_out(tiny_checkpoint, tmp_path, capsys):
    paths = list(get_test_image_paths().values())[:2]
    lines = [
        {"image": paths[0], "question": "what shape is this?", "answer": "triangle"},
        {"image": paths[1], "question": "is there a zebra?", "answer": "maybe"},
    ]
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ck = tmp_path / "ck"
    import shutil

    shutil.copytree(tiny_checkpoint, ck)
    rc, stdout, err = run_cli(
        capsys,
        "inspect",
        "--checkpoint",
        str(ck),
        "--data",
        str(f),
        "--json",
        "--permutations",
        "1",
    )
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["questions"] == 2 and summary["out"] == str(ck / "inspect")
    assert all((ck / "inspect" / n).is_file() for n in FILES)


# ----------------------------------------------------------------------------- errors


def _one_error_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmoe: error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_inspect_bad_paths_give_one_line(tiny_checkpoint, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "inspect", "--checkpoint", str(tmp_path / "nowhere"))
    _one_error_line(rc, err, "nowhere", "not found")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    rc, _, err = run_cli(capsys, "inspect", "--checkpoint", str(broken))
    _one_error_line(rc, err, "broken")
    rc, _, err = run_cli(
        capsys,
        "inspect",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(tmp_path / "missing.jsonl"),
        "--out",
        str(tmp_path / "o"),
    )
    _one_error_line(rc, err, "missing.jsonl")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    rc, _, err = run_cli(
        capsys, "inspect", "--checkpoint", str(tiny_checkpoint), "--out", str(a_file)
    )
    _one_error_line(rc, err, "file.txt", "not a folder")


# ----------------------------------------------------------------------------- during training


def test_training_logs_routing_lines_whose_shares_sum_to_one(tiny_checkpoint):
    lines = [json.loads(s) for s in (tiny_checkpoint / "metrics.jsonl").read_text().splitlines()]
    routing = [m for m in lines if m["kind"] == "routing"]
    assert routing
    for m in routing:
        assert set(m["layers"]) == {"layer1.vision", "layer1.text"}
        for name, s in m["layers"].items():
            assert len(s["share"]) == 4 and sum(s["share"]) == pytest.approx(1.0, abs=1e-3), name
            assert s["imbalance"] >= 1.0 and 0.0 <= s["dropped"] <= 1.0 and s["entropy"] >= 0.0


def test_collapse_monitor_warns_once_after_patience():
    mon = CollapseMonitor(share=0.5, patience=3)
    collapsed = [0.9, 0.1, 0.0, 0.0]
    assert mon.update(1, "layer1.text", collapsed) == []
    assert mon.update(2, "layer1.text", collapsed) == []
    warned = mon.update(3, "layer1.text", collapsed)
    assert len(warned) == 3  # expert 0 flooded, experts 2 and 3 dead
    assert any("expert 0" in w and "> 50%" in w for w in warned)
    assert mon.update(4, "layer1.text", collapsed) == []  # one warning per sustained span
    assert mon.update(5, "layer1.text", [0.25] * 4) == []  # balanced: streaks reset
    for step in (6, 7):
        assert mon.update(step, "layer1.text", collapsed) == []
    assert len(mon.update(8, "layer1.text", collapsed)) == 3
