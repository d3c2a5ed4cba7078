//! Error mapping at the Python boundary. The exception classes are declared once, in
//! `python/layerprune/errors.py`; this module looks them up by name and raises them. The one
//! crate error, [`crate::Error`], maps variant by variant ([`classify`]).

use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::Error;

/// Which Python exception class (from `layerprune.errors`) an error maps to.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Bad input: `layerprune.errors.InvalidInputError` (a `ValueError`).
    InvalidInput,
    /// A budget or constraint set that cannot be met: `layerprune.errors.InfeasibleError`.
    Infeasible,
    /// A bug on our side (including a caught panic): `layerprune.errors.InternalError`.
    Internal,
}

/// The exception class of a crate error, and its message (`Display`: the message alone).
fn classify(e: Error) -> (Kind, String) {
    match e {
        Error::InvalidInput(m) => (Kind::InvalidInput, m),
        Error::Infeasible(m) => (Kind::Infeasible, m),
    }
}

/// Raise the exception a crate error maps to.
pub fn raise_error(py: Python<'_>, e: Error) -> PyErr {
    let (kind, msg) = classify(e);
    raise(py, kind, msg)
}

/// Raise `layerprune.errors.<class>` with `msg`.
pub fn raise(py: Python<'_>, kind: Kind, msg: String) -> PyErr {
    let class = match kind {
        Kind::InvalidInput => "InvalidInputError",
        Kind::Infeasible => "InfeasibleError",
        Kind::Internal => "InternalError",
    };
    match py
        .import("layerprune.errors")
        .and_then(|m| m.getattr(class))
    {
        Ok(cls) => PyErr::from_type(cls.downcast_into().expect("exception class"), msg),
        Err(e) => e,
    }
}

/// Run `f` with the GIL released and map its error (and any panic) to a Python exception.
pub fn enter<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> crate::Result<T> + Send,
{
    let out = py.allow_threads(|| catch_unwind(AssertUnwindSafe(f)));
    match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(raise_error(py, e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(raise(
                py,
                Kind::Internal,
                format!("internal error in layerprune._core: {msg}"),
            ))
        }
    }
}
