//! `dp`: exact multiple-choice knapsack. Each item (a layer's attention, its MLP, or both when
//! tied) picks one option; minimise the summed loss subject to params removed in the budget
//! window `[T, T + granule]`.
//!
//! Discretisation is exact: removed amounts are measured relative to each item's least-pruned
//! option and divided by `u`, the GCD of all those amounts (attention group cost
//! `d*hd*(2r+2)` and MLP step cost `3*d*step` share the factor `d`, so `u` is large: 1.57M params
//! for Llama-3-70B with step 64). The state space is capped at the window's upper end. Layers
//! are folded in one at a time by a min-plus convolution of the running table with the item's
//! option set. Options form arithmetic runs in units; a run is merged piece by piece: each
//! maximal convex piece is merged with the SMAWK-style monotone-minima divide and conquer (the
//! matrix `F[i] + g[t-i]` is Monge when `g` is convex, so row argmins are monotone),
//! O(S log S) instead of O(S * options); short pieces are merged by brute force. When the exact
//! table would exceed `MAX_CELLS` cells the unit is coarsened (amounts rounded to it), the
//! result's removal is checked exactly and repaired if needed, and a note says so (and the
//! result is not `proven_optimal`). KV-cache and FLOPs bounds, and budgets without a parameter
//! count, are not solved here: `allocate` routes them to the bounded solve, which runs these
//! tables as its building blocks.

use super::greedy::{land, repair_single};
use super::problem::Problem;
use super::result::Allocation;
use super::spec::Solver;

/// Most table cells (states x items) kept for backtracking (4 bytes each).
const MAX_CELLS: usize = 64 << 20;
const MIN_RUN_FOR_MONOTONE: usize = 12;

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The exact parameter unit of the tables: the GCD of every option's removal relative to its
/// item's option 0 (at least 1).
pub(crate) fn param_gcd(p: &Problem) -> u64 {
    let mut u = 0u64;
    for it in &p.items {
        let r0 = it.options[0].removed;
        for o in &it.options {
            u = gcd(u, o.removed - r0);
        }
    }
    u.max(1)
}

/// Convolve `cur` with the run `g[k]` at units `e0 + k*c` (option indices `first + k`) into
/// `new`/`arg` for output states `s_lo..=s_hi`, by monotone minima (requires `g` convex).
#[allow(clippy::too_many_arguments)]
fn merge_convex_run(
    cur: &[f64],
    new: &mut [f64],
    arg: &mut [u32],
    e0: usize,
    c: usize,
    g: &[f64],
    first: usize,
    s_lo: usize,
    s_hi: usize,
) {
    let n = g.len();
    let mut f_vals: Vec<f64> = Vec::new();
    let mut cols: Vec<usize> = Vec::new();
    let mut lo: Vec<usize> = Vec::new();
    let mut hi_excl: Vec<usize> = Vec::new();
    let mut stack: Vec<(usize, usize, usize, usize)> = Vec::new();
    for rho in 0..c {
        if e0 + rho > s_hi {
            break;
        }
        // rows t: output state e0 + rho + t*c ; columns i: input state rho + i*c
        let t_max = (s_hi - e0 - rho) / c;
        let t_min = if s_lo > e0 + rho {
            (s_lo - e0 - rho).div_ceil(c)
        } else {
            0
        };
        if t_min > t_max {
            continue;
        }
        let i_min = t_min.saturating_sub(n - 1);
        f_vals.clear();
        cols.clear();
        for i in i_min..=t_max {
            let v = cur[rho + i * c];
            f_vals.push(v);
            if v.is_finite() {
                cols.push(i);
            }
        }
        if cols.is_empty() {
            continue;
        }
        lo.clear();
        hi_excl.clear();
        let (mut a, mut b) = (0usize, 0usize);
        for t in t_min..=t_max {
            let min_i = t.saturating_sub(n - 1);
            while a < cols.len() && cols[a] < min_i {
                a += 1;
            }
            while b < cols.len() && cols[b] <= t {
                b += 1;
            }
            lo.push(a);
            hi_excl.push(b);
        }
        stack.clear();
        stack.push((0, t_max - t_min + 1, 0, cols.len() - 1));
        while let Some((r0, r1, c0, c1)) = stack.pop() {
            if r0 >= r1 {
                continue;
            }
            let mid = (r0 + r1) / 2;
            let t = t_min + mid;
            let a = c0.max(lo[mid]);
            let b_excl = (c1 + 1).min(hi_excl[mid]);
            let mut best = usize::MAX;
            let mut bv = f64::INFINITY;
            for (p, &i) in cols.iter().enumerate().take(b_excl.max(a)).skip(a) {
                let v = f_vals[i - i_min] + g[t - i];
                if v < bv {
                    bv = v;
                    best = p;
                }
            }
            let pivot = if best == usize::MAX {
                lo[mid].clamp(c0, c1)
            } else {
                best
            };
            if best != usize::MAX {
                let s = e0 + rho + t * c;
                if bv < new[s] {
                    new[s] = bv;
                    arg[s - s_lo] = (first + (t - cols[best])) as u32;
                }
            }
            stack.push((r0, mid, c0, pivot));
            stack.push((mid + 1, r1, pivot, c1));
        }
    }
}

