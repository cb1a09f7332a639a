"""The bad-input cases of `tests/test_bad_input.py` and `docs/bad-input.md`, in one table.

Each case prepares a sandbox folder S (a copy of the tiny checkpoint in S/ck, a valid image
S/img.png, a valid JSONL file S/data.jsonl, a user's file S/notes.txt and a user's folder
S/docs), breaks one thing, and runs one command that must fail with exactly one line
`vlmoe: error: ...` containing `needle`, exit code 1, and no file changed under S.

`python tests/bad_input_cases.py` prints the table of docs/bad-input.md (it trains a tiny
checkpoint first, ~30 s) with the line each case gives today.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Setup = Callable[[Path], None]


@dataclass
class Case:
    id: str
    what: str  #: the mistake, for the docs table
    argv: list[str]  #: "{S}" stands for the sandbox folder
    needle: str  #: a piece of the one error line
    setup: Setup | None = None
    root_skips: bool = False  #: a permission case: root reads and writes anyway

    def args(self, sandbox: Path) -> list[str]:
        return [a.replace("{S}", str(sandbox)) for a in self.argv]


# ----------------------------------------------------------------------------- sandbox

GOOD_LINES = [
    {"image": "img.png", "question": "what shape is in the image?", "answer": "circle"},
    {"image": "img.png", "question": "is there a blue shape?", "answer": "no"},
    {"image": "img.png", "question": "what color is the shape?", "answer": "red"},
]


def make_sandbox(root: Path, checkpoint: Path, image: str | Path) -> Path:
    """Fill `root` with the files every case starts from; returns root."""
    shutil.copytree(checkpoint, root / "ck")
    shutil.copy(image, root / "img.png")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD_LINES))
    (root / "notes.txt").write_text("a user's file that vlmoe must never touch\n")
    (root / "docs").mkdir()
    (root / "docs" / "paper.txt").write_text("a user's folder that vlmoe must never replace\n")
    return root


def tree_hash(root: Path) -> str:
    """A hash of every name, type, permission and byte under `root`."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            h.update(f"{p.relative_to(root)}\0{st.st_mode}\0".encode("utf-8", "surrogateescape"))
            if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK):
                h.update(p.read_bytes())
    return h.hexdigest()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header that claims width × height pixels and holds none (a decompression bomb's
    first bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- setups


def write(name: str, content: bytes | str) -> Setup:
    def f(s: Path) -> None:
        p = s / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)

    return f


def write_tiff_prefix(name: str, n: int) -> Setup:
    """The first n bytes of a small TIFF: Pillow warns ("Corrupt EXIF data") and then fails."""

    def f(s: Path) -> None:
        import io

        from PIL import Image

        b = io.BytesIO()
        Image.new("RGB", (20, 17), (200, 10, 30)).save(b, "TIFF")
        (s / name).write_bytes(b.getvalue()[:n])

    return f


def jsonl_with(line: str | dict) -> Setup:
    """data.jsonl with one more line (after the good ones)."""
    extra = line if isinstance(line, str) else json.dumps(line)
    text = "".join(json.dumps(r) + "\n" for r in GOOD_LINES) + extra + "\n"
    return write("data.jsonl", text)


def edit_config(fn: Callable[[dict], object]) -> Setup:
    def f(s: Path) -> None:
        p = s / "ck" / "config.json"
        meta = json.loads(p.read_text())
        fn(meta)
        p.write_text(json.dumps(meta))  # allow_nan: NaN/Infinity spelt as Python's json does

    return f


def set_field(path: str, value: object) -> Setup:
    def fn(meta: dict) -> None:
        *parents, last = path.split(".")
        d = meta["run"]
        for k in parents:
            d = d[k]
        d[last] = value

    return edit_config(fn)


def edit_weights(fn: Callable[[dict], object]) -> Setup:
    def f(s: Path) -> None:
        from safetensors.torch import load_file, save_file

        p = s / "ck" / "model.safetensors"
        state = load_file(str(p))
        fn(state)
        save_file(state, str(p))

    return f


