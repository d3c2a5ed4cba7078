//! Allocation solvers (issue 3): how many KV groups and MLP channels each layer keeps.
//!
//! A layer `l` keeps `g_l` KV groups (one KV head plus its `r = Hq/Hkv` query heads: q, k, v
//! rows and o_proj columns go together) and `f_l` MLP channels (gate/up rows, down columns).
//! Exact parameter counts (`d` = hidden, `hd` = head_dim, `b_*` = 0/1 flags):
//!
//! ```text
//! group   = d*hd*(2*r + 2) + b_qkv*hd*(r + 2)        (q rows r*hd, k and v rows hd each, o_proj
//!                                                     columns r*hd, plus their q/k/v biases)
//! attn(g) = g*group + b_o*d + b_qknorm*2*hd           (o_proj bias d and the q_norm/k_norm
//!                                                     weights, hd each and shared across
//!                                                     heads, are never pruned)
//! mlp(f)  = 3*d*f   + b_mlp*(2*f + d)                 (down_proj bias d is never pruned)
//! layer   = attn(g) + mlp(f) + norm_params
//! total   = extra_params + sum_l layer_l
//! ```
//!
//! Families: Llama `b_qkv = b_o = 0` (or both 1 with `attention_bias`), Qwen2 `b_qkv = 1,
//! b_o = 0`, Qwen3 `b_qknorm = 1`.
//!
//! Two more per-token quantities can be budgeted (both linear in `g` and `f`):
//!
//! ```text
//! kv_cache(g)  = 2 * g * hd * dtype_bytes                       (K and V of every cached token)
//! flops(g, f)  = 2 * (g*d*hd*(2r + 2) + 3*d*f) + 4 * r*g * hd * S (one token of a forward over
//!                S positions: 2 per multiply-add of q/k/v/o, gate/up/down, Q.K^T and A.V)
//! flops total  = extra_flops + sum_l flops_l                   (extra_flops: lm_head, 2*V*d)
//! ```
//!
//! Norms, activations, rotary embeddings, softmax and bias additions are not counted (as
//! `torch.utils.flop_counter` counts a forward pass).
//!
//! **Budgets.** Each budget is a fraction of the dense model's total, and its target count is
//! [`target_count`]`(ratio, total) = round(ratio * total)`, rounded **half away from zero**
//! (`f64::round`: ratio 0.5 of 25 parameters is 13). The parameter budget (`ratio`) asks to
//! remove exactly `T` parameters: solvers land in the window `[T, T + granule]` where
//! `granule` is the smallest prunable step (one KV group or one `mlp_step` of channels,
//! whichever is smaller, over prunable layers). When the discrete choices cannot hit that
//! window the window widens to the largest single step and `"granularity"` is reported as
//! binding (`homogeneous`, the same widths in every layer, lands in `[T, T + L * granule]`
//! instead: one step per layer, and never widens). `kv_cache_ratio` and `flops_ratio` are
//! lower bounds: at least their target of KV-cache bytes / FLOPs per token is removed. Any
//! non-empty set of the three may be given. A budget above what the constraints allow, or a
//! combination no allocation meets, is an [`Error::Infeasible`](crate::Error::Infeasible)
//! naming the constraints and the budgets that bind.
//!
//! Objective (minimised, additive over layers): per-layer cost curves, or with only importance
//! the convex surrogate `loss_l(k) = importance_l * (1 - k)^2` where `k` is the kept fraction of
//! the component (KV groups or MLP channels).
//!
//! **Modules.** `spec`: the problem as given ([`Spec`], [`LayerShape`], [`Solver`]) and its
//! validation; `problem`: the validated problem every solver works on (items and their
//! options); `result`: [`Allocation`] and how a choice becomes one; one module per solver;
//! `bounds`: KV-cache / FLOPs budgets (and budgets without a parameter count).
//!
//! **Dispatch.** [`allocate`] validates the spec once (`build_problem`) and picks the executor:
//! `uniform`, `seed` and `homogeneous` take the problem as it is; `greedy`, `lagrange` and `dp`
//! solve the parameter window alone, and with KV-cache / FLOPs bounds (or without a parameter
//! budget) `allocate` runs `bounds` instead, which calls those solvers on relaxed problems. No
//! solver calls `bounds`.

mod bounds;
mod dp;
mod greedy;
mod homogeneous;
mod lagrange;
mod problem;
mod result;
mod seed;
mod spec;
mod uniform;

#[cfg(test)]
mod tests;

pub use result::{Allocation, LayerAllocation};
pub use spec::{target_count, Curve, DpMethod, LayerShape, Resource, Solver, Spec};

use crate::error::Result;
use problem::build_problem;

/// Solve `spec` with `solver`; `solve_seconds` is the time it took.
pub fn allocate(spec: &Spec, solver: Solver) -> Result<Allocation> {
    let t0 = std::time::Instant::now();
    let mut out = solve_with(spec, solver, true)?;
    out.solve_seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}

/// The dispatcher: validate `spec` once, then run `solver` on it, through `bounds` when
/// `greedy`, `lagrange` or `dp` meet KV-cache / FLOPs bounds or have no parameter budget.
/// `monotone = false` makes `dp` merge every run by brute force (tests compare the two).
pub(crate) fn solve_with(spec: &Spec, solver: Solver, monotone: bool) -> Result<Allocation> {
    let p = build_problem(spec, solver)?;
    match solver {
        Solver::Uniform => uniform::solve(&p),
        Solver::Seed => seed::solve(&p),
        Solver::Homogeneous => homogeneous::solve(&p),
        Solver::Greedy | Solver::Lagrange | Solver::Dp => {
            p.check_budget()?;
            Ok(match (solver, p.has_secondary_budgets()) {
                (Solver::Dp, true) => bounds::solve_dp(&p, monotone)?,
                (_, true) => bounds::solve_heuristic(&p, solver)?,
                (Solver::Dp, false) => dp::solve(&p, monotone),
                (Solver::Greedy, false) => greedy::solve(&p),
                (_, false) => lagrange::solve(&p),
            })
        }
    }
}
