"""Bad input to MoE-LLaVA commands: one `vlmoe: error:` line, exit 1, nothing touched.

The cases are `LLAVA_CASES` of `tests/bad_input_cases.py`, run on a sandbox whose S/ck is
the session's `moe-llava-tiny` checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_input_cases import LLAVA_CASES, make_sandbox, tree_hash
from cli_helpers import run_cli
from easy_vqa import get_test_image_paths


@pytest.mark.parametrize("case", LLAVA_CASES, ids=[c.id for c in LLAVA_CASES])
def test_llava_bad_input_gives_one_line_and_touches_nothing(case, llava_run: Path, tmp_path,
                                                            monkeypatch, capsys):  # fmt: skip
    s = make_sandbox(tmp_path / "s", llava_run, get_test_image_paths()[0])
    monkeypatch.chdir(s)
    if case.setup is not None:
        case.setup(s)
    before = tree_hash(s)
    rc, out, err = run_cli(capsys, *case.args(s))
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("vlmoe: error: "), err
    assert case.needle in lines[0], (case.needle, lines[0])
    assert out == "" and tree_hash(s) == before