def _poison(value: float) -> Callable[[dict], None]:
    def fn(state: dict) -> None:
        state[sorted(state)[0]].view(-1)[0] = value

    return fn


def _reshape_first(state: dict) -> None:
    import torch

    state[sorted(state)[0]] = torch.zeros(1)


def _boolify_first(state: dict) -> None:
    k = sorted(state)[0]
    state[k] = state[k] > 0


def truncate(name: str) -> Setup:
    def f(s: Path) -> None:
        p = s / name
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return f


def replace_by_folder(name: str) -> Setup:
    def f(s: Path) -> None:
        (s / name).unlink()
        (s / name).mkdir()

    return f


def chmod(name: str, mode: int) -> Setup:
    def f(s: Path) -> None:
        os.chmod(s / name, mode)

    return f


def other_tokenizer(s: Path) -> None:
    from vlmoe.data import WordTokenizer

    WordTokenizer.build(["a completely different vocabulary"]).save(s / "ck" / "tokenizer.json")


def remove(name: str) -> Setup:
    def f(s: Path) -> None:
        (s / name).unlink()

    return f


def seq(*fs: Setup) -> Setup:
    def f(s: Path) -> None:
        for g in fs:
            g(s)

    return f


# ----------------------------------------------------------------------------- the cases

TRAIN = [
    "train",
    "--preset",
    "tiny",
    "--data",
    "{S}/data.jsonl",
    "--out",
    "{S}/run",
    "--no-progress",
]
EVAL = ["eval", "--checkpoint", "{S}/ck", "--data", "{S}/data.jsonl", "--json"]
ASK = ["ask", "--checkpoint", "{S}/ck", "--image", "{S}/img.png", "--json"]
#: `vlmoe compare --family generative --from` DIR (DIR appended by each case)
GCOMPARE = ["compare", "--family", "generative", "--out", "{S}/cmp", "--from"]
Q = "what shape is in the image?"


def ask_image(image: str) -> list[str]:
    return ["ask", "--checkpoint", "{S}/ck", "--image", image, "--json", Q]


def _c(id: str, what: str, argv: list[str], needle: str, setup: Setup | None = None, **kw) -> Case:
    return Case(id, what, argv, needle, setup, **kw)


