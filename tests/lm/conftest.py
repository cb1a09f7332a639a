"""Fixtures for the language-model tests: the real SmolLM2 (loaded once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct (fetched once, then cached)."""
    from vlmoe.lm import load_pretrained

    return load_pretrained("smollm2")
