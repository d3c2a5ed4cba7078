"""The package's top-level names resolve to the real implementations."""

from __future__ import annotations

import layerprune


def test_every_public_name_resolves():
    for name in layerprune.__all__:
        assert getattr(layerprune, name) is not None, name


def test_top_level_entry_points_are_the_module_functions():
    from layerprune import allocation, export, models
    from layerprune.pruning import pipeline

    assert layerprune.allocate is allocation.allocate
    assert layerprune.load_pruned is models.load_pruned
    assert layerprune.save_pruned is export.save_pruned
    assert layerprune.prune is pipeline.prune


def test_unknown_attribute_raises():
    import pytest

    with pytest.raises(AttributeError):
        layerprune.does_not_exist  # noqa: B018
