//! Bindings for `crate::alloc`: one entry point, `_core.allocate`. Arrays are borrowed from
//! numpy (no copies); the solve runs with the GIL released; results come back as numpy arrays.

use numpy::{IntoPyArray, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{enter, raise, raise_error, Kind};
use crate::alloc::{allocate as solve, Allocation, Curve, DpMethod, LayerShape, Solver, Spec};

const SHAPE_COLUMNS: [&str; 11] = [
    "hidden",
    "num_q_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate",
    "qkv_bias",
    "o_bias",
    "mlp_bias",
    "qk_norm",
    "norm_params",
    "group_norm",
];

fn slice<'a>(py: Python<'_>, name: &str, a: &'a PyReadonlyArray1<'_, f64>) -> PyResult<&'a [f64]> {
    a.as_slice().map_err(|_| {
        raise(
            py,
            Kind::InvalidInput,
            format!("{name}: must be a contiguous float64 array"),
        )
    })
}

fn curves<'a>(
    py: Python<'_>,
    n: usize,
    name: &str,
    v: &'a Option<Vec<PyReadonlyArray1<'_, f64>>>,
) -> PyResult<Option<Vec<&'a [f64]>>> {
    match v {
        None => Ok(None),
        Some(list) => {
            if list.len() != n {
                return Err(raise(
                    py,
                    Kind::InvalidInput,
                    format!(
                        "{name}: expected {n} curves (one per layer), got {}",
                        list.len()
                    ),
                ));
            }
            list.iter()
                .enumerate()
                .map(|(l, a)| slice(py, &format!("{name}[{l}]"), a))
                .collect::<PyResult<Vec<_>>>()
                .map(Some)
        }
    }
}

fn objective<'a>(n: usize, c: &Option<Vec<&'a [f64]>>, imp: Option<&'a [f64]>) -> Vec<Curve<'a>> {
    (0..n)
        .map(|l| match (c, imp) {
            (Some(c), _) => Curve::Values(c[l]),
            (None, Some(w)) => Curve::Importance(w[l]),
            (None, None) => Curve::Zero,
        })
        .collect()
}

