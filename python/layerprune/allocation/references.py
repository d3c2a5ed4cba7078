"""The allocation problem as a multiple-choice knapsack for reference optimisers: HiGHS (a MILP) and
OR-Tools CP-SAT.

Needs the ``bench`` extra (``pip install 'layerprune[bench]'``): ``highspy`` and ``ortools`` are imported
only when a solve is asked for. The items are those of :mod:`layerprune.allocation.knapsack`, enumerated from
the spec's own words, independently of the Rust solvers' item lists.

With binaries ``x[i, o]`` (one option per item)::

    minimise    sum loss[i, o] * x[i, o]
    subject to  sum_o x[i, o] = 1                                   for every item i
                T_p <= sum params_removed * x <= T_p + granule        (ratio given)
                sum kv_cache_removed * x >= T_kv                    (kv_cache_ratio given)
                sum flops_removed * x >= T_f                        (flops_ratio given)

Amounts are integers relative to each item's least-pruning option, divided by their GCD (exact). The
parameter window is the narrow one (``granule`` = the smallest prunable step), or, when no allocation lands
in it, the widest single step, as the Rust solvers do. CP-SAT needs an integer objective: losses are
scaled to integers (``CPSAT_OBJECTIVE_SCALE`` over the largest total), so its "optimal" holds for the
scaled objective, within ``items / (2 * scale)`` of the true one; every reported objective is recomputed
exactly from the chosen options.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerprune.allocation.knapsack import (Item, Knapsack, Option, build_knapsack, feasible, objective, widths,
                                            windows)
from layerprune.allocation.solve import AllocationSpec
from layerprune.errors import InvalidInputError

CPSAT_OBJECTIVE_SCALE = 1e9
LINEARIZATION_LEVEL = 2


@dataclass
class ReferenceResult:
    """What a reference optimiser returned: ``objective`` recomputed from its choice (None: no solution),
    ``bound`` its proven lower bound, ``proven_optimal`` its own optimality claim."""

    solver: str
    seconds: float
    status: str
    objective: float | None
    bound: float | None
    proven_optimal: bool
    kv_groups_kept: list[int] = field(default_factory=list)
    mlp_kept: list[int] = field(default_factory=list)
    window: str = "narrow"


@dataclass
class _Rows:
    """Integer budget rows relative to each item's option 0: amounts[row][item][option], bounds [lo, hi]."""

    names: list[str]
    amounts: list[list[list[int]]]
    lo: list[float]
    hi: list[float]