CLI_CASES = [
    _c("lr-nan", "`--lr nan`", TRAIN + ["--lr", "nan"], "--lr"),
    _c("lr-inf", "`--lr inf`", TRAIN + ["--lr", "inf"], "--lr"),
    _c("lr-overflow", "`--lr 1e999` (overflows to inf)", TRAIN + ["--lr", "1e999"], "--lr"),
    _c("lr-negative", "`--lr -0.1`", TRAIN + ["--lr=-0.1"], "--lr"),
    _c("lr-zero", "`--lr 0`", TRAIN + ["--lr", "0"], "--lr"),
    _c("lr-text", "`--lr fast`", TRAIN + ["--lr", "fast"], "--lr"),
    _c("epochs-zero", "`--epochs 0`", TRAIN + ["--epochs", "0"], "--epochs"),
    _c("epochs-nan", "`--epochs NaN`", TRAIN + ["--epochs", "NaN"], "--epochs"),
    _c("batch-zero", "`--batch-size 0`", TRAIN + ["--batch-size", "0"], "--batch-size: expected an integer"),
    _c("batch-float", "`--batch-size 1.5`", TRAIN + ["--batch-size", "1.5"], "--batch-size: expected an integer"),
    _c("batch-huge", "`--batch-size 10**30` (more than the data)", TRAIN + ["--batch-size", str(10**30)], "fewer than one batch"),
    _c("seed-negative", "`--seed -1`", TRAIN + ["--seed=-1"], "--seed"),
    _c("seed-huge", "`--seed 2**64`", TRAIN + ["--seed", str(2**64)], "--seed"),
    _c("threads-zero", "`--threads 0`", TRAIN + ["--threads", "0"], "--threads"),
    _c("threads-huge", "`--threads 100000`", TRAIN + ["--threads", "100000"], "--threads"),
    _c("stop-after-zero", "`--stop-after 0` (would save nothing)", TRAIN + ["--stop-after", "0"], "--stop-after"),
    _c("dist-timeout-nan", "`--dist-timeout nan`", TRAIN + ["--dist-timeout", "nan"], "--dist-timeout"),
    _c("dist-timeout-negative", "`--dist-timeout -5`", TRAIN + ["--dist-timeout=-5"], "--dist-timeout"),
    _c("preset-unknown", "`--preset huge`", ["train", "--preset", "huge"], "unknown preset"),
    _c("preset-not-utf8", "`--preset` with bytes that are not UTF-8", TRAIN + ["--preset", "t\udce9ny"], "not valid UTF-8"),
    _c("device-unknown", "`--device tpu`", TRAIN + ["--device", "tpu"], "--device"),
    _c("device-malformed", "`--device cuda:x`", EVAL + ["--device", "cuda:x"], "--device"),
    _c("option-unknown", "an unknown option `--frobnicate`", TRAIN + ["--frobnicate"], "unrecognized arguments"),
    _c("option-missing-value", "`--lr` with no value", TRAIN + ["--lr"], "expected one argument"),
    _c("command-missing", "no command at all", [], "expected a command"),
    _c("command-unknown", "`vlmoe frob`", ["frob"], "invalid choice"),
    _c("split-unknown", "`eval --split dev`", EVAL + ["--split", "dev"], "--split"),
    _c("out-is-file", "`--out` names an existing file (it is left as it is)", TRAIN[:-3] + ["--out", "{S}/notes.txt"], "not a folder"),
    _c("out-under-file", "`--out` inside a file (`notes.txt/run`)", TRAIN[:-3] + ["--out", "{S}/notes.txt/run"], "is a file"),
    _c("out-user-folder", "`--out` names a folder of the user's (not a checkpoint)", TRAIN[:-3] + ["--out", "{S}/docs", "--overwrite"], "not a vlmoe checkpoint"),
    _c("out-checkpoint-exists", "`--out` holds a checkpoint, no `--resume`/`--overwrite`", TRAIN[:-3] + ["--out", "{S}/ck"], "already there"),
    _c("out-empty", "`--out ''`", TRAIN[:-3] + ["--out", ""], "--out"),
    _c("out-tmp-is-file", "`--out run` while `run.tmp` is a file", TRAIN, "run.tmp", write("run.tmp", "x")),
    _c("out-read-only", "`--out` under a folder no one may write (`/proc/sys`)", TRAIN[:-3] + ["--out", "/proc/sys/vlmoe-run"], "cannot write"),
    _c("out-no-permission", "`--out` in a folder without write permission (chmod 555)", TRAIN[:-3] + ["--out", "{S}/locked/run"], "permission denied", seq(write("locked/x", "x"), chmod("locked", 0o555)), root_skips=True),
    _c("resume-nothing", "`--resume` with no checkpoint in `--out`", TRAIN + ["--resume"], "not found"),
    _c("data-missing", "`--data` names no file", TRAIN[:3] + ["--data", "{S}/nope.jsonl"], "file not found"),
    _c("data-device", "`--data /dev/null` (not a regular file)", TRAIN[:3] + ["--data", "/dev/null"], "special file"),
    _c("data-empty-name", "`--data ''`", TRAIN[:3] + ["--data", ""], "--data"),
    _c("data-folder-without-splits", "`--data` a folder without train.jsonl", TRAIN[:3] + ["--data", "{S}/docs"], "train.jsonl"),
    _c("data-unreadable", "`--data` file without read permission (chmod 000)", TRAIN, "permission denied", chmod("data.jsonl", 0), root_skips=True),
    _c("question-empty", "`ask` with a blank question", ASK + ["   "], "question"),
    _c("question-not-utf8", "`ask` with a question in another locale's bytes", ASK + ["caf\udce9?"], "not valid UTF-8"),
    _c("image-missing", "`ask --image` names no file", ask_image("{S}/nope.png"), "not found"),
    _c("image-folder", "`ask --image` is a folder", ask_image("{S}/docs"), "folder"),
    _c("image-device", "`ask --image /dev/null` (not a regular file)", ask_image("/dev/null"), "special file"),
    _c("image-text", "`ask --image` is a text file", ask_image("{S}/notes.txt"), "cannot decode"),
    _c("image-empty", "`ask --image` is an empty file", ask_image("{S}/empty.png"), "cannot decode", write("empty.png", b"")),
    _c("image-truncated", "`ask --image` is a truncated PNG", ASK + [Q], "img.png", truncate("img.png")),
    _c("image-truncated-tiff", "`ask --image` is a TIFF cut after 8 bytes (Pillow warns first)", ask_image("{S}/cut.tif"), "cut.tif", write_tiff_prefix("cut.tif", 8)),
    _c("image-huge", "`ask --image` claims 30000×30000 pixels", ask_image("{S}/bomb.png"), "bomb.png", write("bomb.png", png_claiming(30000, 30000))),
    _c("image-unreadable", "`ask --image` without read permission", ASK + [Q], "permission denied", chmod("img.png", 0), root_skips=True),
    _c("checkpoint-missing", "`eval --checkpoint` names nothing", ["eval", "--checkpoint", "{S}/none"], "not found"),
    _c("checkpoint-is-file", "`eval --checkpoint` is a file", ["eval", "--checkpoint", "{S}/notes.txt"], "it is a file"),
    _c("checkpoint-not-a-checkpoint", "`eval --checkpoint` a folder without a checkpoint", ["eval", "--checkpoint", "{S}/docs"], "missing"),
    _c("inspect-broken-data", "`inspect --data` a broken JSONL (no empty report folder is left)", ["inspect", "--checkpoint", "{S}/ck", "--data", "{S}/bad.jsonl"], "bad.jsonl:1", write("bad.jsonl", "{oops\n")),
    _c("data-folder-too-small", "`--data` a folder whose train.jsonl has 3 questions", TRAIN[:3] + ["--data", "{S}/split", "--out", "{S}/run"], "fewer than one batch", seq(write("split/train.jsonl", "".join(json.dumps({**r, "image": "../img.png"}) + "\n" for r in GOOD_LINES)))),
    _c("inspect-samples-negative", "`inspect --samples -1`", ["inspect", "--checkpoint", "{S}/ck", "--samples=-1"], "--samples"),
    _c("inspect-batch-zero", "`inspect --batch-size 0`", ["inspect", "--checkpoint", "{S}/ck", "--batch-size", "0"], "--batch-size"),
    _c("inspect-out-file", "`inspect --out` is a file", ["inspect", "--checkpoint", "{S}/ck", "--out", "{S}/notes.txt"], "not a folder"),
    _c("compare-capacity-inf", "`compare --capacity-factor inf`", ["compare", "--quick", "--out", "{S}/cmp", "--capacity-factor", "inf"], "--capacity-factor"),
    _c("compare-balance-nan", "`compare --load-balance-weight nan`", ["compare", "--quick", "--out", "{S}/cmp", "--load-balance-weight", "nan"], "--load-balance-weight"),
    _c("compare-out-file", "`compare --out` is a file", ["compare", "--quick", "--out", "{S}/notes.txt"], "not a folder"),
    _c("compare-seeds-zero", "`compare --seeds 0`", ["compare", "--quick", "--out", "{S}/cmp", "--seeds", "0"], "--seeds"),
    _c("compare-generative-vqa", "`compare --family generative --from` a VQA checkpoint", GCOMPARE + ["{S}/ck"], "a vqa checkpoint"),
    _c("compare-generative-missing", "`compare --family generative --from` a folder that does not exist", GCOMPARE + ["{S}/none"], "checkpoint folder not found"),
    _c("compare-generative-no-from", "`compare --family generative` without `--from`", GCOMPARE[:-1], "expected --from DIR"),
    _c("compare-from-vqa-family", "`compare --from` without `--family generative`", ["compare", "--quick", "--out", "{S}/cmp", "--from", "{S}/ck"], "--from: only with --family generative"),
]  # fmt: skip

