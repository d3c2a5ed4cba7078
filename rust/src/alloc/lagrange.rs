//! `lagrange`: Lagrangian relaxation. For a multiplier `lambda` every item independently picks
//! the option minimising `loss - lambda * params_removed`; the removed total grows with
//! `lambda`, so bisection finds the largest `lambda` whose solution still removes less than the
//! target. From there the greedy hull walk (which continues the Lagrangian path exactly) lands
//! the total in the budget window `[T, T + granule]`.

use super::greedy::land;
use super::problem::Problem;
use super::result::Allocation;
use super::spec::Solver;

fn pick(p: &Problem, lambda: f64, choice: &mut [usize]) -> u64 {
    let mut removed = 0;
    for (i, it) in p.items.iter().enumerate() {
        let mut best = 0;
        let mut bv = f64::INFINITY;
        for (j, o) in it.options.iter().enumerate() {
            let v = o.loss - lambda * o.removed as f64;
            if v < bv {
                bv = v;
                best = j;
            }
        }
        choice[i] = best;
        removed += it.options[best].removed;
    }
    removed
}

/// `lagrange` for the parameter window alone (no KV-cache / FLOPs bound); `p` has passed
/// `check_budget`.
pub(crate) fn solve(p: &Problem) -> Allocation {
    let (choice, granule, binding) = lagrange_choice(p);
    p.finish(&choice, Solver::Lagrange, &binding, vec![], granule)
}

/// The lagrange answer for the parameter window: (choice, granule used, binding).
pub(crate) fn lagrange_choice(p: &Problem) -> (Vec<usize>, u64, Vec<&'static str>) {
    let t = p.target;
    // A multiplier above every option-to-option slope selects maximal removal (below: minimal).
    let mut span = 1.0f64;
    for it in &p.items {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for o in &it.options {
            lo = lo.min(o.loss);
            hi = hi.max(o.loss);
        }
        span = span.max(hi - lo);
    }
    let min_step = p
        .items
        .iter()
        .flat_map(|it| it.options.windows(2).map(|w| w[1].removed - w[0].removed))
        .filter(|&d| d > 0)
        .min()
        .unwrap_or(1);
    let bound = 2.0 * span / min_step as f64 + 1.0;
    let (mut lam_lo, mut lam_hi) = (-bound, bound);
    let mut c_lo = vec![0usize; p.items.len()];
    let mut c_hi = vec![0usize; p.items.len()];
    let mut choice = vec![0usize; p.items.len()];
    pick(p, lam_lo, &mut c_lo);
    pick(p, lam_hi, &mut c_hi);
    let mut start = c_lo.clone();
    if p.removed_of(&c_lo) < t {
        for _ in 0..64 {
            let mid = 0.5 * (lam_lo + lam_hi);
            if mid <= lam_lo || mid >= lam_hi {
                break;
            }
            let r = pick(p, mid, &mut choice);
            if r >= t {
                lam_hi = mid;
                c_hi.copy_from_slice(&choice);
            } else {
                lam_lo = mid;
                c_lo.copy_from_slice(&choice);
            }
        }
        start = c_lo;
    }
    let r_hi = p.removed_of(&c_hi);
    let mut landed = start.clone();
    let (granule, binding) = land(p, &mut landed);
    // the relaxation's own solution, when already inside the window, competes
    let obj = |c: &[usize]| -> f64 {
        p.items
            .iter()
            .zip(c)
            .map(|(it, &j)| it.options[j].loss)
            .sum()
    };
    if r_hi >= t && r_hi <= t + p.granule && (!binding.is_empty() || obj(&c_hi) < obj(&landed)) {
        return (c_hi, p.granule, vec![]);
    }
    (landed, granule, binding)
}
