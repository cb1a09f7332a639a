"""`vlmoe.serve.inference` in process: the routing JSON against the model's own output."""

from __future__ import annotations

import io

import easy_vqa
import pytest
import torch
from PIL import Image

from vlmoe.checkpoint import load_checkpoint
from vlmoe.data import DataError, decode_image_bytes, load_image
from vlmoe.evaluate import answer_question
from vlmoe.serve.inference import (
    ask,
    load_served_model,
    make_batch,
    question_tokens,
    run_model,
    training_load,
)

QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    return load_served_model(str(tiny_checkpoint), "a")


@pytest.fixture(scope="module")
def image(served):
    return load_image(easy_vqa.get_test_image_paths()[0], served.image_size)


def test_answer_matches_the_ask_command_path(served, image):
    ck = served.checkpoint
    res = ask(served, image, QUESTION, top=3)
    expected = answer_question(ck.model, ck.tokenizer, ck.answers, image, QUESTION, top=3)
    assert [t["answer"] for t in res["top"]] == [a for a, _ in expected]
    for t, (_, p) in zip(res["top"], expected, strict=True):
        assert t["prob"] == pytest.approx(p, abs=1e-4)
    assert res["answer"] == expected[0][0]
    assert res["task"] == "answer" and res["model"] == "a"


def test_layers_are_the_forward_routing(served, image):
    res = ask(served, image, QUESTION)
    out = run_model(served.checkpoint.model, make_batch([image], [QUESTION], served.checkpoint))
    assert [layer["name"] for layer in res["layers"]] == [r.name for r in out.routing]
    assert [layer["name"] for layer in served.layers] == [r.name for r in out.routing]
    tokens = res["question"]["tokens"]
    assert tokens == ["[CLS]", "what", "color", "is", "the", "shape", "?"]
    P = served.grid**2
    for layer, rec in zip(res["layers"], out.routing, strict=True):
        E, K = layer["num_experts"], layer["top_k"]
        n = P if layer["modality"] == "vision" else len(tokens)
        assert layer["positions"] == list(range(n))
        assert layer["experts"] == rec.routing.indices.tolist()
        assert len(layer["weights"]) == n and all(len(w) == K for w in layer["weights"])
        for w in layer["weights"]:
            assert w == sorted(w, reverse=True) and sum(w) == pytest.approx(1, abs=1e-3)
        # request load = histogram of the chosen experts over all k slots
        counts = torch.bincount(torch.tensor(layer["experts"]).flatten(), minlength=E)
        assert layer["load"] == pytest.approx((counts / (n * K)).tolist(), abs=1e-4)
        assert layer["train_load"] == served.train_load[layer["name"]]


def test_concurrent_questions_share_a_forward_and_get_their_own_answers(served):
    """Batcher.forward on 6 requests at once gives each the answer and routing it gets alone."""
    from vlmoe.serve.inference import Batcher, _Pending

    paths = easy_vqa.get_test_image_paths()
    qs = ["what color is the shape?", "is there a circle?", "what shape is this?"] * 2
    items = [_Pending(load_image(paths[i], served.image_size), q) for i, q in enumerate(qs)]
    batcher = Batcher(served.checkpoint)
    batcher.forward(items)
    for p in items:
        assert p.done and p.error is None and p.result[3] == len(items)
        alone = _Pending(p.image, p.question)
        batcher.forward([alone])
        logits, routing, _, n = p.result
        assert n == 6 and alone.result[3] == 1
        assert torch.allclose(logits, alone.result[0], atol=1e-4)
        for r, a in zip(routing, alone.result[1], strict=True):
            assert r.name == a.name and torch.equal(r.positions, a.positions)
            assert torch.allclose(r.weights, a.weights, atol=1e-4)
            clear = (a.weights[:, 0] - a.weights[:, 1]).abs() > 1e-3  # no near-tie to flip
            assert torch.equal(r.indices[clear], a.indices[clear])
    assert [len(r.positions) for r in items[1].result[1]] == [16, 6]  # [CLS] is there a circle ?


def test_a_failing_forward_wakes_every_waiter_with_the_error(served):
    from vlmoe.serve.inference import Batcher

    batcher = Batcher(served.checkpoint)
    with pytest.raises(RuntimeError):  # 4 channels: the model itself raises
        batcher.run(torch.zeros(4, 32, 32, dtype=torch.uint8), "what?")
    assert batcher.run(torch.zeros(3, 32, 32, dtype=torch.uint8), "what?")[3] == 1


def test_image_is_echoed_as_the_model_saw_it(served, image):
    import base64

    png = ask(served, image, QUESTION)["image"]["png"].split(",", 1)[1]
    with Image.open(io.BytesIO(base64.b64decode(png))) as im:
        assert im.size == (served.image_size, served.image_size)
        assert torch.equal(torch.from_numpy(__import__("numpy").array(im)).permute(2, 0, 1), image)


def test_training_load_is_the_mean_of_the_logged_shares(tiny_checkpoint):
    metrics = load_checkpoint(tiny_checkpoint).metrics
    lines = [m for m in metrics if m.get("kind") == "routing"]
    assert lines, "the tiny run logs routing"
    load = training_load(metrics)
    for name, share in load.items():
        mean = [
            sum(m["layers"][name]["share"][e] for m in lines) / len(lines)
            for e in range(len(share))
        ]
        assert share == pytest.approx(mean, abs=1e-4)
        assert sum(share) == pytest.approx(1, abs=1e-3)
    junk = [
        {"kind": "routing", "layers": {"x": {"share": "bad"}}},
        {"kind": "routing"},
        {"step": 1},
    ]
    assert training_load(
        junk + [{"kind": "routing", "layers": {"x": {"share": [0.25, 0.75]}}}]
    ) == {"x": [0.25, 0.75]}


def test_question_tokens_follow_the_encoding_and_its_cut(served):
    tok = served.checkpoint.tokenizer
    assert question_tokens(tok, "Is the SHAPE red?", 16) == [
        "[CLS]",
        "is",
        "the",
        "shape",
        "red",
        "?",
    ]
    assert question_tokens(tok, "a b c d e", 3) == ["[CLS]", "a", "b"]
    ids, _ = tok.encode_batch(["a b c d e"], max_len=3)
    assert ids.shape[1] == 3


def test_decode_image_bytes_matches_load_image_and_names_bad_input(tmp_path):
    path = easy_vqa.get_test_image_paths()[3]
    with open(path, "rb") as f:
        assert torch.equal(decode_image_bytes(f.read(), 32, name="up"), load_image(path, 32))
    with pytest.raises(DataError, match=r"^up\.txt: cannot decode image"):
        decode_image_bytes(b"not an image at all", 32, name="up.txt")
    buf = io.BytesIO()
    Image.new("L", (300, 200)).save(buf, format="PNG")
    with pytest.raises(DataError, match=r"big: image too large \(300×200 pixels"):
        decode_image_bytes(buf.getvalue(), 32, name="big", max_pixels=300 * 199)