/// Split `g` (the losses of one arithmetic run) into maximal convex pieces `[a, b)`: the
/// min-plus merge of the run is the minimum of the merges of its pieces, and each convex piece
/// can be merged by monotone minima.
fn convex_pieces(g: &[f64]) -> Vec<(usize, usize)> {
    let scale = g.iter().fold(0.0f64, |m, v| m.max(v.abs())) + 1.0;
    let mut out = Vec::new();
    let mut a = 0;
    while a < g.len() {
        let mut b = a + 1;
        while b < g.len()
            && (b - a < 2 || (g[b] - g[b - 1]) - (g[b - 1] - g[b - 2]) >= -1e-12 * scale)
        {
            b += 1;
        }
        out.push((a, b));
        a = b;
    }
    out
}

/// Run the DP on units `units[i][j]` (per item option) with window `[lo_u, hi_u]`.
/// Returns the chosen option per item, or `None` when no combination lands in the window.
/// Branch-and-bound data: a feasible objective `ub` (relative to the least-pruned options) and
/// a Lagrangian lower bound on what the remaining items must add. With `lam >= 0`, any
/// completion of items `k..` removing at least `need` units costs at least
/// `max(lsuf0[k], lsuf[k] + lam * need)`, where `lsuf[k] = sum_{j>=k} min_o (loss_o - lam * units_o)`
/// and `lsuf0[k] = sum_{j>=k} min_o loss_o`. States whose value plus that bound exceeds `ub` are
/// dropped; the optimum is never dropped, so the DP stays exact.
pub(crate) struct Bound {
    pub lam: f64,
    pub ub: f64,
    pub lsuf: Vec<f64>,
    pub lsuf0: Vec<f64>,
}

impl Bound {
    fn new(p: &Problem, units: &[Vec<usize>], lam: f64, ub: f64) -> Bound {
        let n = p.items.len();
        let mut lsuf = vec![0.0; n + 1];
        let mut lsuf0 = vec![0.0; n + 1];
        for i in (0..n).rev() {
            let base = p.items[i].options[0].loss;
            let (mut m, mut m0) = (f64::INFINITY, f64::INFINITY);
            for (o, &e) in p.items[i].options.iter().zip(&units[i]) {
                m = m.min(o.loss - base - lam * e as f64);
                m0 = m0.min(o.loss - base);
            }
            lsuf[i] = lsuf[i + 1] + m;
            lsuf0[i] = lsuf0[i + 1] + m0;
        }
        Bound {
            lam,
            ub,
            lsuf,
            lsuf0,
        }
    }
}

