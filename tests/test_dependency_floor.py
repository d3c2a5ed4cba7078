"""The transformers floor pyproject.toml declares is the one `make floor-test` runs the model tests on."""

from __future__ import annotations

import os
import re

import transformers
from conftest import REPO_ROOT
from packaging.version import Version


def _declared_floor() -> str:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    match = re.search(r'"transformers>=([0-9.]+)[",]', text)
    assert match, "pyproject.toml declares no transformers floor"
    return match.group(1)


def _tested_floor() -> str:
    match = re.search(r"^FLOOR_TRANSFORMERS := ([0-9.]+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile names no FLOOR_TRANSFORMERS"
    return match.group(1)


def test_declared_floor_is_the_tested_floor():
    assert Version(_declared_floor()) == Version(_tested_floor())


def test_this_run_uses_the_transformers_it_claims():
    """Under `make floor-test` the floor itself is imported (not the newer one in .venv)."""
    expected = os.environ.get("LAYERPRUNE_EXPECT_TRANSFORMERS")
    if expected is not None:
        assert Version(transformers.__version__) == Version(expected)
    assert Version(transformers.__version__) >= Version(_declared_floor())