/// Solve an allocation problem. `shapes` is an (L, 11) int64 array with columns hidden,
/// num_q_heads, num_kv_heads, head_dim, intermediate, qkv_bias, o_bias, mlp_bias, qk_norm,
/// norm_params, group_norm (flags are 0/1: qkv_bias = q/k/v projections have biases, o_bias =
/// o_proj has a bias, qk_norm = q_norm and k_norm weights of head_dim each, counted but never
/// pruned, group_norm = q_norm and k_norm over the whole projections, pruned with their heads).
/// `ratio` (parameters), `kv_cache_ratio` and `flops_ratio` are the budgets; any may be None
/// but not all.
#[pyfunction]
#[pyo3(signature = (
    shapes, ratio, solver = "dp", *, kv_cache_ratio = None, flops_ratio = None, flops_seq_len = 2048,
    kv_cache_dtype_bytes = 2, extra_flops = 0, dp_method = "auto",
    extra_params = 0, attn_importance = None, mlp_importance = None,
    attn_curves = None, mlp_curves = None, mlp_step = 1, min_kv_groups = 1, min_mlp = None,
    protected = Vec::new(), min_attn_rate = 0.0, max_attn_rate = 1.0, min_mlp_rate = 0.0,
    max_mlp_rate = 1.0, tie = false, attn_layer_start = None, attn_layer_end = None,
    mlp_layer_start = None, mlp_layer_end = None, min_effective_rate = 0.0, layer_rate = None,
    log_transform = false, alpha = 1.0
))]
#[allow(clippy::too_many_arguments)]
fn allocate<'py>(
    py: Python<'py>,
    shapes: PyReadonlyArray2<'py, i64>,
    ratio: Option<f64>,
    solver: &str,
    kv_cache_ratio: Option<f64>,
    flops_ratio: Option<f64>,
    flops_seq_len: i64,
    kv_cache_dtype_bytes: i64,
    extra_flops: i64,
    dp_method: &str,
    extra_params: i64,
    attn_importance: Option<PyReadonlyArray1<'py, f64>>,
    mlp_importance: Option<PyReadonlyArray1<'py, f64>>,
    attn_curves: Option<Vec<PyReadonlyArray1<'py, f64>>>,
    mlp_curves: Option<Vec<PyReadonlyArray1<'py, f64>>>,
    mlp_step: i64,
    min_kv_groups: i64,
    min_mlp: Option<i64>,
    protected: Vec<i64>,
    min_attn_rate: f64,
    max_attn_rate: f64,
    min_mlp_rate: f64,
    max_mlp_rate: f64,
    tie: bool,
    attn_layer_start: Option<i64>,
    attn_layer_end: Option<i64>,
    mlp_layer_start: Option<i64>,
    mlp_layer_end: Option<i64>,
    min_effective_rate: f64,
    layer_rate: Option<f64>,
    log_transform: bool,
    alpha: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let bad = |msg: String| raise(py, Kind::InvalidInput, msg);
    let shape_view = shapes.as_array();
    if shape_view.ncols() != SHAPE_COLUMNS.len() {
        return Err(bad(format!(
            "shapes: expected {} columns ({}), got {}",
            SHAPE_COLUMNS.len(),
            SHAPE_COLUMNS.join(", "),
            shape_view.ncols()
        )));
    }
    let n = shape_view.nrows();
    let mut layers = Vec::with_capacity(n);
    for l in 0..n {
        let row = shape_view.row(l);
        for (c, name) in SHAPE_COLUMNS.iter().enumerate() {
            if row[c] < 0 {
                return Err(bad(format!(
                    "layers[{l}].{name}: must be non-negative, got {}",
                    row[c]
                )));
            }
        }
        layers.push(LayerShape {
            hidden: row[0] as u64,
            num_q_heads: row[1] as u64,
            num_kv_heads: row[2] as u64,
            head_dim: row[3] as u64,
            intermediate: row[4] as u64,
            qkv_bias: row[5] != 0,
            o_bias: row[6] != 0,
            mlp_bias: row[7] != 0,
            qk_norm: row[8] != 0,
            norm_params: row[9] as u64,
            group_norm: row[10] != 0,
        });
    }
    let nonneg = |name: &str, v: i64| -> PyResult<u64> {
        if v < 0 {
            Err(raise(
                py,
                Kind::InvalidInput,
                format!("{name}: must be non-negative, got {v}"),
            ))
        } else {
            Ok(v as u64)
        }
    };
    let opt_idx = |name: &str, v: Option<i64>| -> PyResult<Option<usize>> {
        v.map(|x| nonneg(name, x).map(|u| u as usize)).transpose()
    };
    let attn_imp = attn_importance
        .as_ref()
        .map(|a| slice(py, "attn_importance", a))
        .transpose()?;
    let mlp_imp = mlp_importance
        .as_ref()
        .map(|a| slice(py, "mlp_importance", a))
        .transpose()?;
    let ac = curves(py, n, "attn_curves", &attn_curves)?;
    let mc = curves(py, n, "mlp_curves", &mlp_curves)?;
    for (name, imp) in [("attn_importance", attn_imp), ("mlp_importance", mlp_imp)] {
        if let Some(v) = imp {
            if v.len() != n {
                return Err(bad(format!(
                    "{name}: expected {n} values (one per layer), got {}",
                    v.len()
                )));
            }
        }
    }
    let dp_method = DpMethod::parse(dp_method).map_err(|e| raise_error(py, e))?;
    let spec = Spec {
        ratio,
        kv_cache_ratio,
        flops_ratio,
        flops_seq_len: nonneg("flops_seq_len", flops_seq_len)?,
        kv_cache_dtype_bytes: nonneg("kv_cache_dtype_bytes", kv_cache_dtype_bytes)?,
        extra_flops: nonneg("extra_flops", extra_flops)?,
        dp_method,
        layers,
        extra_params: nonneg("extra_params", extra_params)?,
        attn_objective: objective(n, &ac, attn_imp),
        mlp_objective: objective(n, &mc, mlp_imp),
        mlp_step: nonneg("mlp_step", mlp_step)?,
        min_kv_groups: nonneg("min_kv_groups", min_kv_groups)?,
        min_mlp: min_mlp.map(|v| nonneg("min_mlp", v)).transpose()?,
        protected: protected
            .iter()
            .map(|&p| nonneg("protected", p).map(|u| u as usize))
            .collect::<PyResult<_>>()?,
        min_attn_rate,
        max_attn_rate,
        min_mlp_rate,
        max_mlp_rate,
        tie,
        attn_layer_start: opt_idx("attn_layer_start", attn_layer_start)?,
        attn_layer_end: opt_idx("attn_layer_end", attn_layer_end)?,
        mlp_layer_start: opt_idx("mlp_layer_start", mlp_layer_start)?,
        mlp_layer_end: opt_idx("mlp_layer_end", mlp_layer_end)?,
        min_effective_rate,
        layer_rate,
        log_transform,
        alpha,
        seed_importance: match (attn_imp, mlp_imp) {
            (Some(a), Some(m)) => Some((a, m)),
            _ => None,
        },
    };
    let solver_name = solver.to_string();
    let out: Allocation = enter(py, move || {
        Solver::parse(&solver_name).and_then(|s| solve(&spec, s))
    })?;
    to_dict(py, out)
}

