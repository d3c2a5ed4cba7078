"""Reports: the tables and verdicts of `compare` (report.md, report.json) and the PNG plots."""

from layerprune.report.tables import (
    BEST_METHOD,
    DENSE,
    QUALITY_BAR_REL,
    REQUIRED_RUN_KEYS,
    SCHEMA,
    SEED_METHOD,
    UNIFORM_METHODS,
    main_table,
    relative_difference,
    render_markdown,
    sorted_runs,
    target_ratios,
    validate_report,
    verdict_lines,
    verdicts,
    write_report,
)

__all__ = [
    "BEST_METHOD",
    "DENSE",
    "QUALITY_BAR_REL",
    "REQUIRED_RUN_KEYS",
    "SCHEMA",
    "SEED_METHOD",
    "UNIFORM_METHODS",
    "main_table",
    "relative_difference",
    "render_markdown",
    "sorted_runs",
    "target_ratios",
    "validate_report",
    "verdict_lines",
    "verdicts",
    "write_report",
]