JSONL_CASES = [
    _c("jsonl-empty", "JSONL file of 0 bytes", TRAIN, "no examples", write("data.jsonl", "")),
    _c("jsonl-blank", "JSONL file of blank lines", TRAIN, "no examples", write("data.jsonl", "\n  \n\n")),
    _c("jsonl-not-utf8", "JSONL file in Latin-1", TRAIN, "not UTF-8", write("data.jsonl", '{"question": "caf\xe9"}\n'.encode("latin-1"))),
    _c("jsonl-truncated", "JSONL whose last line is cut short", TRAIN, "data.jsonl:4", jsonl_with('{"image": "img.png", "quest')),
    _c("jsonl-array", "a JSONL line that is an array", TRAIN, "expected a JSON object", jsonl_with("[1, 2]")),
    _c("jsonl-missing-field", "a line without `answer`", TRAIN, "missing field 'answer'", jsonl_with({"image": "img.png", "question": "q?"})),
    _c("jsonl-number-field", "`question` is a number", TRAIN, "must be a string", jsonl_with({"image": "img.png", "question": 3, "answer": "a"})),
    _c("jsonl-null-field", "`image` is null", TRAIN, "must be a string", jsonl_with({"image": None, "question": "q?", "answer": "a"})),
    _c("jsonl-nan-field", "`answer` is NaN", TRAIN, "must be a string", jsonl_with('{"image": "img.png", "question": "q?", "answer": NaN}')),
    _c("jsonl-empty-question", "`question` is blank", TRAIN, "'question' is empty", jsonl_with({"image": "img.png", "question": " ", "answer": "a"})),
    _c("jsonl-surrogate", "`question` holds a lone surrogate escape (`\\udce9`)", TRAIN, "not valid Unicode", jsonl_with('{"image": "img.png", "question": "caf\\udce9", "answer": "a"}')),
    _c("jsonl-deep", "a line nested 100,000 levels deep", TRAIN, "nested too deeply", jsonl_with("[" * 100_000 + "]" * 100_000)),
    _c("jsonl-image-missing", "a line's image does not exist", TRAIN, "image file not found", jsonl_with({"image": "nope.png", "question": "q?", "answer": "a"})),
    _c("jsonl-image-folder", "a line's image is a folder", TRAIN, "got a directory", jsonl_with({"image": "docs", "question": "q?", "answer": "a"})),
    _c("jsonl-image-text", "a line's image is a text file", TRAIN, "cannot decode image", jsonl_with({"image": "notes.txt", "question": "q?", "answer": "a"})),
    _c("jsonl-image-huge", "a line's image claims 30000×30000 pixels", TRAIN, "bomb.png", seq(write("bomb.png", png_claiming(30000, 30000)), jsonl_with({"image": "bomb.png", "question": "q?", "answer": "a"}))),
    _c("jsonl-few-questions", "3 questions, batch size 32 (the tiny preset's)", TRAIN, "fewer than one batch"),
]  # fmt: skip

