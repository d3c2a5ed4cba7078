"""Fixtures of the fault tests: one runner process for the session, and a tiny checkpoint (harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults.harness import Runner, make_checkpoint


@pytest.fixture(scope="session")
def runner(tmp_path_factory, wikitext_dir):
    r = Runner(tmp_path_factory.mktemp("runner"), wikitext_dir)
    yield r
    r.close()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("input") / "tiny")
