//! Budgets beyond parameters: KV-cache bytes and FLOPs per token, each a lower bound on what is
//! removed, alone, together, or with the parameter window `[T, T + granule]`.
//!
//! # Exact: a second dimension (`dp`)
//!
//! Every amount is linear in the options, and most items move the bounded quantities in
//! proportion to their parameters: an MLP item removes `6d` FLOPs and no KV cache per `3d`
//! parameters, whatever its width. The items are split into
//!
//! * `S`: every bounded quantity is `kappa_b * params` (one `kappa_b = num_b / den_b` per bound,
//!   the most common one; for the MLPs `kappa_kv = 0`, `kappa_flops = 2`), and
//! * `C`: the rest (attention and tied items).
//!
//! A `C` option adds the residual `rho_b = den_b * s_b - num_b * params` beyond the proportional
//! part. A sparse DP over `C` keeps every distinct `(params units, residuals)` state with its
//! least loss; for Llama shapes a state is fixed by the KV groups removed, so there are at most
//! `sum Hkv + 1` of them. A 1-D table over `S` (the parameter DP of `dp.rs`) gives the least loss
//! of every parameter amount. Bound `b` reads `R_b + num_b * P >= den_b * (target_b - base_b)`
//! with `P` the total parameter units, so for each `C` state the `S` amounts that meet every
//! bound and the parameter window form one interval, whose minimum completes it. Both parts
//! are exact: the answer is the optimum (`proven_optimal`, `lower_bound = objective`).
//!
//! # Lagrangian relaxation with a certified gap
//!
//! For `mu >= 0`, `L(mu) = min_x loss(x) - sum_b mu_b * (s_b(x) - target_b) / target_b` over the
//! parameter window alone (one 1-D DP) is a lower bound on the optimum. Each `mu_b` is raised
//! geometrically until its bound holds, then bisected on the sign of the subgradient (the bound's
//! slack); every relaxed solution meeting all bounds is a candidate. The answer carries
//! `lower_bound = max L`, and is `proven_optimal` only when the gap closes. `dp` falls back to it
//! when the sparse state space exceeds `MAX_SPARSE_STATES` (tied layers on large models), and
//! runs it on request (`dp_method = lagrangian`).
//!
//! # Heuristics (`greedy`, `lagrange`)
//!
//! The same multipliers as penalties: the solver runs on the losses
//! `loss - sum_b mu_b * s_b / target_b`, and the smallest multipliers whose answer meets every
//! bound are searched for the same way.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use super::dp::{item_losses, param_gcd, run_table};
use super::greedy::land;
use super::lagrange::lagrange_choice;
use super::problem::{fmt_params, Problem};
use super::result::Allocation;
use super::spec::{DpMethod, Solver};
use crate::error::{Error, Result};

/// Most states of the sparse DP over `C` items at one step.
const MAX_SPARSE_STATES: usize = 1 << 20;
/// Most (state, option) pairs one step of the sparse DP may enumerate.
const MAX_SPARSE_CANDIDATES: usize = 1 << 26;
/// Most cells of a parameter table (states x items).
const MAX_TABLE_CELLS: usize = 64 << 20;
/// Bisection steps per multiplier; geometric growth steps before them.
const BISECTIONS: usize = 24;
const GROWTHS: usize = 60;

/// Parameters removed per option in units of `u`, the GCD of every option's removal relative to
/// its item's option 0; `base` is what all options 0 remove together.
pub(crate) struct ParamUnits {
    pub u: u64,
    pub units: Vec<Vec<usize>>,
    pub base: u64,
}

pub(crate) fn param_units(p: &Problem) -> ParamUnits {
    let u = param_gcd(p);
    let units = p
        .items
        .iter()
        .map(|it| {
            let r0 = it.options[0].removed;
            it.options
                .iter()
                .map(|o| ((o.removed - r0) / u) as usize)
                .collect()
        })
        .collect();
    ParamUnits {
        u,
        units,
        base: p.min_removed,
    }
}