CHECKPOINT_CASES = [
    _c("config-not-json", "config.json is not JSON", EVAL, "config.json", write("ck/config.json", "{oops")),
    _c("config-empty", "config.json is empty", EVAL, "config.json", write("ck/config.json", "")),
    _c("config-not-utf8", "config.json is not UTF-8", EVAL, "config.json", write("ck/config.json", b"\xff\xfe{}")),
    _c("config-folder", "config.json is a folder", EVAL, "config.json", replace_by_folder("ck/config.json")),
    _c("config-format", "config.json of another format", EVAL, "expected format", edit_config(lambda m: m.update(format="other/9"))),
    _c("config-run-list", "config.json `run` is a list", EVAL, "expected an object", edit_config(lambda m: m.update(run=[1]))),
    _c("config-unknown-key", "config.json `run.train` has an unknown key", EVAL, "unexpected keyword", set_field("train.warp_speed", 9)),
    _c("config-type-string", "`model.d_model` is the string \"32\"", EVAL, "model.d_model", set_field("model.d_model", "32")),
    _c("config-type-bool", "`model.n_layers` is `true`", EVAL, "model.n_layers", set_field("model.n_layers", True)),
    _c("config-nan", "`model.dropout` is NaN", EVAL, "model.dropout", set_field("model.dropout", float("nan"))),
    _c("config-inf", "`train.lr` is Infinity", EVAL, "train.lr", set_field("train.lr", float("inf"))),
    _c("config-negative", "`train.lr` is -1", EVAL, "train.lr", set_field("train.lr", -1)),
    _c("config-zero-log-every", "`train.log_every` is 0 (division by zero later)", EVAL, "train.log_every", set_field("train.log_every", 0)),
    _c("config-image-size-huge", "`model.image_size` is 10**9", EVAL, "model.image_size", set_field("model.image_size", 10**9)),
    _c("config-patch-not-pow2", "`model.patch_size` is 12", EVAL, "patch_size", set_field("model.patch_size", 12)),
    _c("config-moe-layers", "`model.moe_layers` is \"13\"", EVAL, "model.moe_layers", set_field("model.moe_layers", "13")),
    _c("config-router", "`model.moe.router` is \"bogus\"", EVAL, "router", set_field("model.moe.router", "bogus")),
    _c("config-head-text", "`model.head_text` is \"bogus\"", EVAL, "model.head_text", set_field("model.head_text", "bogus")),
    _c("config-flip-views", "`model.flip_views` is 3", EVAL, "model.flip_views", set_field("model.flip_views", 3)),
    _c("config-capacity-nan", "`model.moe.capacity_factor` is NaN", EVAL, "capacity_factor", set_field("model.moe.capacity_factor", float("nan"))),
    _c("config-model-too-big", "`model.d_model` is 65536 (a model far larger than the weights)", EVAL, "do not belong together", set_field("model.d_model", 65536)),
    _c("config-answers-duplicate", "answers hold a duplicate", EVAL, "distinct", edit_config(lambda m: m["answers"].__setitem__(1, m["answers"][0]))),
    _c("config-answers-count", "one answer fewer than the head has", EVAL, "answers", edit_config(lambda m: m["answers"].pop())),
    _c("config-answers-type", "answers is a string", EVAL, "answers", edit_config(lambda m: m.update(answers="yes"))),
    _c("config-unreadable", "config.json without read permission", EVAL, "config.json", chmod("ck/config.json", 0), root_skips=True),
    _c("tokenizer-garbage", "tokenizer.json is not a tokenizer", EVAL, "tokenizer.json", write("ck/tokenizer.json", "[]")),
    _c("tokenizer-empty", "tokenizer.json is empty", EVAL, "tokenizer.json", write("ck/tokenizer.json", "")),
    _c("tokenizer-truncated", "tokenizer.json cut in half", EVAL, "tokenizer.json", truncate("ck/tokenizer.json")),
    _c("tokenizer-other-vocab", "tokenizer.json of another vocabulary", EVAL, "model.vocab_size", other_tokenizer),
    _c("weights-empty", "model.safetensors is empty", EVAL, "model.safetensors", write("ck/model.safetensors", b"")),
    _c("weights-truncated", "model.safetensors cut in half", EVAL, "model.safetensors", truncate("ck/model.safetensors")),
    _c("weights-folder", "model.safetensors is a folder", EVAL, "model.safetensors", replace_by_folder("ck/model.safetensors")),
    _c("weights-missing", "model.safetensors deleted", ASK + [Q], "missing", remove("ck/model.safetensors")),
    _c("weights-nan-ask", "a weight is NaN; `ask --json`", ASK + [Q], "non-finite", edit_weights(_poison(float("nan")))),
    _c("weights-inf-eval", "a weight is inf; `eval --json`", EVAL, "non-finite", edit_weights(_poison(float("inf")))),
    _c("weights-missing-tensor", "a tensor is missing", EVAL, "do not match", edit_weights(lambda s: s.pop(sorted(s)[0]))),
    _c("weights-wrong-shape", "a tensor has the wrong shape", EVAL, "do not match", edit_weights(_reshape_first)),
    _c("weights-bool", "a tensor of dtype bool", EVAL, "dtype", edit_weights(_boolify_first)),
]  # fmt: skip