/// The last row of a knapsack table over some items, and what it takes to backtrack it.
pub(crate) struct Table {
    /// Least loss (relative to each item's option 0) of removing exactly `s` units, `s` in
    /// `0..=hi` (with `saturate`, `hi` stands for `hi` or more); INFINITY where unreachable.
    pub last: Vec<f64>,
    /// Per item, in order: its id, the lowest state stored, the option chosen per state, and
    /// the state the saturated top came from.
    args: Vec<(usize, usize, Vec<u32>, usize)>,
    hi: usize,
    saturate: bool,
}

impl Table {
    /// Option per item (as `(item id, option)`) of the best way to end in state `end`.
    pub fn backtrack(&self, units: &[Vec<usize>], end: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(self.args.len());
        let mut s = end;
        for (item, off, a, top_prev) in self.args.iter().rev() {
            let j = a[s - off] as usize;
            out.push((*item, j));
            s = if self.saturate && s == self.hi {
                *top_prev
            } else {
                s - units[*item][j]
            };
        }
        debug_assert_eq!(s, 0);
        out.reverse();
        out
    }
}

/// Fold `items` (ids into `p.items`, in this order) into a table over states `0..=hi_u` of
/// units removed (relative to each item's option 0), with option losses `losses[item][option]`.
/// States that can no longer reach `lo_u` are dropped. `saturate`: removal above `hi_u` is kept
/// at `hi_u` (meaning "at least `hi_u`") instead of discarded. `None` when a step leaves no
/// reachable state.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_table(
    items: &[usize],
    units: &[Vec<usize>],
    losses: &[Vec<f64>],
    lo_u: usize,
    hi_u: usize,
    monotone: bool,
    bound: Option<&Bound>,
    saturate: bool,
) -> Option<Table> {
    let s_len = hi_u + 1;
    let mut cur = vec![f64::INFINITY; s_len];
    cur[0] = 0.0;
    let mut new = vec![f64::INFINITY; s_len];
    let mut args: Vec<(usize, usize, Vec<u32>, usize)> = Vec::with_capacity(items.len());
    // rem[k]: most units the items from position k on can still add; lower states are dead
    let mut rem = vec![0usize; items.len() + 1];
    for k in (0..items.len()).rev() {
        rem[k] = rem[k + 1] + units[items[k]].iter().copied().max().unwrap_or(0);
    }
    let mut suf: Vec<(f64, usize)> = Vec::new();
    // finite states of `cur` lie in [fin_lo, fin_hi]
    let (mut fin_lo, mut fin_hi) = (0usize, 0usize);
    for (pos, &item) in items.iter().enumerate() {
        let e = &units[item];
        let ls = &losses[item];
        let base_loss = ls[0];
        let s_hi = (fin_hi + e.iter().copied().max().unwrap_or(0)).min(hi_u);
        let s_lo = lo_u.saturating_sub(rem[pos + 1]).max(fin_lo);
        if s_lo > s_hi {
            return None;
        }
        new.iter_mut().for_each(|v| *v = f64::INFINITY);
        // arg[k] is the option chosen at state s_lo + k
        let mut arg = vec![u32::MAX; s_hi - s_lo + 1];
        let nopt = e.len();
        let mut start = 0;
        while start < nopt {
            // maximal arithmetic run of units starting at `start`
            let mut end = start + 1;
            if end < nopt && e[end] > e[start] {
                let step = e[end] - e[start];
                while end < nopt && e[end] - e[end - 1] == step {
                    end += 1;
                }
            }
            let g: Vec<f64> = ls[start..end].iter().map(|&x| x - base_loss).collect();
            for (a, b) in convex_pieces(&g) {
                if monotone && b - a >= MIN_RUN_FOR_MONOTONE {
                    let c = e[start + 1] - e[start];
                    merge_convex_run(
                        &cur,
                        &mut new,
                        &mut arg,
                        e[start + a],
                        c,
                        &g[a..b],
                        start + a,
                        s_lo,
                        s_hi,
                    );
                    continue;
                }
                for (k, &d) in g.iter().enumerate().take(b).skip(a) {
                    let off = e[start + k];
                    if off > s_hi {
                        break;
                    }
                    let j = (start + k) as u32;
                    let s0 = off.max(s_lo);
                    let src = &cur[s0 - off..=s_hi - off];
                    let dst = &mut new[s0..=s_hi];
                    let dst_arg = &mut arg[s0 - s_lo..=s_hi - s_lo];
                    for ((nv, av), &cv) in dst.iter_mut().zip(dst_arg.iter_mut()).zip(src) {
                        let v = cv + d;
                        let better = v < *nv;
                        *nv = if better { v } else { *nv };
                        *av = if better { j } else { *av };
                    }
                }
            }
            start = end;
        }
        let mut top_prev = usize::MAX;
        if saturate && s_hi == hi_u {
            // the top state collects every removal of hi_u or more: suffix minima of `cur`
            suf.clear();
            suf.resize(s_len + 1, (f64::INFINITY, usize::MAX));
            for s in (0..s_len).rev() {
                suf[s] = if cur[s] < suf[s + 1].0 {
                    (cur[s], s)
                } else {
                    suf[s + 1]
                };
            }
            new[hi_u] = f64::INFINITY;
            for (j, &off) in e.iter().enumerate() {
                let (v, s0) = suf[hi_u.saturating_sub(off)];
                let v = v + (ls[j] - base_loss);
                if v < new[hi_u] {
                    new[hi_u] = v;
                    arg[hi_u - s_lo] = j as u32;
                    top_prev = s0;
                }
            }
        }
        if let Some(b) = bound {
            let tol = 1e-9 * (1.0 + b.ub.abs());
            for (s, v) in new.iter_mut().enumerate().take(s_hi + 1).skip(s_lo) {
                let need = lo_u as f64 - s as f64;
                let lb = b.lsuf0[pos + 1].max(b.lsuf[pos + 1] + b.lam * need);
                if *v + lb > b.ub + tol {
                    *v = f64::INFINITY;
                }
            }
        }
        let first = (s_lo..=s_hi).find(|&s| new[s].is_finite())?;
        let last = (s_lo..=s_hi).rev().find(|&s| new[s].is_finite())?;
        fin_lo = first;
        fin_hi = last;
        std::mem::swap(&mut cur, &mut new);
        args.push((item, s_lo, arg, top_prev));
    }
    Some(Table {
        last: cur,
        args,
        hi: hi_u,
        saturate,
    })
}

