//! PyO3 binding layer: `layerprune._core`. Thin wrappers only; logic lives in `crate::alloc`
//! and `crate::scoring`. Every entry point goes through `errors::enter` (GIL released,
//! Rust errors and panics mapped to the exception tree declared in `layerprune/errors.py`).

use pyo3::prelude::*;

mod alloc;
mod errors;
mod scoring;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    alloc::register(m)?;
    scoring::register(m)?;
    Ok(())
}