GOOD_PAIRS = [
    {"image": "img.png", "text": "a red circle"},
    {"image": "img.png", "text": "a circle"},
]
#: `vlmoe train` of the contrastive family on a user's image–text pairs (S/pairs.jsonl)
TRAIN_PAIRS = ["train", "--preset", "limoe-tiny", "--data", "{S}/pairs.jsonl", "--out", "{S}/run",
               "--no-progress"]  # fmt: skip


def pairs_with(line: str | dict) -> Setup:
    """pairs.jsonl: two good image–text lines, then ``line`` (line 3)."""
    extra = line if isinstance(line, str) else json.dumps(line)
    return write("pairs.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD_PAIRS) + extra + "\n")


PAIR_CASES = [
    _c("pairs-truncated", "image–text JSONL: a line cut short", TRAIN_PAIRS, "pairs.jsonl:3: invalid JSON", pairs_with('{"image": "img.png", "te')),
    _c("pairs-array", "image–text JSONL: a line that is an array", TRAIN_PAIRS, "pairs.jsonl:3: expected a JSON object", pairs_with('["img.png", "a cat"]')),
    _c("pairs-missing-text", "image–text JSONL: a line without `text`", TRAIN_PAIRS, "pairs.jsonl:3: missing field 'text'", pairs_with({"image": "img.png"})),
    _c("pairs-number-text", "image–text JSONL: `text` is a number", TRAIN_PAIRS, "pairs.jsonl:3: field 'text' must be a string", pairs_with({"image": "img.png", "text": 7})),
    _c("pairs-blank-text", "image–text JSONL: `text` is blank", TRAIN_PAIRS, "pairs.jsonl:3: field 'text' is empty", pairs_with({"image": "img.png", "text": "  "})),
    _c("pairs-image-missing", "image–text JSONL: a line's image does not exist", TRAIN_PAIRS, "pairs.jsonl:3:", pairs_with({"image": "nope.png", "text": "a cat"})),
    _c("pairs-few", "image–text JSONL: 3 pairs, batch size 32 (limoe-tiny's)", TRAIN_PAIRS, "fewer than one batch", pairs_with({"image": "img.png", "text": "a cat"})),
]  # fmt: skip

CASES = CLI_CASES + JSONL_CASES + CHECKPOINT_CASES + PAIR_CASES

# Generative (MoE-LLaVA) checkpoints: run by tests/llava/test_llava_bad_input.py on a sandbox
# whose S/ck is a `moe-llava-tiny` checkpoint (not part of CASES, whose S/ck is a VQA one).
LL_ASK = ["ask", "--checkpoint", "{S}/ck", "--json"]
LL_TRAIN = ["train", "--preset", "moe-llava-tiny", "--out", "{S}/new", "--no-progress"]
LLAVA_CASES = [
    _c("llava-image-to-text-lm", "an image to the text-only `smollm2`", ["ask", "--checkpoint", "smollm2", "--image", "{S}/img.png", "hi"], "text-only"),
    _c("llava-eval-text-lm", "`eval` of the text-only `smollm2`", ["eval", "--checkpoint", "smollm2", "--data", "{S}/data.jsonl"], "text-only"),
    _c("llava-not-gguf", "`--checkpoint notes.gguf`, a text file", ["ask", "--checkpoint", "{S}/notes.gguf", "hi"], "not a GGUF file", write("notes.gguf", "hello")),
    _c("llava-gguf-missing", "`--checkpoint none.gguf`, no such file", ["ask", "--checkpoint", "{S}/none.gguf", "hi"], "no such GGUF file"),
    _c("llava-prompt-too-long", "a question past the context length", LL_ASK + ["word " * 300], "context"),
    _c("llava-empty-question", "an empty question", LL_ASK + ["  "], "non-empty"),
    _c("llava-choices", "`--choices` to a generative checkpoint", LL_ASK + ["--choices", "a", "b", "--", "hi"], "--choices"),
    _c("llava-config-no-lm", "config.json without `lm`", LL_ASK + ["hi"], "missing field 'lm'", edit_config(lambda m: m.pop("lm"))),
    _c("llava-config-lm-bad", "config.json `lm.d_model` is -3", LL_ASK + ["hi"], "d_model", edit_config(lambda m: m["lm"].update(d_model=-3))),
    _c("llava-config-vision", "`model.vision` is \"resnet\"", LL_ASK + ["hi"], "model.vision", set_field("model.vision", "resnet")),
    _c("llava-weights-shape", "a tensor has the wrong shape", LL_ASK + ["hi"], "does not fit", edit_weights(_reshape_first)),
    _c("llava-weights-nan", "a weight is NaN", LL_ASK + ["hi"], "non-finite", edit_weights(_poison(float("nan")))),
    _c("llava-tokenizer-garbage", "tokenizer.json is not a tokenizer", LL_ASK + ["hi"], "tokenizer.json", write("ck/tokenizer.json", "[]")),
    _c("llava-stage-too-big", "`--stage 9` of a 3-stage preset", LL_TRAIN + ["--stage", "9"], "--stage"),
    _c("llava-stage-no-previous", "`--stage 2` before stage 1 ran", LL_TRAIN + ["--stage", "2"], "run --stage 1 first"),
    _c("llava-from-missing", "`--from` a folder that does not exist", LL_TRAIN + ["--from", "{S}/nothing"], "--from"),
    _c("llava-compare-upcycled", "`compare --family generative --from` an upcycled checkpoint", GCOMPARE + ["{S}/ck"], "already upcycled"),
    _c("llava-compare-text-lm", "`compare --family generative --from smollm2`", GCOMPARE + ["smollm2"], "a pretrained language model"),
]  # fmt: skip


def _markdown(only_root_skips: bool = False) -> str:  # pragma: no cover - the docs generator
    import contextlib
    import io
    import shlex
    import tempfile

    from easy_vqa import get_test_image_paths

    from vlmoe.cli import main

    rows = ["| # | mistake | command (S = the sandbox folder) | the one line on stderr (exit 1) |"]
    rows.append("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp, "tiny")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["train", "--preset", "tiny", "--out", str(ck), "--no-progress"]) == 0
        for i, case in enumerate(CASES, 1):
            if only_root_skips and not case.root_skips:
                continue
            s = make_sandbox(Path(tmp, case.id), ck, get_test_image_paths()[0])
            if case.setup:
                case.setup(s)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(case.args(s))
            line = err.getvalue().strip().replace(str(s), "S")
            if case.root_skips and os.geteuid() == 0:
                line, rc = "(run as root, which may read and write anything: see below)", "-"
            cmd = shlex.join(["vlmoe", *case.argv]).replace("{S}", "S")
            cells = [
                str(i),
                case.what,
                f"`{cmd}`",
                f"`{line}`" + ("" if rc == 1 else f" (rc {rc})"),
            ]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            for p in [s, *s.rglob("*")]:
                os.chmod(p, 0o755)
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(_markdown(only_root_skips="--permissions" in sys.argv))
