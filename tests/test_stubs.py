"""The stub `layerprune/_core.pyi` matches the compiled module (mypy.stubtest, whole module).

Only `layerprune._core.__all__` is allow-listed: PyO3 sets it at runtime, the stub lists the
names themselves.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_core_stub_matches_runtime(tmp_path):
    allowlist = tmp_path / "stubtest-allowlist.txt"
    allowlist.write_text("layerprune._core.__all__\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "layerprune._core", "--allowlist", str(allowlist)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
