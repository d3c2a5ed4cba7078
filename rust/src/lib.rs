//! layerprune core: allocation solvers and CPU scoring kernels.
//!
//! `alloc` and `scoring` are plain Rust (no PyO3), tested with `cargo test`; both report
//! failures as the one [`Error`]. `python` is the thin binding layer, compiled only with the
//! `python` feature, exposed to Python as `layerprune._core`.

pub mod alloc;
mod error;
pub mod scoring;

pub use error::{Error, Result};

#[cfg(feature = "python")]
mod python;