/// Option losses of every item, as the tables read them.
pub(crate) fn item_losses(p: &Problem) -> Vec<Vec<f64>> {
    p.items
        .iter()
        .map(|it| it.options.iter().map(|o| o.loss).collect())
        .collect()
}

/// Best choice of every item landing in `[lo_u, hi_u]` units, or `None`.
pub(crate) fn table_dp(
    p: &Problem,
    units: &[Vec<usize>],
    lo_u: usize,
    hi_u: usize,
    monotone: bool,
    bound: Option<&Bound>,
) -> Option<Vec<usize>> {
    let all: Vec<usize> = (0..p.items.len()).collect();
    let table = run_table(
        &all,
        units,
        &item_losses(p),
        lo_u,
        hi_u,
        monotone,
        bound,
        false,
    )?;
    let mut best_s = usize::MAX;
    let mut bv = f64::INFINITY;
    for (s, &v) in table.last.iter().enumerate().skip(lo_u) {
        if v < bv {
            bv = v;
            best_s = s;
        }
    }
    if best_s == usize::MAX {
        return None;
    }
    let mut choice = vec![0usize; p.items.len()];
    for (item, j) in table.backtrack(units, best_s) {
        choice[item] = j;
    }
    Some(choice)
}

/// Multiplier (loss per unit) of the LP relaxation: walk all hull steps by slope until the
/// window's lower end is covered; the slope reached is the dual optimum (clamped at 0).
fn dual_lambda(p: &Problem, units: &[Vec<usize>], lo_u: usize) -> f64 {
    let mut steps: Vec<(f64, usize)> = Vec::new();
    for (i, it) in p.items.iter().enumerate() {
        let h = super::greedy::hull_from(p, i, 0);
        for w in h.windows(2) {
            let du = units[i][w[1]] - units[i][w[0]];
            if du > 0 {
                steps.push((
                    (it.options[w[1]].loss - it.options[w[0]].loss) / du as f64,
                    du,
                ));
            }
        }
    }
    steps.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let mut acc = 0usize;
    for (slope, du) in steps {
        acc += du;
        if acc >= lo_u {
            return slope.max(0.0);
        }
    }
    0.0
}

