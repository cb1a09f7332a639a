"""The JSON API of a real `vlmoe serve` process over loopback HTTP: answers, routing, bad
input (4xx JSON, and the server goes on), a bounded burst of concurrent requests, the CLI."""

from __future__ import annotations

import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import easy_vqa
import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image

from vlmoe.serve.app import DEFAULT_MAX_UPLOAD
from vlmoe.serve.harness import multipart, request

QUESTION = "what shape is in the image?"


def _png(i: int = 0) -> bytes:
    with open(easy_vqa.get_test_image_paths()[i], "rb") as f:
        return f.read()


def _ask(url: str, image: bytes | None, question: str | None = QUESTION, **fields: str):
    data = {"question": question} if question is not None else {}
    data.update(fields)
    files = {"image": ("shape.png", image, "image/png")} if image is not None else None
    body, ctype = multipart(data, files)
    return request(url + "api/ask", body, ctype)


def test_health_and_info(server):
    assert request(server.url + "api/health") == (200, {"status": "ok", "models": 2})
    status, info = request(server.url + "api/info")
    assert status == 200
    moe, dense = info["models"]
    assert (moe["id"], dense["id"]) == ("a", "b")
    assert [layer["name"] for layer in moe["layers"]] == ["layer1.vision", "layer1.text"]
    assert dense["layers"] == [] and dense["preset"] == "dense-tiny"
    for layer in moe["layers"]:
        assert len(layer["colors"]) == layer["num_experts"] == 4 and layer["top_k"] == 2
        assert sum(layer["train_load"]) == pytest.approx(1, abs=1e-3)
    assert moe["grid"] == 4 and len(moe["answers"]) == 13
    assert info["max_upload_bytes"] == DEFAULT_MAX_UPLOAD


def test_ask_answers_with_routing_from_both_models(server):
    status, res = _ask(server.url, _png(0))
    assert status == 200, res
    assert res["model"] == "a" and res["answer"] == res["top"][0]["answer"]
    assert [layer["name"] for layer in res["layers"]] == ["layer1.vision", "layer1.text"]
    assert len(res["layers"][0]["positions"]) == 16
    assert res["timing_ms"]["total"] >= res["timing_ms"]["model"] > 0
    status, dense = _ask(server.url, _png(0), model="b")
    assert status == 200 and dense["model"] == "b" and dense["layers"] == []
    # the same input answers the same way again
    again = _ask(server.url, _png(0))[1]
    assert [t["answer"] for t in again["top"]] == [t["answer"] for t in res["top"]]


def _noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_large_upload_is_answered_in_memory(server):
    big = _noise_png(1000)  # ~3 MB: over Starlette's 1 MB spool, under the 4 MiB limit
    assert 1024 * 1024 < len(big) < DEFAULT_MAX_UPLOAD
    status, res = _ask(server.url, big)
    assert status == 200, res
    # (the fixture checks at teardown that the server's TMPDIR stayed empty)


def _huge_canvas_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, "PNG")  # 25 M pixels in a few kB
    return buf.getvalue()


BAD = [
    # (case, body, content type, expected status, expected words in the error)
    ("not an image", ("image", b"hello, I am text"), None, 415, "cannot decode image"),
    ("empty file", ("image", b""), None, 422, "empty file"),
    ("too large", ("image", b"\0" * (DEFAULT_MAX_UPLOAD + 70_000)), None, 413, "too large"),
    ("huge canvas", ("image", "huge"), None, 413, "image too large (5000×5000"),
    ("empty question", ("question", "   "), None, 422, "non-empty question"),
    ("too long question", ("question", "why " * 200), None, 422, "at most 500 characters"),
    ("no question", ("question", None), None, 422, "question: expected a text field"),
    ("no image", ("image", None), None, 422, "image: expected a file field"),
    ("unknown model", ("model", "zzz"), None, 404, "model 'zzz'"),
    ("not multipart", b'{"question": "hi"}', "application/json", 415, "multipart/form-data"),
    ("broken multipart", b"--x\r\ngarbage", "multipart/form-data; boundary=y", 400, "malformed"),
    ("no boundary", b"abc", "multipart/form-data", 400, "malformed"),
]


def _bad_body(spec, content_type):
    if isinstance(spec, bytes):
        return spec, content_type
    field, value = spec
    fields = {"question": QUESTION}
    files = {"image": ("up.png", _png(1), "image/png")}
    if field == "image":
        if value is None:
            files = {}
        else:
            files = {"image": ("up.png", _huge_canvas_png() if value == "huge" else value, "x/y")}
    elif value is None:
        del fields[field]
    else:
        fields[field] = value
    return multipart(fields, files)


@pytest.mark.parametrize("case,spec,ctype,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_a_4xx_json_error_and_the_server_goes_on(
    server, case, spec, ctype, code, words
):
    body, content_type = _bad_body(spec, ctype)
    status, res = request(server.url + "api/ask", body, content_type)
    assert status == code, (case, res)
    assert isinstance(res, dict) and res["status"] == code and words in res["error"], res
    assert "\n" not in res["error"]
    assert _ask(server.url, _png(2))[0] == 200  # still serving


@pytest.mark.parametrize(
    "path,code",
    [
        ("api/examples/99", 404),
        ("api/examples/-1", 404),
        ("static/..%2F..%2F__init__.py", 404),
        ("static/index.html", 404),
        ("api/nothing", 404),
    ],
)
def test_unknown_paths_are_404_json_and_no_file_is_opened(server, path, code):
    status, res = request(server.url + path)
    assert status == code and res["status"] == code and res["error"]


def test_pages_and_examples_are_served(server):
    status, html = request(server.url)
    assert status == 200 and b'<script src="/static/app.js">' in html
    assert b"http" not in html.replace(b"http-equiv", b"")  # nothing from the network
    status, js = request(server.url + "static/app.js")
    assert status == 200 and b"/api/ask" in js and b"http" not in js
    status, examples = request(server.url + "api/examples")
    assert status == 200 and len(examples) == 6
    status, png = request(server.url + examples[0]["url"].lstrip("/"))
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bounded_concurrent_burst_all_answered(server):
    images = [_png(i) for i in range(4)]
    deadline = time.monotonic() + 60

    def one(i: int) -> int:
        assert time.monotonic() < deadline, "burst over its time bound"
        return _ask(server.url, images[i % 4])[0]

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(32)))
    assert codes == [200] * 32


def test_cli_bad_checkpoint_and_busy_port(capsys, tmp_path, tiny_checkpoint):
    rc, _, err = run_cli(capsys, "serve", "--checkpoint", str(tmp_path / "nope"), "--port", "0")
    assert rc == 1 and err.startswith("vlmoe: error: ") and "checkpoint folder not found" in err
    assert len(err.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, _, err = run_cli(
            capsys, "serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port)
        )
    assert rc == 1 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err
    rc, _, err = run_cli(capsys, "serve", "--checkpoint", str(tiny_checkpoint), "--port", "70000")
    assert rc == 1 and "--port: expected 0 to 65535" in err


def test_info_json_is_plain(server):
    # usable with curl: every /api response is plain JSON with the right content type
    status, info = request(server.url + "api/info")
    assert status == 200 and json.loads(json.dumps(info)) == info