def _rows(ks: Knapsack, window: tuple[int, int] | None) -> _Rows:
    names, amounts, lo, hi = [], [], [], []
    for name, attr, bounds in (
        ("params", "params", window),
        ("kv_cache", "kv_cache", None if ks.kv_cache_min is None else (ks.kv_cache_min, None)),
        ("flops", "flops", None if ks.flops_min is None else (ks.flops_min, None)),
    ):
        if bounds is None:
            continue
        base = sum(getattr(it.options[0], attr) for it in ks.items)
        rel = [[getattr(o, attr) - getattr(it.options[0], attr) for o in it.options] for it in ks.items]
        unit = 0
        for row in rel:
            for v in row:
                unit = math.gcd(unit, abs(v))
        unit = max(unit, 1)
        names.append(name)
        amounts.append([[v // unit for v in row] for row in rel])
        lo.append(-((base - bounds[0]) // unit))  # ceil((bound - base) / unit), in integers
        hi.append(math.inf if bounds[1] is None else (bounds[1] - base) // unit)
    return _Rows(names, amounts, lo, hi)


def _need(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise InvalidInputError(f"{module} is not installed: install the bench extra (pip install 'layerprune[bench]')") from None


def solve_highs(spec: AllocationSpec, time_limit: float = 60.0, threads: int = 1) -> ReferenceResult:
    """Solve ``spec`` with HiGHS's MILP solver (relative and absolute gap tolerances 0)."""
    highspy = _need("highspy")
    ks = build_knapsack(spec)
    start = time.perf_counter()
    result = ReferenceResult("highs", 0.0, "infeasible", None, None, False)
    for label, window in windows(ks):
        rows = _rows(ks, window)
        h = highspy.Highs()
        for key, value in (("output_flag", False), ("time_limit", float(time_limit)), ("threads", int(threads)),
                           ("mip_rel_gap", 0.0), ("mip_abs_gap", 1e-12), ("random_seed", 0)):
            h.setOptionValue(key, value)
        n_items = len(ks.items)
        cols = [(i, j) for i, it in enumerate(ks.items) for j in range(len(it.options))]
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(cols), n_items + len(rows.names)
        lp.col_cost_ = np.array([ks.items[i].options[j].loss for i, j in cols], dtype=np.float64)
        lp.col_lower_ = np.zeros(len(cols))
        lp.col_upper_ = np.ones(len(cols))
        lp.row_lower_ = np.array([1.0] * n_items + [float(v) for v in rows.lo])
        lp.row_upper_ = np.array([1.0] * n_items + [highspy.kHighsInf if math.isinf(v) else float(v) for v in rows.hi])
        starts, index, value = [0], [], []
        for i, j in cols:
            index.append(i)
            value.append(1.0)
            for r in range(len(rows.names)):
                a = rows.amounts[r][i][j]
                if a:
                    index.append(n_items + r)
                    value.append(float(a))
            starts.append(len(index))
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
        lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
        lp.a_matrix_.value_ = np.array(value, dtype=np.float64)
        lp.integrality_ = [highspy.HighsVarType.kInteger] * len(cols)
        lp.offset_ = ks.constant_loss
        h.passModel(lp)
        h.run()
        status = h.getModelStatus()
        info = h.getInfo()
        values = np.asarray(h.getSolution().col_value) if status != highspy.HighsModelStatus.kInfeasible else None
        if status == highspy.HighsModelStatus.kInfeasible or values is None or len(values) != len(cols):
            result.status = "infeasible" if status == highspy.HighsModelStatus.kInfeasible else h.modelStatusToString(status)
            continue
        choice = [0] * n_items
        for (i, j), v in zip(cols, values):
            if v > 0.5:
                choice[i] = j
        optimal = status == highspy.HighsModelStatus.kOptimal
        ok = feasible(ks, choice, window)
        g, f = widths(spec, ks, choice)
        bound = float(info.mip_dual_bound) if math.isfinite(info.mip_dual_bound) else None
        result = ReferenceResult("highs", 0.0, "optimal" if optimal else h.modelStatusToString(status).lower(),
                                 objective(ks, choice) if ok else None, bound, optimal and ok, g, f, label)
        break
    result.seconds = time.perf_counter() - start
    return result


def solve_cpsat(spec: AllocationSpec, time_limit: float = 60.0, threads: int = 1) -> ReferenceResult:
    """Solve ``spec`` with OR-Tools CP-SAT (losses scaled to integers, see the module docstring)."""
    cp_model = _need("ortools.sat.python.cp_model")
    ks = build_knapsack(spec)
    start = time.perf_counter()
    result = ReferenceResult("cpsat", 0.0, "infeasible", None, None, False)
    span = sum(max(o.loss for o in it.options) - min(o.loss for o in it.options) for it in ks.items)
    scale = CPSAT_OBJECTIVE_SCALE / span if span > 0 else 0.0  # every option of every item costs the same: all 0
    for label, window in windows(ks):
        rows = _rows(ks, window)
        m = cp_model.CpModel()
        x = [[m.new_bool_var(f"x{i}_{j}") for j in range(len(it.options))] for i, it in enumerate(ks.items)]
        for xi in x:
            m.add_exactly_one(xi)
        flat = [v for xi in x for v in xi]
        for r in range(len(rows.names)):
            coeffs = [a for row in rows.amounts[r] for a in row]
            hi = cp_model.INT_MAX if math.isinf(rows.hi[r]) else int(rows.hi[r])
            m.add_linear_constraint(cp_model.LinearExpr.weighted_sum(flat, coeffs), int(rows.lo[r]), hi)
        low = [min(o.loss for o in it.options) for it in ks.items]
        costs = [round((o.loss - low[i]) * scale) for i, it in enumerate(ks.items) for o in it.options]
        m.minimize(cp_model.LinearExpr.weighted_sum(flat, costs))
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = float(time_limit)
        solver.parameters.num_workers = int(threads)
        solver.parameters.random_seed = 0
        solver.parameters.linearization_level = LINEARIZATION_LEVEL  # the LP relaxation of every constraint
        status = solver.solve(m)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            result.status = "infeasible" if status == cp_model.INFEASIBLE else solver.status_name(status).lower()
            continue
        choice = [next(j for j in range(len(xi)) if solver.value(xi[j])) for xi in x]
        ok = feasible(ks, choice, window)
        g, f = widths(spec, ks, choice)
        bound = ks.constant_loss + sum(low) + solver.best_objective_bound / scale
        optimal = status == cp_model.OPTIMAL
        result = ReferenceResult("cpsat", 0.0, "optimal" if optimal else "feasible",
                                 objective(ks, choice) if ok else None, bound, optimal and ok, g, f, label)
        break
    result.seconds = time.perf_counter() - start
    return result


REFERENCE_SOLVERS = {"highs": solve_highs, "cpsat": solve_cpsat}

__all__ = ["REFERENCE_SOLVERS", "Item", "Knapsack", "Option", "ReferenceResult", "build_knapsack", "solve_cpsat",
           "solve_highs"]