/// Parameter window in units relative to `base`.
#[derive(Debug, Clone, Copy)]
struct Window {
    lo: usize,
    hi: usize,
}

/// The parameter windows to try, narrow first: `(window, granule, binding)`; one `None` window
/// without a parameter budget.
fn windows(p: &Problem, pu: &ParamUnits) -> Vec<(Option<Window>, u64, Vec<&'static str>)> {
    if !p.param_budget {
        return vec![(None, 0, vec![])];
    }
    let mut out = Vec::new();
    for (granule, binding) in [(p.granule, vec![]), (p.granule_max, vec!["granularity"])] {
        let hi_p = p.target + granule;
        if hi_p < pu.base {
            continue;
        }
        let lo = p.target.saturating_sub(pu.base).div_ceil(pu.u) as usize;
        let hi = ((hi_p - pu.base) / pu.u) as usize;
        if lo <= hi {
            out.push((Some(Window { lo, hi }), granule, binding));
        }
    }
    out
}

fn gcd_i(a: i128, b: i128) -> i128 {
    let (mut a, mut b) = (a.abs(), b.abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// The `S` / `C` split and the integer form of every bound.
struct Split {
    s_items: Vec<usize>,
    c_items: Vec<usize>,
    num: [i128; 2],
    /// `den_b * (target_b - base_b)`: what `R_b + num_b * u * P` must reach.
    need: [i128; 2],
    /// Residuals `rho[c position][option][bound]`.
    rho: Vec<Vec<[i128; 2]>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Prop {
    /// The quantity does not change with the item's choice.
    Constant,
    Kappa(i128, i128),
    No,
}

fn split(p: &Problem, pu: &ParamUnits) -> Split {
    let nb = p.secondary.len();
    let u = pu.u as i128;
    let prop = |i: usize, b: usize| -> Prop {
        let k = p.secondary[b].res as usize;
        let opts = &p.items[i].options;
        let e = &pu.units[i];
        let s0 = opts[0].res[k] as i128;
        match (0..opts.len()).find(|&j| e[j] > 0) {
            None => {
                if opts.iter().all(|o| o.res[k] == opts[0].res[k]) {
                    Prop::Constant
                } else {
                    Prop::No
                }
            }
            Some(j) => {
                let ds = opts[j].res[k] as i128 - s0;
                if ds < 0 {
                    return Prop::No;
                }
                let dp = e[j] as i128 * u;
                let g = gcd_i(ds, dp);
                let (num, den) = (ds / g, dp / g);
                let proportional = opts
                    .iter()
                    .zip(e)
                    .all(|(o, &eu)| (o.res[k] as i128 - s0) * den == num * (eu as i128 * u));
                if proportional {
                    Prop::Kappa(num, den)
                } else {
                    Prop::No
                }
            }
        }
    };
    let props: Vec<Vec<Prop>> = (0..p.items.len())
        .map(|i| (0..nb).map(|b| prop(i, b)).collect())
        .collect();
    let mut num = [0i128; 2];
    let mut den = [1i128; 2];
    for b in 0..nb {
        // the most common kappa, weighted by options (ties: the smaller fraction)
        let mut count: HashMap<(i128, i128), usize> = HashMap::new();
        for (i, pr) in props.iter().enumerate() {
            if let Prop::Kappa(n, d) = pr[b] {
                *count.entry((n, d)).or_default() += p.items[i].options.len();
            }
        }
        if let Some((&(n, d), _)) = count
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then((b.0 .0 * a.0 .1).cmp(&(a.0 .0 * b.0 .1))))
        {
            num[b] = n;
            den[b] = d;
        }
    }
    let in_s = |pr: &[Prop]| {
        pr.iter().enumerate().all(|(b, x)| match *x {
            Prop::Constant => true,
            Prop::Kappa(n, d) => (n, d) == (num[b], den[b]),
            Prop::No => false,
        })
    };
    let (s_items, c_items): (Vec<usize>, Vec<usize>) =
        (0..p.items.len()).partition(|&i| in_s(&props[i]));
    let mut base = [0i128; 2];
    for b in 0..nb {
        let k = p.secondary[b].res as usize;
        for i in 0..p.items.len() {
            base[b] += p.items[i]
                .options
                .iter()
                .map(|o| o.res[k])
                .min()
                .unwrap_or(0) as i128;
        }
    }
    let mut need = [0i128; 2];
    for b in 0..nb {
        need[b] = den[b] * (p.secondary[b].target as i128 - base[b]);
    }
    let rho = c_items
        .iter()
        .map(|&i| {
            let opts = &p.items[i].options;
            let mins: Vec<u64> = (0..nb)
                .map(|b| {
                    let k = p.secondary[b].res as usize;
                    opts.iter().map(|o| o.res[k]).min().unwrap_or(0)
                })
                .collect();
            opts.iter()
                .zip(&pu.units[i])
                .map(|(o, &eu)| {
                    let mut r = [0i128; 2];
                    for b in 0..nb {
                        let k = p.secondary[b].res as usize;
                        r[b] = den[b] * (o.res[k] - mins[b]) as i128 - num[b] * u * eu as i128;
                    }
                    r
                })
                .collect()
        })
        .collect();
    Split {
        s_items,
        c_items,
        num,
        need,
        rho,
    }
}

#[derive(Debug, Clone, Copy)]
struct State {
    p: usize,
    r: [i128; 2],
    loss: f64,
    prev: u32,
    opt: u32,
}

/// The sparse DP over the `C` items: one level of states per item (level 0 is the empty
/// choice). `Err(n)`: `n` states or candidates, too many.
fn c_states(
    p: &Problem,
    pu: &ParamUnits,
    sp: &Split,
    losses: &[Vec<f64>],
    hi: Option<usize>,
) -> Result<Vec<Vec<State>>, usize> {
    let nb = p.secondary.len();
    let nc = sp.c_items.len();
    // bounds with num = 0 have rho >= 0: a state holding `need` holds it for good (saturate it),
    // and one that cannot reach it with the most the remaining items add is dead
    let mut rest_max = vec![[0i128; 2]; nc + 1];
    for pos in (0..nc).rev() {
        for b in 0..nb {
            let m = sp.rho[pos].iter().map(|r| r[b]).max().unwrap_or(0);
            rest_max[pos][b] = rest_max[pos + 1][b] + m;
        }
    }
    let mut levels: Vec<Vec<State>> = vec![vec![State {
        p: 0,
        r: [0; 2],
        loss: 0.0,
        prev: u32::MAX,
        opt: u32::MAX,
    }]];
    for (pos, &i) in sp.c_items.iter().enumerate() {
        let prev = levels.last().unwrap();
        let candidates = prev.len().saturating_mul(pu.units[i].len());
        if candidates > MAX_SPARSE_CANDIDATES {
            return Err(candidates);
        }
        let mut index: HashMap<(usize, [i128; 2]), usize> = HashMap::with_capacity(prev.len() * 2);
        let mut next: Vec<State> = Vec::new();
        for (si, st) in prev.iter().enumerate() {
            for (j, &eu) in pu.units[i].iter().enumerate() {
                let np = st.p + eu;
                if hi.is_some_and(|h| np > h) {
                    break; // options are sorted by parameters removed
                }
                let mut r = st.r;
                let mut dead = false;
                for b in 0..nb {
                    r[b] += sp.rho[pos][j][b];
                    if sp.num[b] == 0 {
                        r[b] = r[b].min(sp.need[b].max(0));
                        dead |= r[b] + rest_max[pos + 1][b] < sp.need[b];
                    }
                }
                if dead {
                    continue;
                }
                let cand = State {
                    p: np,
                    r,
                    loss: st.loss + (losses[i][j] - losses[i][0]),
                    prev: si as u32,
                    opt: j as u32,
                };
                match index.entry((np, r)) {
                    Entry::Occupied(e) => {
                        let k = *e.get();
                        if cand.loss < next[k].loss {
                            next[k] = cand;
                        }
                    }
                    Entry::Vacant(e) => {
                        e.insert(next.len());
                        next.push(cand);
                    }
                }
            }
        }
        if next.len() > MAX_SPARSE_STATES {
            return Err(next.len());
        }
        next.sort_unstable_by(|a, b| (a.p, a.r).cmp(&(b.p, b.r)));
        levels.push(next);
    }
    Ok(levels)
}

/// How an exact solve ended.
enum Exact {
    Found {
        choice: Vec<usize>,
        granule: u64,
        binding: Vec<&'static str>,
    },
    Infeasible,
    TooLarge(String),
}

/// The best completion of every `C` state by the `S` items within `window`.
#[allow(clippy::too_many_arguments)]
fn complete(
    p: &Problem,
    pu: &ParamUnits,
    sp: &Split,
    levels: &[Vec<State>],
    losses: &[Vec<f64>],
    window: Option<Window>,
    monotone: bool,
) -> Result<Option<Vec<usize>>, String> {
    let nb = p.secondary.len();
    let u = pu.u as i128;
    let last = levels.last().unwrap();
    // (C state, least and most S units)
    let mut queries: Vec<(usize, usize, usize)> = Vec::new();
    for (ci, c) in last.iter().enumerate() {
        let mut lo = 0i128;
        let mut ok = true;
        for b in 0..nb {
            if sp.num[b] == 0 {
                ok &= c.r[b] >= sp.need[b];
            } else {
                let deficit = sp.need[b] - c.r[b] - sp.num[b] * u * c.p as i128;
                if deficit > 0 {
                    let step = sp.num[b] * u;
                    lo = lo.max((deficit + step - 1) / step);
                }
            }
        }
        if !ok {
            continue;
        }
        let (lo, hi) = match window {
            Some(w) => {
                if c.p > w.hi {
                    continue;
                }
                (
                    lo.max(w.lo.saturating_sub(c.p) as i128),
                    (w.hi - c.p) as i128,
                )
            }
            None => (lo, i128::MAX),
        };
        if lo > hi || lo > usize::MAX as i128 / 4 {
            continue;
        }
        queries.push((ci, lo as usize, hi.min(usize::MAX as i128 / 4) as usize));
    }
    if queries.is_empty() {
        return Ok(None);
    }
    let l_min = queries.iter().map(|q| q.1).min().unwrap();
    let h_s = match window {
        Some(_) => queries.iter().map(|q| q.2).max().unwrap(),
        None => queries.iter().map(|q| q.1).max().unwrap(),
    };
    let cells = (h_s + 1).saturating_mul(sp.s_items.len().max(1));
    if cells > MAX_TABLE_CELLS {
        return Err(format!(
            "{} parameter states x {} items",
            h_s + 1,
            sp.s_items.len()
        ));
    }
    let Some(table) = run_table(
        &sp.s_items,
        &pu.units,
        losses,
        l_min,
        h_s,
        monotone,
        None,
        window.is_none(),
    ) else {
        return Ok(None);
    };
    let m = &table.last;
    // suffix minima for the open intervals (no parameter window)
    let mut suf: Vec<(f64, usize)> = vec![(f64::INFINITY, usize::MAX); m.len() + 1];
    if window.is_none() {
        for s in (0..m.len()).rev() {
            suf[s] = if m[s] < suf[s + 1].0 {
                (m[s], s)
            } else {
                suf[s + 1]
            };
        }
    }
    let mut best: Option<(f64, usize, usize)> = None;
    for &(ci, lo, hi) in &queries {
        let (v, q) = if window.is_some() {
            let mut bv = (f64::INFINITY, usize::MAX);
            for (q, &v) in m.iter().enumerate().take(hi.min(h_s) + 1).skip(lo) {
                if v < bv.0 {
                    bv = (v, q);
                }
            }
            bv
        } else {
            suf[lo.min(h_s)]
        };
        if q == usize::MAX {
            continue;
        }
        let total = last[ci].loss + v;
        if best.map_or(true, |(b, _, _)| total < b) {
            best = Some((total, ci, q));
        }
    }
    let Some((_, ci, q)) = best else {
        return Ok(None);
    };
    let mut choice = vec![0usize; p.items.len()];
    let mut idx = ci;
    for pos in (0..sp.c_items.len()).rev() {
        let st = levels[pos + 1][idx];
        choice[sp.c_items[pos]] = st.opt as usize;
        idx = st.prev as usize;
    }
    for (item, j) in table.backtrack(&pu.units, q) {
        choice[item] = j;
    }
    Ok(Some(choice))
}

fn solve_exact(p: &Problem, pu: &ParamUnits, losses: &[Vec<f64>], monotone: bool) -> Exact {
    let sp = split(p, pu);
    let wins = windows(p, pu);
    if wins.is_empty() {
        return Exact::Infeasible;
    }
    let widest = wins.iter().filter_map(|w| w.0.map(|w| w.hi)).max();
    let levels = match c_states(p, pu, &sp, losses, widest) {
        Ok(l) => l,
        Err(n) => {
            return Exact::TooLarge(format!(
                "{n} states of the KV-cache/FLOPs dimension over {} items",
                sp.c_items.len()
            ))
        }
    };
    for (w, granule, binding) in wins {
        match complete(p, pu, &sp, &levels, losses, w, monotone) {
            Ok(Some(choice)) => {
                return Exact::Found {
                    choice,
                    granule,
                    binding,
                }
            }
            Ok(None) => continue,
            Err(m) => return Exact::TooLarge(m),
        }
    }
    Exact::Infeasible
}

/// Objective of a choice over the items (what the tables minimise).
fn items_loss(p: &Problem, choice: &[usize]) -> f64 {
    p.items
        .iter()
        .zip(choice)
        .map(|(it, &j)| it.options[j].loss)
        .sum()
}

fn in_window(p: &Problem, choice: &[usize], granule: u64) -> bool {
    let r = p.removed_of(choice);
    !p.param_budget || (r >= p.target && r <= p.target + granule)
}

/// The bounds as words, e.g. `ratio 0.25 and kv_cache_ratio 0.5`.
fn bound_words(p: &Problem, with_ratio: bool, only: &[usize]) -> String {
    let mut w: Vec<String> = Vec::new();
    if with_ratio {
        if let Some(r) = p.spec.ratio {
            w.push(format!("ratio {r}"));
        }
    }
    for &b in only {
        let sb = &p.secondary[b];
        w.push(format!("{} {}", sb.res.field(), sb.ratio));
    }
    w.join(" and ")
}

/// One line saying which budgets cannot hold together, and why.
fn infeasible_message(p: &Problem, pu: &ParamUnits) -> String {
    let nb = p.secondary.len();
    let hi = p.target + p.granule_max;
    let window = format!(
        "the ratio window [{}, {}] params",
        fmt_params(p.target),
        fmt_params(hi)
    );
    if p.param_budget {
        // least parameters removed meeting each set of KV-cache / FLOPs bounds
        let subsets: Vec<Vec<usize>> = match nb {
            1 => vec![vec![0]],
            _ => vec![vec![0], vec![1], vec![0, 1]],
        };
        for sub in &subsets {
            let mut q = p.clone();
            q.param_budget = false;
            q.secondary = sub.iter().map(|&b| p.secondary[b].clone()).collect();
            let cost: Vec<Vec<f64>> = pu
                .units
                .iter()
                .map(|e| e.iter().map(|&x| x as f64).collect())
                .collect();
            if let Exact::Found { choice, .. } = solve_exact(&q, pu, &cost, true) {
                let least = q.removed_of(&choice);
                if least > hi {
                    return format!(
                        "{} cannot hold together: meeting {} removes at least {} params ({}), above {}",
                        bound_words(p, true, sub),
                        bound_words(p, false, sub),
                        fmt_params(least),
                        least,
                        window
                    );
                }
            }
        }
        let all: Vec<usize> = (0..nb).collect();
        return format!(
            "{} cannot hold together: the allocations meeting {} remove amounts of parameters that skip {}",
            bound_words(p, true, &all),
            bound_words(p, false, &all),
            window
        );
    }
    let all: Vec<usize> = (0..nb).collect();
    format!(
        "{}: no allocation meets them together",
        bound_words(p, false, &all)
    )
}

/// A proof that a bound cannot hold with the parameter window: the most of its quantity any
/// allocation in the widest window removes (one 1-D DP maximising it) falls short. The message,
/// or None when every bound can be met on its own.
fn window_caps(p: &Problem, pu: &ParamUnits, monotone: bool) -> Option<String> {
    let (w, _, _) = windows(p, pu).into_iter().last()?;
    let w = w?;
    let all: Vec<usize> = (0..p.items.len()).collect();
    for (b, sb) in p.secondary.iter().enumerate() {
        let k = sb.res as usize;
        let losses: Vec<Vec<f64>> = p
            .items
            .iter()
            .map(|it| it.options.iter().map(|o| -(o.res[k] as f64)).collect())
            .collect();
        let base: u64 = p.items.iter().map(|it| it.options[0].res[k]).sum();
        let most = match run_table(&all, &pu.units, &losses, w.lo, w.hi, monotone, None, false) {
            Some(t) => {
                let least = t
                    .last
                    .iter()
                    .skip(w.lo)
                    .fold(f64::INFINITY, |m, &v| m.min(v));
                if !least.is_finite() {
                    continue;
                }
                (base as f64 - least) as u64
            }
            None => continue,
        };
        if most < sb.target {
            return Some(format!(
                "{} cannot hold together: within {} at most {} {} can be removed ({} needed)",
                bound_words(p, true, &[b]),
                format_args!(
                    "the ratio window [{}, {}] params",
                    fmt_params(p.target),
                    fmt_params(p.target + p.granule_max)
                ),
                fmt_params(most),
                sb.res.what(),
                fmt_params(sb.target)
            ));
        }
    }
    None
}

/// Normalised penalty of an option: `sum_b mu_b * s_b / target_b`.
fn penalised(p: &Problem, mu: &[f64]) -> Vec<Vec<f64>> {
    p.items
        .iter()
        .map(|it| {
            it.options
                .iter()
                .map(|o| {
                    o.loss
                        - p.secondary
                            .iter()
                            .zip(mu)
                            .map(|(b, &m)| {
                                m * o.res[b.res as usize] as f64 / b.target.max(1) as f64
                            })
                            .sum::<f64>()
                })
                .collect()
        })
        .collect()
}

/// Search multipliers, one bound at a time (two rounds with two bounds): raise `mu_b`
/// geometrically until `eval` says the bound holds, then bisect. `eval(mu)` returns the slack
/// of every bound (removed minus target) of the answer it finds.
fn search_multipliers(nb: usize, mut eval: impl FnMut(&[f64]) -> Option<[i128; 2]>) {
    let mut mu = vec![0.0f64; nb];
    let Some(mut slack) = eval(&mu) else { return };
    let rounds = if nb > 1 { 2 } else { 1 };
    for _ in 0..rounds {
        for b in 0..nb {
            if slack[b] >= 0 && mu[b] == 0.0 {
                continue;
            }
            // [lo, hi]: the bound fails at lo and holds at hi
            let mut lo = 0.0f64;
            let mut hi = mu[b].max(1e-3);
            let mut found = false;
            for _ in 0..GROWTHS {
                mu[b] = hi;
                let Some(s) = eval(&mu) else { return };
                slack = s;
                if slack[b] >= 0 {
                    found = true;
                    break;
                }
                lo = hi;
                hi *= 4.0;
            }
            if !found {
                return;
            }
            for _ in 0..BISECTIONS {
                let mid = 0.5 * (lo + hi);
                mu[b] = mid;
                let Some(s) = eval(&mu) else { return };
                if s[b] >= 0 {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            mu[b] = hi;
            let Some(s) = eval(&mu) else { return };
            slack = s;
        }
    }
}

fn slack_of(p: &Problem, choice: &[usize]) -> [i128; 2] {
    let r = p.res_of(choice);
    let mut s = [0i128; 2];
    for (b, sb) in p.secondary.iter().enumerate() {
        s[b] = r[sb.res as usize] as i128 - sb.target as i128;
    }
    s
}

/// A feasible answer found by a multiplier search.
struct Candidate {
    choice: Vec<usize>,
    granule: u64,
    binding: Vec<&'static str>,
    loss: f64,
}

fn keep_best(best: &mut Option<Candidate>, c: Candidate) {
    if best.as_ref().map_or(true, |b| c.loss < b.loss) {
        *best = Some(c);
    }
}

/// The Lagrangian relaxation, window by window (narrow first, as the exact DP): the best
/// feasible relaxed answer, the largest lower bound of that window (both over the items'
/// losses; a bound of the wide window also bounds the narrow one's optimum), and the DPs run.
fn lagrangian(p: &Problem, pu: &ParamUnits, monotone: bool) -> (Option<Candidate>, f64, usize) {
    let nb = p.secondary.len();
    let all: Vec<usize> = (0..p.items.len()).collect();
    let mut evals = 0usize;
    let mut lower = f64::NEG_INFINITY;
    for (w, granule, binding) in windows(p, pu) {
        let mut best: Option<Candidate> = None;
        lower = f64::NEG_INFINITY;
        search_multipliers(nb, |mu| {
            evals += 1;
            let losses = penalised(p, mu);
            let choice: Vec<usize> = match w {
                Some(w) => {
                    let table =
                        run_table(&all, &pu.units, &losses, w.lo, w.hi, monotone, None, false)?;
                    let (mut bv, mut bs) = (f64::INFINITY, usize::MAX);
                    for (s, &v) in table.last.iter().enumerate().skip(w.lo) {
                        if v < bv {
                            (bv, bs) = (v, s);
                        }
                    }
                    if bs == usize::MAX {
                        return None;
                    }
                    let mut c = vec![0usize; p.items.len()];
                    for (item, j) in table.backtrack(&pu.units, bs) {
                        c[item] = j;
                    }
                    c
                }
                None => losses
                    .iter()
                    .map(|l| {
                        (0..l.len())
                            .min_by(|&a, &b| l[a].total_cmp(&l[b]))
                            .unwrap_or(0)
                    })
                    .collect(),
            };
            let relaxed: f64 = choice.iter().enumerate().map(|(i, &j)| losses[i][j]).sum();
            let targets: f64 = p
                .secondary
                .iter()
                .zip(mu)
                .map(|(b, &m)| m * b.target as f64 / b.target.max(1) as f64)
                .sum();
            lower = lower.max(relaxed + targets);
            if p.meets_secondary(&choice) {
                let loss = items_loss(p, &choice);
                keep_best(
                    &mut best,
                    Candidate {
                        choice: choice.clone(),
                        granule,
                        binding: binding.clone(),
                        loss,
                    },
                );
            }
            Some(slack_of(p, &choice))
        });
        if best.is_some() {
            return (best, lower, evals);
        }
    }
    (None, lower, evals)
}

/// `dp` for budgets with KV-cache / FLOPs bounds or without a parameter budget.
pub(crate) fn solve_dp(p: &Problem, monotone: bool) -> Result<Allocation> {
    let pu = param_units(p);
    let losses = item_losses(p);
    let mut notes: Vec<String> = Vec::new();
    let method = p.spec.dp_method;
    if method != DpMethod::Lagrangian {
        match solve_exact(p, &pu, &losses, monotone) {
            Exact::Found {
                choice,
                granule,
                binding,
            } => {
                let mut out = p.finish(&choice, Solver::Dp, &binding, notes, granule);
                out.proven_optimal = true;
                out.lower_bound = out.objective;
                return Ok(out);
            }
            Exact::Infeasible => {
                return Err(Error::Infeasible(infeasible_message(p, &pu)));
            }
            Exact::TooLarge(why) => {
                if method == DpMethod::SecondDimension {
                    return Err(Error::InvalidInput(format!(
                        "dp_method: the second dimension is too large ({why}); use dp_method auto or lagrangian"
                    )));
                }
                notes.push(format!(
                    "dp: exact second dimension too large ({why}); Lagrangian relaxation used"
                ));
            }
        }
    }
    let (best, lower, evals) = lagrangian(p, &pu, monotone);
    let best = match best {
        Some(b) => Some(b),
        None => heuristic(p, Solver::Greedy),
    };
    let Some(best) = best else {
        if let Some(m) = window_caps(p, &pu, monotone) {
            return Err(Error::Infeasible(m));
        }
        let all: Vec<usize> = (0..p.secondary.len()).collect();
        return Err(Error::Infeasible(format!(
            "{}: the Lagrangian relaxation and the greedy search found no allocation meeting them together (not proven infeasible)",
            bound_words(p, true, &all)
        )));
    };
    let gap = best.loss - lower;
    let proven = lower.is_finite() && gap <= 1e-9 * (1.0 + best.loss.abs());
    notes.push(format!(
        "dp: Lagrangian relaxation ({evals} DPs): objective {:.6e}, certified lower bound {:.6e}, gap {:.3e}{}",
        best.loss,
        lower,
        gap,
        if proven { " (optimal)" } else { "" }
    ));
    let mut out = p.finish(&best.choice, Solver::Dp, &best.binding, notes, best.granule);
    let constant = out.objective - items_loss(p, &best.choice);
    out.lower_bound = if lower.is_finite() {
        (lower + constant).min(out.objective)
    } else {
        f64::NAN
    };
    out.proven_optimal = proven;
    Ok(out)
}

/// The penalty search of `greedy` / `lagrange`: the best answer meeting every bound.
fn heuristic(p: &Problem, solver: Solver) -> Option<Candidate> {
    let nb = p.secondary.len();
    let mut best: Option<Candidate> = None;
    search_multipliers(nb, |mu| {
        let losses = penalised(p, mu);
        let mut q = p.clone();
        for (it, l) in q.items.iter_mut().zip(&losses) {
            for (o, &x) in it.options.iter_mut().zip(l) {
                o.loss = x;
            }
        }
        let (choice, granule, binding) = if !q.param_budget {
            let c: Vec<usize> = losses
                .iter()
                .map(|l| {
                    (0..l.len())
                        .min_by(|&a, &b| l[a].total_cmp(&l[b]))
                        .unwrap_or(0)
                })
                .collect();
            (c, 0, vec![])
        } else if solver == Solver::Lagrange {
            lagrange_choice(&q)
        } else {
            let mut c = vec![0usize; q.items.len()];
            let (g, b) = land(&q, &mut c);
            (c, g, b)
        };
        if in_window(p, &choice, granule) && p.meets_secondary(&choice) {
            let loss = items_loss(p, &choice);
            keep_best(
                &mut best,
                Candidate {
                    choice: choice.clone(),
                    granule,
                    binding,
                    loss,
                },
            );
        }
        Some(slack_of(p, &choice))
    });
    best
}

/// `greedy` / `lagrange` with KV-cache / FLOPs bounds or without a parameter budget.
pub(crate) fn solve_heuristic(p: &Problem, solver: Solver) -> Result<Allocation> {
    let Some(best) = heuristic(p, solver) else {
        let all: Vec<usize> = (0..p.secondary.len()).collect();
        return Err(Error::Infeasible(format!(
            "{}: {} found no allocation meeting them together ({} is a heuristic; dp decides exactly)",
            bound_words(p, true, &all),
            solver.name(),
            solver.name()
        )));
    };
    Ok(p.finish(&best.choice, solver, &best.binding, vec![], best.granule))
}
