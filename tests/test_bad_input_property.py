"""Property: ANY malformed JSONL line, config.json value or command-line value gives exit code
1, exactly one `vlmoe: error:` line on stderr, no traceback, and changes no file.

Hypothesis draws the malformed inputs (derandomized: the same examples on every run); each
example runs `vlmoe.cli.main` in-process, and a few run the real console entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import string
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest
from bad_input_cases import GOOD_LINES, make_sandbox, tree_hash
from easy_vqa import get_test_image_paths
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmoe.cli import main
from vlmoe.config import ModelConfig, RunConfig, TrainConfig
from vlmoe.moe import MoEConfig

SETTINGS = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory) -> Path:
    """One sandbox for the module: every example only reads it (which is what is tested)."""
    return make_sandbox(
        tmp_path_factory.mktemp("prop") / "s", tiny_checkpoint, get_test_image_paths()[0]
    )


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def assert_clean_failure(rc: int, out: str, err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert rc == 1, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("vlmoe: error: "), err
    assert out == "", out
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ----------------------------------------------------------------------------- JSON values

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6,
)
not_strings = json_values.filter(lambda v: not isinstance(v, str))
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
with_surrogate = st.tuples(st.text(max_size=4), surrogates).map("".join)
MISSING = object()


# ----------------------------------------------------------------------------- JSONL lines

FIELDS = ("image", "question", "answer")


def is_bad_line(line: str) -> bool:
    """True if this (non-blank) line can never be a valid record (so loading must fail)."""
    if not line.strip():
        return False
    try:
        r = json.loads(line)
    except (ValueError, RecursionError):
        return True
    return not isinstance(r, dict) or any(
        not isinstance(r.get(k), str) or not r[k].strip() for k in FIELDS
    )


def _record(key: str, value: object) -> str:
    r: dict = dict(GOOD_LINES[0])
    if value is MISSING:
        del r[key]
    else:
        r[key] = value
    return json.dumps(r)


bad_lines = st.one_of(
    st.text(st.characters(exclude_characters="\n"), min_size=1, max_size=30).filter(is_bad_line),
    json_values.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    st.builds(
        _record,
        st.sampled_from(FIELDS),
        st.one_of(not_strings, st.text(" \t", max_size=3), st.just(MISSING), with_surrogate),
    ),
    st.text(string.ascii_letters, min_size=1, max_size=8).map(
        lambda n: _record("image", f"missing/{n}.png")
    ),
)


@settings(max_examples=60, **SETTINGS)
@given(line=bad_lines, at=st.integers(0, len(GOOD_LINES)))
def test_any_malformed_jsonl_line_is_refused_before_training(base, line, at):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        shutil.copy(base / "img.png", d / "img.png")
        lines = [json.dumps(r) for r in GOOD_LINES]
        lines.insert(at, line)
        (d / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        before = tree_hash(d)
        argv = ["train", "--preset", "tiny", "--data", str(d / "data.jsonl"), "--out", str(d / "o")]
        rc, out, err = run_main([*argv, "--no-progress"])
        assert_clean_failure(rc, out, err, "data.jsonl")
        assert tree_hash(d) == before


@settings(max_examples=15, **SETTINGS)
@given(junk=st.binary(min_size=1, max_size=12).filter(lambda b: not _utf8(b)))
def test_jsonl_bytes_that_are_not_utf8_are_refused(base, junk):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp, "data.jsonl")
        f.write_bytes(json.dumps(GOOD_LINES[0]).encode() + b"\n" + junk + b"\n")
        rc, out, err = run_main(
            ["train", "--preset", "tiny", "--data", str(f), "--out", tmp + "/o"]
        )
        assert_clean_failure(rc, out, err, "not UTF-8")


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ----------------------------------------------------------------------------- config.json


def _field_paths() -> list[tuple[str, object]]:
    """(dotted path under "run", type annotation) of every leaf field of a RunConfig."""
    out = []
    for prefix, cls in (("", RunConfig), ("model.", ModelConfig), ("model.moe.", MoEConfig), ("train.", TrainConfig)):  # fmt: skip
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]) and f.name not in ("model", "train"):
                out.append((prefix + f.name, hints[f.name]))
    return out


FIELD_PATHS = _field_paths()
ENUMS = {"router", "activation", "impl"}
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def bad_value(path: str, hint: object) -> st.SearchStrategy:
    """Values that no field of this type and name accepts."""
    nullable = type(None) in typing.get_args(hint)
    base_hint = next((h for h in typing.get_args(hint) if h is not type(None)), hint)
    not_none = json_values.filter(lambda v: v is not None)
    if base_hint is bool:
        return json_values.filter(lambda v: not isinstance(v, bool))
    if base_hint is int:  # null is a valid value of a nullable field (test_subset, split_seed)
        wrong = (not_none if nullable else json_values).filter(lambda v: not isinstance(v, int) or isinstance(v, bool))  # fmt: skip
        return wrong | st.integers(max_value=-1)
    if base_hint is float:
        wrong = (not_none if nullable else json_values).filter(lambda v: not isinstance(v, int | float) or isinstance(v, bool))  # fmt: skip
        return non_finite | wrong
    if base_hint is str:
        enum = st.text(max_size=8).filter(lambda s: s not in ("softmax", "swiglu", "auto"))
        extra = enum if path.rsplit(".", 1)[-1] in ENUMS else with_surrogate
        return not_strings | extra
    # tuple[int, ...] (moe_layers): not a list, or a list holding a non-index
    return json_values.filter(lambda v: not isinstance(v, list)) | st.lists(
        st.integers(max_value=-1) | st.integers(min_value=64) | st.text(max_size=3) | st.floats(),
        min_size=1,
        max_size=3,
    )


config_edits = st.sampled_from(FIELD_PATHS).flatmap(
    lambda ph: st.tuples(st.just(ph[0]), bad_value(*ph))
) | st.tuples(
    st.sampled_from(["model.", "train.", "model.moe."]).flatmap(
        lambda p: st.text(string.ascii_lowercase + "_", min_size=1, max_size=8).map(
            lambda k: p + "zz_" + k
        )
    ),
    json_values,
)


@settings(max_examples=80, **SETTINGS)
@given(edit=config_edits)
def test_any_bad_config_value_is_refused_at_load(base, edit):
    path, value = edit
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp, "ck")
        shutil.copytree(base / "ck", ck)
        meta = json.loads((ck / "config.json").read_text())
        *parents, last = path.split(".")
        d = meta["run"]
        for k in parents:
            d = d[k]
        d[last] = value
        (ck / "config.json").write_text(json.dumps(meta))
        before = tree_hash(ck)
        argv = ["eval", "--checkpoint", str(ck), "--data", str(base / "data.jsonl"), "--json"]
        rc, out, err = run_main(argv)
        assert_clean_failure(rc, out, err, "config.json")
        assert tree_hash(ck) == before


# ----------------------------------------------------------------------------- arguments

#: (command, option, kind); kinds: ("float", lo, lo_open) | ("int", lo, hi) | a choice name
OPTIONS = [
    ("train", "--lr", ("float", 0, True)),
    ("train", "--epochs", ("float", 0, True)),
    ("train", "--dist-timeout", ("float", 0, True)),
    ("train", "--batch-size", ("int", 1, None)),
    ("train", "--seed", ("int", 0, 2**63 - 1)),
    ("train", "--threads", ("int", 1, 1024)),
    ("train", "--stop-after", ("int", 1, None)),
    ("train", "--stage", ("int", 1, None)),
    ("train", "--preset", ("choice", "tiny", "default", "dense")),
    ("train", "--device", ("choice", "cpu", "auto")),
    ("eval", "--split", ("choice", "train", "val", "test")),
    ("eval", "--device", ("choice", "cpu", "auto")),
    ("ask", "--device", ("choice", "cpu", "auto")),
    ("inspect", "--samples", ("int", 0, 1000)),
    ("inspect", "--max-questions", ("int", 1, None)),
    ("inspect", "--batch-size", ("int", 1, 1 << 20)),
    ("inspect", "--permutations", ("int", 0, 1000)),
    ("inspect", "--threads", ("int", 1, 1024)),
    ("compare", "--steps", ("int", 1, None)),
    ("compare", "--seeds", ("int", 1, 1000)),
    ("compare", "--threads", ("int", 1, 1024)),
    ("compare", "--num-experts", ("int", 1, 65536)),
    ("compare", "--top-k", ("int", 1, 65536)),
    ("compare", "--load-balance-weight", ("float", 0, False)),
    ("compare", "--capacity-factor", ("float", 0, True)),
    ("compare", "--eval-every", ("int", 1, None)),
    ("compare", "--val-questions", ("int", 1, None)),
    ("compare", "--lr", ("float", 0, True)),
]


def _number(text: str) -> bool:
    try:
        float(text.replace("_", ""))
    except ValueError:
        return False
    return True


not_numbers = st.text(max_size=8).filter(lambda t: not _number(t))
spelt_non_finite = st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e400"])


def bad_option_value(kind: tuple) -> st.SearchStrategy[str]:
    if kind[0] == "choice":
        valid = set(kind[1:]) | {"cuda", "cuda:0"}  # cuda would be valid on a GPU machine
        return st.text(max_size=10).filter(lambda t: t not in valid) | with_surrogate
    negative = st.floats(max_value=-1e-6, allow_infinity=False).map(repr) | st.integers(max_value=-1).map(str)  # fmt: skip
    bad = not_numbers | spelt_non_finite | negative
    if kind[0] == "float":
        return bad | (st.just("0") if kind[2] else st.nothing())
    _, lo, hi = kind
    fractions = st.floats(0.01, 1e6).filter(lambda x: x != int(x)).map(repr)
    bad = bad | fractions | st.integers(max_value=lo - 1).map(str)
    return bad | (st.integers(min_value=hi + 1).map(str) if hi is not None else st.nothing())


def base_argv(command: str, s: Path) -> list[str]:
    data, out = str(s / "data.jsonl"), str(s / "out")
    return {
        "train": ["train", "--preset", "tiny", "--data", data, "--out", out, "--no-progress"],
        "eval": ["eval", "--checkpoint", str(s / "ck"), "--data", data, "--json"],
        "ask": ["ask", "--checkpoint", str(s / "ck"), "--image", str(s / "img.png"), "what?"],
        "inspect": ["inspect", "--checkpoint", str(s / "ck"), "--data", data, "--out", out],
        "compare": ["compare", "--quick", "--data", data, "--out", out, "--seeds", "1"],
    }[command]


bad_arguments = st.sampled_from(OPTIONS).flatmap(
    lambda o: st.tuples(st.just(o[0]), st.just(o[1]), bad_option_value(o[2]))
) | st.tuples(st.just("ask"), st.just("question"), st.text(" \t", max_size=3) | with_surrogate)


def _argv(base: Path, command: str, option: str, value: str) -> list[str]:
    argv = base_argv(command, base)
    if option == "question":
        return [*argv[:-1], "--", value]
    return [*argv, f"{option}={value}"]


@settings(max_examples=120, **SETTINGS)
@given(arg=bad_arguments)
def test_any_bad_argument_is_refused_before_anything_runs(base, arg):
    before = tree_hash(base)
    rc, out, err = run_main(_argv(base, *arg))
    assert_clean_failure(rc, out, err)
    assert tree_hash(base) == before


def _to_bytes(arg: str) -> bytes:
    """The argv bytes that Python would decode to `arg`: surrogate escapes become the raw
    bytes; other lone surrogates their (ill-formed) UTF-8 spelling, as a broken program
    might pass them."""
    try:
        return os.fsencode(arg)
    except UnicodeEncodeError:
        return arg.encode("utf-8", "surrogatepass")


@settings(max_examples=2, **SETTINGS)
@given(arg=bad_arguments)
def test_bad_arguments_through_the_real_console_entry_point(base, arg):
    before = tree_hash(base)
    argv = [_to_bytes(a) for a in _argv(base, *arg)]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "vlmoe", *argv], capture_output=True, env=env, timeout=120)  # fmt: skip
    assert_clean_failure(p.returncode, p.stdout.decode(), p.stderr.decode("utf-8", "replace"))
    assert tree_hash(base) == before
