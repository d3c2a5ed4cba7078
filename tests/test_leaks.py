"""No file handle is left open at exit (pytest printed `ResourceWarning: unclosed file <... name='/dev/null'>`)."""

from __future__ import annotations

import subprocess
import sys


def _exit_warnings(code: str) -> str:
    proc = subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_llama_cpp_leaves_no_dev_null_open():
    # llama-cpp-python opens /dev/null at import and never closes it: the check sees that leak ...
    assert "unclosed file" in _exit_warnings("import llama_cpp")
    # ... and layerprune's way in closes it at exit
    assert "unclosed file" not in _exit_warnings(
        "from layerprune.evaluation.llamacpp import llama_cpp_module; llama_cpp_module()")
