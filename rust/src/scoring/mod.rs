//! CPU scoring kernels (issue 4): fused Taylor / magnitude scores and activation statistics.
//!
//! For a weight `W` (rows × cols, row-major), its gradient `G` and a Fisher diagonal `H`
//! (sum of squared per-sample gradients), one pass computes an elementwise score, reduces it
//! over each row (`Axis::Rows`: one value per output row) or each column (`Axis::Cols`: one
//! value per input column) in f32, then sums consecutive groups of `group_size` values:
//!
//! | kind        | element score            | reference                                  |
//! |-------------|--------------------------|--------------------------------------------|
//! | `taylor`    | `|w·g|`                  | LLM-Pruner `param_first`, TP GroupTaylor   |
//! | `vectorize` | `w·g`, `|·|` per group   | LLM-Pruner `vectorize`, TP multivariable   |
//! | `taylor2`   | `|w·h·w|`                | LLM-Pruner `param_second`                  |
//! | `taylor-mix`| `|w·g − ½·w·h·w|`        | LLM-Pruner `param_mix` (abs after mixing)  |
//! | `l1`        | `|w|`                    | TP GroupMagnitude p=1                      |
//! | `l2`        | `w²`                     | TP GroupMagnitude p=2                      |
//!
//! Inputs are read in place (`f32`, `half::bf16`, `half::f16`); rayon parallelises over rows.
//! Bad input is an [`Error::InvalidInput`].

mod element;
mod kernels;

pub use element::Element;

use kernels::{AbsTaylor, ElementScore, Mixed, SecondOrder, SignedTaylor, L1, L2};

use crate::{Error, Result};

/// Which elementwise score to reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    Taylor,
    Vectorize,
    Taylor2,
    TaylorMix,
    L1,
    L2,
}

impl ScoreKind {
    pub const ALL: [ScoreKind; 6] = [
        ScoreKind::Taylor,
        ScoreKind::Vectorize,
        ScoreKind::Taylor2,
        ScoreKind::TaylorMix,
        ScoreKind::L1,
        ScoreKind::L2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ScoreKind::Taylor => "taylor",
            ScoreKind::Vectorize => "vectorize",
            ScoreKind::Taylor2 => "taylor2",
            ScoreKind::TaylorMix => "taylor-mix",
            ScoreKind::L1 => "l1",
            ScoreKind::L2 => "l2",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        ScoreKind::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
            Error::InvalidInput(format!(
                "kind: unknown score kind {name:?}; expected one of taylor, vectorize, taylor2, taylor-mix, l1, l2"
            ))
        })
    }

    /// Whether the gradient `G` is read.
    pub fn needs_grad(self) -> bool {
        matches!(
            self,
            ScoreKind::Taylor | ScoreKind::Vectorize | ScoreKind::TaylorMix
        )
    }

    /// Whether the Fisher diagonal `H` is read.
    pub fn needs_fisher(self) -> bool {
        matches!(self, ScoreKind::Taylor2 | ScoreKind::TaylorMix)
    }
}

/// Reduction direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// One value per output row (reduce over columns); `axis=0` in Python.
    Rows,
    /// One value per input column (reduce over rows); `axis=1` in Python.
    Cols,
}

impl Axis {
    pub fn from_index(axis: usize) -> Result<Self> {
        match axis {
            0 => Ok(Axis::Rows),
            1 => Ok(Axis::Cols),
            _ => Err(Error::InvalidInput(format!(
                "axis: must be 0 (rows) or 1 (columns), got {axis}"
            ))),
        }
    }
}

fn check_len<T>(name: &str, t: &[T], rows: usize, cols: usize) -> Result<()> {
    if t.len() != rows * cols {
        return Err(Error::InvalidInput(format!(
            "{name}: has {} elements, expected {rows}×{cols} = {}",
            t.len(),
            rows * cols
        )));
    }
    Ok(())
}

/// Scores of a `rows × cols` weight, reduced along `axis` and summed over groups of
/// `group_size` consecutive rows (axis Rows) or columns (axis Cols). Returns f32 of length
/// `n / group_size` where `n` is `rows` or `cols`.
#[allow(clippy::too_many_arguments)]
pub fn weight_scores<T: Element>(
    weight: &[T],
    grad: Option<&[T]>,
    fisher: Option<&[T]>,
    rows: usize,
    cols: usize,
    kind: ScoreKind,
    axis: Axis,
    group_size: usize,
) -> Result<Vec<f32>> {
    check_len("weight", weight, rows, cols)?;
    let g = match (kind.needs_grad(), grad) {
        (true, None) => {
            return Err(Error::InvalidInput(format!(
                "grad: score kind {:?} needs a gradient",
                kind.name()
            )))
        }
        (true, Some(g)) => {
            check_len("grad", g, rows, cols)?;
            g
        }
        (false, _) => weight,
    };
    let h = match (kind.needs_fisher(), fisher) {
        (true, None) => {
            return Err(Error::InvalidInput(format!(
                "fisher: score kind {:?} needs the Fisher diagonal (accumulated squared gradients)",
                kind.name()
            )))
        }
        (true, Some(h)) => {
            check_len("fisher", h, rows, cols)?;
            h
        }
        (false, _) => weight,
    };
    let n = match axis {
        Axis::Rows => rows,
        Axis::Cols => cols,
    };
    if group_size == 0 || n % group_size != 0 {
        return Err(Error::InvalidInput(format!(
            "group_size: must be a positive divisor of {n} ({} count), got {group_size}",
            if axis == Axis::Rows { "row" } else { "column" }
        )));
    }
    fn run<T: Element, O: ElementScore>(
        w: &[T],
        g: &[T],
        h: &[T],
        r: usize,
        c: usize,
        axis: Axis,
    ) -> Vec<f32> {
        match axis {
            Axis::Rows => kernels::per_row::<T, O>(w, g, h, r, c),
            Axis::Cols => kernels::per_col::<T, O>(w, g, h, r, c),
        }
    }
    let per_line = match kind {
        ScoreKind::Taylor => run::<T, AbsTaylor>(weight, g, h, rows, cols, axis),
        ScoreKind::Vectorize => run::<T, SignedTaylor>(weight, g, h, rows, cols, axis),
        ScoreKind::Taylor2 => run::<T, SecondOrder>(weight, g, h, rows, cols, axis),
        ScoreKind::TaylorMix => run::<T, Mixed>(weight, g, h, rows, cols, axis),
        ScoreKind::L1 => run::<T, L1>(weight, g, h, rows, cols, axis),
        ScoreKind::L2 => run::<T, L2>(weight, g, h, rows, cols, axis),
    };
    let abs_after = kind == ScoreKind::Vectorize;
    if group_size == 1 {
        return Ok(if abs_after {
            per_line.into_iter().map(f32::abs).collect()
        } else {
            per_line
        });
    }
    Ok(per_line
        .chunks_exact(group_size)
        .map(|grp| {
            let s: f32 = grp.iter().sum();
            if abs_after {
                s.abs()
            } else {
                s
            }
        })
        .collect())
}

/// Per-channel sum and sum of squares of `x` (`rows` tokens × `cols` channels), in f32.
pub fn channel_sums<T: Element>(x: &[T], rows: usize, cols: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    check_len("x", x, rows, cols)?;
    Ok(kernels::column_sum_sumsq(x, rows, cols))
}

#[cfg(test)]
mod tests;
