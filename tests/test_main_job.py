"""The main job end to end through main([...]): train → save → load → eval → ask, resume."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import last_json, run_cli
from easy_vqa import get_test_image_paths
from safetensors.torch import load_file

from vlmoe.checkpoint import load_checkpoint, save_checkpoint
from vlmoe.config import get_preset
from vlmoe.data import Batch
from vlmoe.models import build_model
from vlmoe.train import prepare_data


def test_train_writes_a_readable_checkpoint(tiny_checkpoint):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "trainer_state.json",
        "trainer_state",
    ):
        assert (tiny_checkpoint / name).exists(), name
    meta = json.loads((tiny_checkpoint / "config.json").read_text())
    assert meta["run"]["preset"] == "tiny"
    assert sorted(meta["answers"]) == meta["answers"] and len(meta["answers"]) == 13
    kinds = [
        json.loads(line)["kind"]
        for line in (tiny_checkpoint / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"train", "routing", "val", "test"} <= set(kinds)


def test_eval_json_reports_accuracy_per_kind(tiny_checkpoint, capsys):
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", str(tiny_checkpoint), "--json")
    assert rc == 0
    res = last_json(out)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["n"] == 9673
    assert set(res["per_kind"]) == {"yes/no", "color", "shape"}
    # the per-kind accuracies, weighted by their counts, give the overall accuracy
    total = sum(v["accuracy"] * v["n"] for v in res["per_kind"].values())
    assert total / res["n"] == pytest.approx(res["accuracy"], abs=1e-6)


def test_ask_json_answers_from_the_answer_set(tiny_checkpoint, capsys):
    path = get_test_image_paths()[0]
    rc, out, _ = run_cli(
        capsys,
        "ask",
        "--checkpoint",
        str(tiny_checkpoint),
        "--image",
        path,
        "--json",
        "what shape is in the image?",
    )
    assert rc == 0
    res = last_json(out)
    answers = json.loads((tiny_checkpoint / "config.json").read_text())["answers"]
    assert res["answer"] in answers and len(res["top"]) == 3
    probs = [t["prob"] for t in res["top"]]
    assert probs == sorted(probs, reverse=True) and res["top"][0]["answer"] == res["answer"]


def test_saved_and_reloaded_model_give_identical_logits(tmp_path):
    cfg = get_preset("tiny")
    train_split, _, tok, answers = prepare_data(cfg)
    import dataclasses

    mcfg = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, num_answers=len(answers))
    cfg = dataclasses.replace(cfg, model=mcfg)
    torch.manual_seed(0)
    model = build_model(mcfg).eval()
    save_checkpoint(tmp_path / "ck", cfg, model, tok, answers, [])
    ck = load_checkpoint(tmp_path / "ck")
    imgs = (train_split.images[:8].float() / 255 - 0.5) / 0.5
    ids, mask = tok.encode_batch(train_split.questions[:8], max_len=mcfg.max_text_len)
    batch = Batch(imgs, ids, mask, None, torch.arange(8))
    with torch.no_grad():
        assert torch.equal(model(batch).logits, ck.model(batch).logits)


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, capsys):
    common = ["--preset", "tiny", "--no-progress", "--epochs", "1", "--seed", "3"]
    rc, _, _ = run_cli(capsys, "train", *common, "--out", str(tmp_path / "a"))
    assert rc == 0
    rc, out, _ = run_cli(
        capsys, "train", *common, "--out", str(tmp_path / "b"), "--stop-after", "9", "--json"
    )
    assert rc == 0 and last_json(out)["step"] == 9
    rc, out, _ = run_cli(
        capsys, "train", "--out", str(tmp_path / "b"), "--resume", "--no-progress", "--json"
    )
    assert rc == 0 and last_json(out)["step"] == last_json(out)["total_steps"]
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_the_default_presets_augmentation_only_on_easy_vqa(tmp_path, capsys):
    from vlmoe.cli import _train_config, build_parser

    def augment(*argv: str):
        return _train_config(build_parser().parse_args(["train", *argv])).train.augment

    assert augment().enabled and augment().start_epoch == 2  # the main job augments
    assert not augment("--no-augment").enabled
    extra = _train_config(build_parser().parse_args(["train", "--no-augment"])).train.scene_extra
    assert extra == 0 < _train_config(build_parser().parse_args(["train"])).train.scene_extra
    # a user's pictures need not be one shape on a light background: off, and said so
    paths = list(get_test_image_paths().values())[:20]
    f = tmp_path / "mine.jsonl"
    f.write_text(
        "".join(
            json.dumps({"image": p, "question": "what shape is this?", "answer": "circle"}) + "\n"
            for p in paths
        )
    )
    argv = ["--data", str(f), "--batch-size", "8", "--stop-after", "1", "--no-progress"]
    rc, _, err = run_cli(capsys, "train", *argv, "--out", str(tmp_path / "ck"))
    assert rc == 0, err
    assert "augmentation, scene head and flipped views are off for --data" in err
    saved = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert saved["run"]["train"]["augment"]["prob"] == 1.0  # AugmentConfig(): nothing on
    assert saved["run"]["model"]["scene_loss"] == 0 and saved["run"]["train"]["scene_extra"] == 0
    assert not load_checkpoint(tmp_path / "ck").config.train.augment.enabled