fn to_dict(py: Python<'_>, a: Allocation) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    let col_i = |f: fn(&crate::alloc::LayerAllocation) -> u64| {
        a.layers.iter().map(|l| f(l) as i64).collect::<Vec<i64>>()
    };
    d.set_item(
        "kv_groups_kept",
        col_i(|l| l.kv_groups_kept).into_pyarray(py),
    )?;
    d.set_item("q_heads_kept", col_i(|l| l.q_heads_kept).into_pyarray(py))?;
    d.set_item("mlp_kept", col_i(|l| l.mlp_kept).into_pyarray(py))?;
    d.set_item("params_kept", col_i(|l| l.params_kept).into_pyarray(py))?;
    d.set_item(
        "attn_rate",
        a.layers
            .iter()
            .map(|l| l.attn_rate)
            .collect::<Vec<f64>>()
            .into_pyarray(py),
    )?;
    d.set_item(
        "mlp_rate",
        a.layers
            .iter()
            .map(|l| l.mlp_rate)
            .collect::<Vec<f64>>()
            .into_pyarray(py),
    )?;
    d.set_item("params_before", a.params_before)?;
    d.set_item("params_after", a.params_after)?;
    d.set_item("actual_ratio", a.actual_ratio)?;
    d.set_item("actual_ratio_layers", a.actual_ratio_layers)?;
    d.set_item("objective", a.objective)?;
    d.set_item("solver", a.solver)?;
    d.set_item("solve_seconds", a.solve_seconds)?;
    d.set_item("binding", a.binding)?;
    d.set_item(
        "target_removed",
        if a.param_budget {
            Some(a.target_removed)
        } else {
            None
        },
    )?;
    d.set_item("granule", a.granule)?;
    d.set_item("notes", a.notes)?;
    d.set_item("kv_cache_bytes_before", a.kv_cache_bytes_before)?;
    d.set_item("kv_cache_bytes_after", a.kv_cache_bytes_after)?;
    d.set_item("actual_kv_cache_ratio", a.actual_kv_cache_ratio)?;
    d.set_item("flops_before", a.flops_before)?;
    d.set_item("flops_after", a.flops_after)?;
    d.set_item("actual_flops_ratio", a.actual_flops_ratio)?;
    d.set_item("flops_seq_len", a.flops_seq_len)?;
    d.set_item("target_kv_cache_removed", a.target_kv_cache_removed)?;
    d.set_item("target_flops_removed", a.target_flops_removed)?;
    d.set_item("lower_bound", a.lower_bound)?;
    d.set_item("proven_optimal", a.proven_optimal)?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(allocate, m)?)?;
    Ok(())
}
