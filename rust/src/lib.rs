//! layerprune core: allocation solvers and CPU scoring kernels.
//!
//! `alloc` and `scoring` are plain Rust (no PyO3), tested with `cargo test`.
//! `python` is the thin binding layer, compiled only with the `python` feature,
//! exposed to Python as `layerprune._core`.

pub mod alloc;
pub mod scoring;

#[cfg(feature = "python")]
mod python;
