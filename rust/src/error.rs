//! The crate's one error type. Every failure is either bad input or a budget no allocation
//! meets; the message says which field or which budgets, and is what Python users read (the
//! binding layer, `python/errors.rs`, maps each variant to a class of `layerprune.errors`).

/// An error of the allocation solvers or the scoring kernels. `Display` is the message alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Bad input: a field out of range, an unknown name, a mis-sized array.
    #[error("{0}")]
    InvalidInput(String),
    /// A budget or constraint set that no allocation meets.
    #[error("{0}")]
    Infeasible(String),
}

/// `Result` with the crate's [`Error`] (a second parameter names another error type).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `Err(Error::InvalidInput(msg))`.
pub(crate) fn invalid<T>(msg: String) -> Result<T> {
    Err(Error::InvalidInput(msg))
}
