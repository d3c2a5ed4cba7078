"""The built wheel installs into a fresh virtual environment and imports without the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _build_env() -> dict[str, str]:
    env = _clean_env()
    # A target folder of its own: `maturin develop` runs elsewhere (make build) cannot race with this
    # build over target/maturin, and neither invalidates the other's compiled crate.
    env["CARGO_TARGET_DIR"] = str(REPO_ROOT / "target" / "wheel-test")
    return env


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory) -> Path:
    """Build the wheel, install it with --no-deps into a fresh venv that borrows the dev venv's packages."""
    work = tmp_path_factory.mktemp("wheel")
    maturin = VENV_BIN / "maturin"
    build = subprocess.run(
        [str(maturin), "build", "--release", "--quiet", "-o", str(work / "dist")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=_build_env(),
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list((work / "dist").glob("layerprune-*.whl"))
    assert len(wheels) == 1, wheels

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
         str(wheels[0])],
        capture_output=True, text=True, timeout=300, env=_clean_env(),
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # torch, transformers ... come from the dev venv. A directory added by a .pth line is appended
    # to sys.path without processing its own .pth files, so the dev venv's editable layerprune
    # (a .pth pointing at python/) stays invisible.
    fresh_site = Path(
        subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                text=True).strip()
    )
    (fresh_site / "zz_dev_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _run_python(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", textwrap.dedent(code)],
        capture_output=True, text=True, cwd=cwd, env=_clean_env(), timeout=300,
    )


@pytest.mark.slow
def test_wheel_imports_from_the_fresh_venv(installed_venv, tmp_path):
    proc = _run_python(installed_venv, """
        import importlib.resources, json, sys
        import layerprune, layerprune._core, layerprune.kernels, layerprune.errors
        kernels = sorted(p.name for p in importlib.resources.files("layerprune.kernels").iterdir()
                         if p.name.endswith(".py"))
        print(json.dumps({"file": layerprune.__file__, "core": layerprune._core.__file__,
                          "kernels": kernels, "path": sys.path}))
    """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    venv = installed_venv.resolve()
    assert Path(report["file"]).resolve().is_relative_to(venv), report["file"]
    assert Path(report["core"]).resolve().is_relative_to(venv), report["core"]
    assert not any(Path(p).resolve() == (REPO_ROOT / "python").resolve() for p in report["path"] if p)
    shipped = sorted(p.name for p in (REPO_ROOT / "python" / "layerprune" / "kernels").glob("*.py"))
    assert report["kernels"] == shipped


@pytest.mark.slow
def test_wheel_imports_without_triton(installed_venv, tmp_path):
    proc = _run_python(installed_venv, """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import importlib, pkgutil
        import layerprune, layerprune.kernels
        assert layerprune.kernels.HAS_TRITON is False, layerprune.kernels.HAS_TRITON
        # every kernel module imports triton lazily, so each one imports without it
        for module in pkgutil.iter_modules(layerprune.kernels.__path__):
            importlib.import_module("layerprune.kernels." + module.name)
        print("ok", layerprune.__file__)
    """, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok ")
    assert Path(proc.stdout.split()[1]).resolve().is_relative_to(installed_venv.resolve())


@pytest.mark.slow
def test_installed_cli_runs(installed_venv, tmp_path):
    proc = subprocess.run(
        [str(installed_venv / "bin" / "python"), "-m", "layerprune.cli", "eval", "--model", str(tmp_path / "none"),
         "--dataset", str(tmp_path / "none.txt")],
        capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=300,
    )
    assert proc.returncode == 2
    assert "layerprune eval: error:" in proc.stderr and "Traceback" not in proc.stderr
