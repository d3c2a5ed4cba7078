"""The package is laid out along the data flow: stages import only from the stages before them, and only
the adapters name a model family. Imports are read with ast (nothing is run)."""

from __future__ import annotations

import ast
from pathlib import Path

from layerprune.arch import adapters

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "layerprune"
# The pipeline's stages in data-flow order; a stage may import itself and the stages before it.
STAGES = ("arch", "data", "models", "scoring", "refit", "importance", "allocation", "pruning", "torch_pruning", "export",
          "evaluation", "report", "healing", "compare", "cli")
# Shared by every stage; they import nothing of the stages.
UTILITIES = ("errors", "atomic", "provenance", "_core", "kernels", "distributed", "faults")
# Utilities that import nothing of layerprune: the others may import them.
LEAF_UTILITIES = ("errors", "_core", "faults")
# Entry points that may reach every stage (lazily).
ENTRY_POINTS = ("__init__", "__main__")


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    """First-level names under `layerprune` that a file imports, anywhere in it (functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package_parts = list(path.relative_to(PACKAGE).parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
                names = parts[:1] if parts else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "layerprune":
                parts = node.module.split(".")
                # `from layerprune import __version__` reads the top-level package itself
                names = parts[1:2] if len(parts) > 1 else [a.name if (PACKAGE / a.name).is_dir() or
                                                           (PACKAGE / f"{a.name}.py").is_file() else "__init__"
                                                           for a in node.names]
            else:
                names = []
            found.update(names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "layerprune" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_unit_is_a_stage_a_utility_or_an_entry_point():
    units = {_unit(p) for p in _files()}
    assert units <= set(STAGES) | set(UTILITIES) | set(ENTRY_POINTS), sorted(units - set(STAGES) - set(UTILITIES))
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), f"{stage} is not a subpackage"


def test_no_import_runs_backwards():
    backwards = []
    for path in _files():
        me = _unit(path)
        if me in ENTRY_POINTS:
            continue
        for target in _imported_units(path) - {me}:
            if target == "__init__":
                continue
            if target in UTILITIES:
                if me in UTILITIES and target not in LEAF_UTILITIES:
                    backwards.append(f"{path.relative_to(PACKAGE)}: utility imports {target}")
                continue
            if me in UTILITIES:
                backwards.append(f"{path.relative_to(PACKAGE)}: utility imports the stage {target}")
            elif target not in STAGES:
                backwards.append(f"{path.relative_to(PACKAGE)}: imports unknown unit {target}")
            elif STAGES.index(target) > STAGES.index(me):
                backwards.append(f"{path.relative_to(PACKAGE)} ({me}) imports the later stage {target}")
    assert backwards == []


def test_no_cycle_inside_a_subpackage():
    """Modules of one subpackage import each other without cycles (module-level and lazy imports alike)."""
    edges: dict[str, set[str]] = {}
    for path in _files():
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(("layerprune", *rel.parts)).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("layerprune.") and not node.level:
                targets.add(node.module)
        edges[name] = {t for t in targets if t != name}
    if "layerprune" in edges:
        del edges["layerprune"]  # the lazy top-level entry point
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            # a package's __init__ re-exporting its own modules is not a cycle with them
            if node.startswith(nxt + ".") or nxt not in edges:
                continue
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if state.get(nxt) is None:
                cycle = visit(nxt, [*trail, node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if state.get(start) is None:
            cycle = visit(start, [])
            assert cycle is None, " -> ".join(cycle)


def test_only_the_adapters_name_a_family():
    names = set()
    for adapter in adapters():
        names.update(adapter.architectures)
        names.update(f"{adapter.transformers_prefix}{suffix}" for suffix in
                     ("Config", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "ForCausalLM"))
        names.add(f"layerprune.arch.{adapter.name}")
    hits = []
    for path in _files():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "arch":  # the adapters, and the remote-code module saved with every model
            continue
        text = path.read_text(encoding="utf-8")
        hits += [f"{rel} names {name}" for name in sorted(names) if name in text]
    assert hits == []


def test_a_family_is_one_file():
    """Each family module defines its adapter and nothing else the pipeline needs to know."""
    for adapter in adapters():
        module = PACKAGE / "arch" / f"{adapter.name}.py"
        assert module.is_file(), adapter.name
        tree = ast.parse(module.read_text(encoding="utf-8"))
        assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
        assert assigned == {"ADAPTER"}, (adapter.name, assigned)


def test_the_checker_sees_a_backward_import(tmp_path, monkeypatch):
    """The scan is not vacuous: a scoring module importing pruning is found."""
    fake = tmp_path / "layerprune"
    (fake / "scoring").mkdir(parents=True)
    (fake / "pruning").mkdir()
    for sub in ("scoring", "pruning"):
        (fake / sub / "__init__.py").write_text("")
    (fake / "scoring" / "bad.py").write_text("def f():\n    from layerprune.pruning import prune\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert _imported_units(fake / "scoring" / "bad.py") == {"pruning"}
    try:
        test_no_import_runs_backwards()
    except AssertionError as err:
        assert "imports the later stage pruning" in str(err)
    else:
        raise AssertionError("a backward import went unnoticed")
