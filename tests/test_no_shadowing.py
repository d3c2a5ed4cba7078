"""Nothing at the repository root shadows an installed module.

`python -m pytest`, `python -m layerprune` and `python script.py` put the working directory (or the script's folder)
first on `sys.path`. A top-level folder that is an importable package then wins over the installed module of the same
name: a `kernels` link at the root broke transformers 5.25, which imports the Hugging Face package `kernels`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import pkgutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_SUFFIXES = tuple(importlib.machinery.all_suffixes())


def installed_top_level_names() -> set[str]:
    """Top-level module names of the running environment: site-packages (modules and distributions' top levels)
    and the standard library."""
    site_dirs = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    names = {module.name for module in pkgutil.iter_modules(sorted(site_dirs))}
    names |= set(importlib.metadata.packages_distributions())
    return names | set(sys.stdlib_module_names)


def importable_entries(root: Path) -> dict[str, str]:
    """{name: origin} for every top-level entry of `root` that `import name` would load from `root` as a regular
    module or package when `root` is first on `sys.path`. A folder without `__init__.py` is only a namespace
    portion: a regular module of the same name anywhere on the path wins over it, so it shadows nothing."""
    found = {}
    for entry in sorted(os.listdir(root)):
        name = entry
        for suffix in MODULE_SUFFIXES:
            if entry.endswith(suffix):
                name = entry[: -len(suffix)]
                break
        if not name.isidentifier():
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, [str(root)])
        if spec is not None and spec.origin not in (None, "namespace"):
            found[name] = spec.origin
    return found


def shadowing_entries(root: Path, installed: set[str]) -> dict[str, str]:
    return {name: origin for name, origin in importable_entries(root).items() if name in installed}


def test_the_repository_root_shadows_no_installed_module():
    installed = installed_top_level_names()
    assert "transformers" in installed and "torch" in installed  # the check sees the environment
    assert shadowing_entries(REPO_ROOT, installed) == {}


def test_a_planted_package_is_caught(tmp_path):
    """The same check on a copy of the root (links to each entry) with a package named like an installed one."""
    installed = installed_top_level_names()
    root = tmp_path / "root"
    root.mkdir()
    for entry in REPO_ROOT.iterdir():
        (root / entry.name).symlink_to(entry)
    assert shadowing_entries(root, installed) == {}
    # the link the repository used to hold: a folder named like the Hugging Face `kernels` package
    (root / "kernels").symlink_to(REPO_ROOT / "python" / "layerprune" / "kernels", target_is_directory=True)
    (root / "numpy.py").write_text("")
    (root / "docs_only").mkdir()  # a namespace portion: not a shadow
    found = shadowing_entries(root, installed | {"docs_only"})
    assert sorted(found) == ["kernels", "numpy"]
    assert found["kernels"].endswith(os.path.join("kernels", "__init__.py"))


def _run_from_root(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def test_transformers_hub_kernels_imports_with_the_root_first_on_the_path():
    proc = _run_from_root(
        "import sys; sys.path.insert(0, %r)\n"
        "import transformers.integrations.hub_kernels\n"
        "import kernels; print(kernels.__file__)\n" % str(REPO_ROOT)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    site_dirs = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    assert any(origin.is_relative_to(site) for site in site_dirs), (origin, site_dirs)