/// `dp` for the parameter window alone (no KV-cache / FLOPs bound); `p` has passed
/// `check_budget`. `monotone = false` merges every run by brute force (tests compare the two).
pub(crate) fn solve(p: &Problem, monotone: bool) -> Allocation {
    let t = p.target;
    let base = p.min_removed;
    let u = param_gcd(p);
    let mut notes = Vec::new();
    let n_items = p.items.len().max(1);
    for (granule, binding) in [(p.granule, vec![]), (p.granule_max, vec!["granularity"])] {
        let hi_p = t + granule;
        if hi_p < base {
            continue;
        }
        let lo_p = t.saturating_sub(base);
        let hi_p = hi_p - base;
        let exact_states = (hi_p / u) as usize + 1;
        let (unit, exact) = if exact_states.saturating_mul(n_items) <= MAX_CELLS {
            (u, true)
        } else {
            let k = (exact_states.saturating_mul(n_items)).div_ceil(MAX_CELLS) as u64;
            (u * k, false)
        };
        let units: Vec<Vec<usize>> = p
            .items
            .iter()
            .map(|it| {
                let r0 = it.options[0].removed;
                it.options
                    .iter()
                    .map(|o| {
                        let d = o.removed - r0;
                        if exact {
                            (d / unit) as usize
                        } else {
                            ((d + unit / 2) / unit) as usize
                        }
                    })
                    .collect()
            })
            .collect();
        let (lo_u, hi_u) = if exact {
            (lo_p.div_ceil(unit) as usize, (hi_p / unit) as usize)
        } else {
            ((lo_p / unit) as usize, hi_p.div_ceil(unit) as usize)
        };
        if lo_u > hi_u {
            continue;
        }
        // incumbent for branch and bound: the greedy landing, when it is in this same window
        let bound = if exact && monotone && binding.is_empty() {
            let mut c = vec![0usize; p.items.len()];
            let (g_used, b) = land(p, &mut c);
            if b.is_empty() && g_used == granule {
                let base_loss: f64 = p.items.iter().map(|it| it.options[0].loss).sum();
                let ub = p
                    .items
                    .iter()
                    .zip(&c)
                    .map(|(it, &j)| it.options[j].loss)
                    .sum::<f64>()
                    - base_loss;
                Some(Bound::new(p, &units, dual_lambda(p, &units, lo_u), ub))
            } else {
                None
            }
        } else {
            None
        };
        let Some(mut choice) = table_dp(p, &units, lo_u, hi_u, monotone, bound.as_ref()) else {
            continue;
        };
        if !exact {
            notes.push(format!(
                "dp: exact state space ({exact_states} states x {n_items} items) too large; amounts rounded to {unit} params, result checked exactly"
            ));
            let r = p.removed_of(&choice);
            if r < t || r > t + granule {
                if !repair_single(p, &mut choice, t, t + granule) {
                    continue;
                }
                notes.push("dp: rounded solution repaired into the budget window".into());
            }
        }
        let b: Vec<&str> = binding.clone();
        let mut out = p.finish(&choice, Solver::Dp, &b, notes, granule);
        // exact units: the table is the whole state space, so the optimum is proven
        out.proven_optimal = exact;
        out.lower_bound = if exact { out.objective } else { f64::NAN };
        return out;
    }
    // No combination lands in either window: fall back to the greedy landing and say so.
    let mut choice = vec![0usize; p.items.len()];
    let (granule, binding) = land(p, &mut choice);
    notes.push(
        "dp: no combination lands within the widest budget window; greedy landing used".into(),
    );
    p.finish(&choice, Solver::Dp, &binding, notes, granule)
}
