//! Bindings for `crate::scoring`: zero-copy numpy views in, f32 numpy arrays out.
//!
//! bfloat16 and float16 tensors arrive as uint16 arrays of their bits (torch:
//! `t.view(torch.int16).numpy().view(numpy.uint16)`), reinterpreted here without copying.

use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{PyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::errors::{enter, raise, raise_error, Kind};
use crate::scoring::{self, Axis, Element, ScoreKind};

/// Borrow a C-contiguous 2-D array of storage type `S`, naming `field` in any error.
fn borrow2<'py, S: numpy::Element>(
    py: Python<'py>,
    field: &str,
    obj: &Bound<'py, PyAny>,
    dtype: &str,
) -> PyResult<PyReadonlyArray2<'py, S>> {
    let arr: PyReadonlyArray2<'py, S> = obj.extract().map_err(|_| {
        raise(
            py,
            Kind::InvalidInput,
            format!(
                "{field}: expected a 2-D numpy array of {} (dtype={dtype})",
                if dtype == "float32" {
                    "float32"
                } else {
                    "uint16 bits"
                }
            ),
        )
    })?;
    if !arr.is_c_contiguous() {
        return Err(raise(
            py,
            Kind::InvalidInput,
            format!("{field}: array must be C-contiguous"),
        ));
    }
    Ok(arr)
}

#[allow(clippy::too_many_arguments)]
fn scores_typed<'py, S: numpy::Element, T: Element>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    grad: Option<&Bound<'py, PyAny>>,
    fisher: Option<&Bound<'py, PyAny>>,
    kind: ScoreKind,
    axis: Axis,
    group_size: usize,
    dtype: &str,
    cast: fn(&[S]) -> &[T],
) -> PyResult<Vec<f32>> {
    let w = borrow2::<S>(py, "weight", weight, dtype)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let g = grad
        .map(|o| borrow2::<S>(py, "grad", o, dtype))
        .transpose()?;
    let h = fisher
        .map(|o| borrow2::<S>(py, "fisher", o, dtype))
        .transpose()?;
    for (name, a) in [("grad", &g), ("fisher", &h)] {
        if let Some(a) = a {
            if a.shape() != [rows, cols] {
                return Err(raise(
                    py,
                    Kind::InvalidInput,
                    format!(
                        "{name}: shape {:?} differs from weight shape [{rows}, {cols}]",
                        a.shape()
                    ),
                ));
            }
        }
    }
    let ws = cast(w.as_slice().expect("checked contiguous"));
    let gs = g
        .as_ref()
        .map(|a| cast(a.as_slice().expect("checked contiguous")));
    let hs = h
        .as_ref()
        .map(|a| cast(a.as_slice().expect("checked contiguous")));
    enter(py, || {
        scoring::weight_scores(ws, gs, hs, rows, cols, kind, axis, group_size)
    })
}

fn same(s: &[f32]) -> &[f32] {
    s
}
fn as_bf16(s: &[u16]) -> &[bf16] {
    s.reinterpret_cast::<bf16>()
}
fn as_f16(s: &[u16]) -> &[f16] {
    s.reinterpret_cast::<f16>()
}

/// weight_scores(weight, grad=None, fisher=None, *, kind="taylor", axis=0, group_size=1, dtype="float32")
///
/// Fused one-pass score of a 2-D weight reduced per row (axis=0) or per column (axis=1), then
/// summed over groups of `group_size`. Returns a float32 array of length n / group_size.
#[pyfunction]
#[pyo3(signature = (weight, grad=None, fisher=None, *, kind="taylor", axis=0, group_size=1, dtype="float32"))]
#[allow(clippy::too_many_arguments)]
fn weight_scores<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    grad: Option<&Bound<'py, PyAny>>,
    fisher: Option<&Bound<'py, PyAny>>,
    kind: &str,
    axis: usize,
    group_size: usize,
    dtype: &str,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let kind = ScoreKind::parse(kind).map_err(|e| raise_error(py, e))?;
    let axis = Axis::from_index(axis).map_err(|e| raise_error(py, e))?;
    let out = match dtype {
        "float32" => scores_typed::<f32, f32>(
            py, weight, grad, fisher, kind, axis, group_size, dtype, same,
        )?,
        "bfloat16" => scores_typed::<u16, bf16>(
            py, weight, grad, fisher, kind, axis, group_size, dtype, as_bf16,
        )?,
        "float16" => scores_typed::<u16, f16>(
            py, weight, grad, fisher, kind, axis, group_size, dtype, as_f16,
        )?,
        other => {
            return Err(raise(
                py,
                Kind::InvalidInput,
                format!("dtype: expected float32, bfloat16 or float16, got {other:?}"),
            ))
        }
    };
    Ok(PyArray1::from_vec(py, out))
}

fn sums_typed<'py, S: numpy::Element, T: Element>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    cast: fn(&[S]) -> &[T],
) -> PyResult<(Vec<f32>, Vec<f32>)> {
    let a = borrow2::<S>(py, "x", x, dtype)?;
    let (rows, cols) = (a.shape()[0], a.shape()[1]);
    let xs = cast(a.as_slice().expect("checked contiguous"));
    enter(py, || scoring::channel_sums(xs, rows, cols))
}

/// channel_sums(x, *, dtype="float32") -> (sum, sumsq)
///
/// Per-channel (column) sum and sum of squares of a tokens × channels array, in float32.
#[pyfunction]
#[pyo3(signature = (x, *, dtype="float32"))]
#[allow(clippy::type_complexity)]
fn channel_sums<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<f32>>)> {
    let (s, q) = match dtype {
        "float32" => sums_typed::<f32, f32>(py, x, dtype, same)?,
        "bfloat16" => sums_typed::<u16, bf16>(py, x, dtype, as_bf16)?,
        "float16" => sums_typed::<u16, f16>(py, x, dtype, as_f16)?,
        other => {
            return Err(raise(
                py,
                Kind::InvalidInput,
                format!("dtype: expected float32, bfloat16 or float16, got {other:?}"),
            ))
        }
    };
    Ok((PyArray1::from_vec(py, s), PyArray1::from_vec(py, q)))
}

/// Number of threads the Rust kernels use (rayon's global pool).
#[pyfunction]
fn scoring_threads() -> usize {
    rayon::current_num_threads()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(weight_scores, m)?)?;
    m.add_function(wrap_pyfunction!(channel_sums, m)?)?;
    m.add_function(wrap_pyfunction!(scoring_threads, m)?)?;
    Ok(())
}
