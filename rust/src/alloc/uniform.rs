//! `uniform`: one rate for every prunable layer.
//!
//! * Exact budget (default): the continuous rate `rho* = T / prunable params` is turned into
//!   whole KV groups: every prunable layer keeps the same fraction of KV groups (the whole-group
//!   value closest to `1 - rho*` for which the MLP can absorb the rest); the MLP then removes
//!   the same number of `mlp_step`s in every layer, and layers differ by at most one step so the
//!   total lands in `[T, T + granule]`. Extra steps go to the layers whose next step costs the
//!   least loss (ties: lower layer index). Without prunable MLP, attention absorbs the same way.
//! * `layer_rate` (LLM-Pruner semantics): every prunable layer removes `floor(rate * Hkv)` KV
//!   groups and `floor(rate * I)` channels (kept width rounded up to an allowed multiple of
//!   `mlp_step`); `ratio` is not a target, the ratio really achieved is reported.

use super::greedy::{fill, repair_single};
use super::problem::{ItemKind, Opt, Problem};
use super::result::Allocation;
use super::spec::Solver;
use crate::error::{Error, Result};

/// Put `items` at a common level (option index), then bump single items one step, cheapest
/// first, until the removed total lies in `[lo, hi]`. `fixed` is removal outside `items`.
fn level_fill(
    p: &Problem,
    items: &[usize],
    choice: &mut [usize],
    fixed: u64,
    lo: u64,
    hi: u64,
) -> bool {
    let total_at = |k: usize| -> u64 {
        fixed
            + items
                .iter()
                .map(|&i| p.items[i].options[k.min(p.items[i].options.len() - 1)].removed)
                .sum::<u64>()
    };
    let max_level = items
        .iter()
        .map(|&i| p.items[i].options.len() - 1)
        .max()
        .unwrap_or(0);
    if total_at(0) > hi {
        return false;
    }
    let mut k = 0;
    while k < max_level && total_at(k + 1) <= hi {
        k += 1;
    }
    for &i in items {
        choice[i] = k.min(p.items[i].options.len() - 1);
    }
    let mut r = total_at(k);
    if r >= lo {
        return true;
    }
    let mut bumps: Vec<(f64, usize)> = items
        .iter()
        .filter(|&&i| choice[i] + 1 < p.items[i].options.len())
        .map(|&i| {
            let o = &p.items[i].options;
            let (a, b) = (o[choice[i]], o[choice[i] + 1]);
            ((b.loss - a.loss) / (b.removed - a.removed).max(1) as f64, i)
        })
        .collect();
    bumps.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for (_, i) in bumps {
        let o = &p.items[i].options;
        let d = o[choice[i] + 1].removed - o[choice[i]].removed;
        if r + d <= hi {
            choice[i] += 1;
            r += d;
            if r >= lo {
                return true;
            }
        }
    }
    false
}

/// Apply per-layer removal rates as the pruner would: `floor(rate * Hkv)` KV groups and
/// `floor(rate * I)` channels removed, the kept width rounded up to an allowed value, then
/// clamped into the layer's constraints (closest allowed option).
pub(crate) fn apply_rates(
    p: &Problem,
    attn_rate: &[f64],
    mlp_rate: &[f64],
) -> (Vec<u64>, Vec<u64>) {
    let spec = p.spec;
    let mut g: Vec<u64> = spec.layers.iter().map(|s| s.num_kv_heads).collect();
    let mut f: Vec<u64> = spec.layers.iter().map(|s| s.intermediate).collect();
    for it in &p.items {
        let l = it.layer;
        let s = spec.layers[l];
        let ra = attn_rate[l].clamp(0.0, 1.0);
        let rm = if it.kind == ItemKind::Tied {
            ra
        } else {
            mlp_rate[l].clamp(0.0, 1.0)
        };
        let want_g =
            s.num_kv_heads - ((ra * s.num_kv_heads as f64).floor() as u64).min(s.num_kv_heads);
        let want_f =
            s.intermediate - ((rm * s.intermediate as f64).floor() as u64).min(s.intermediate);
        // closest allowed option: first by KV groups, then the smallest allowed width >= want_f
        let key = |o: &Opt| -> (u64, u64) {
            let dg = o.g.abs_diff(want_g);
            let df = if o.f >= want_f {
                o.f - want_f
            } else {
                u64::MAX / 2 + (want_f - o.f)
            };
            match it.kind {
                ItemKind::Attn => (dg, 0),
                ItemKind::Mlp => (df, 0),
                ItemKind::Tied => (dg, df),
            }
        };
        let o = *it.options.iter().min_by_key(|o| key(o)).unwrap();
        match it.kind {
            ItemKind::Attn => g[l] = o.g,
            ItemKind::Mlp => f[l] = o.f,
            ItemKind::Tied => {
                g[l] = o.g;
                f[l] = o.f;
            }
        }
    }
    (g, f)
}

/// Refuse budgets a rate mapping cannot take: it needs `ratio` and no KV-cache / FLOPs bound.
pub(crate) fn require_param_budget_only(p: &Problem, who: &str) -> Result<()> {
    if let Some(b) = p.secondary.first() {
        return Err(Error::InvalidInput(format!(
            "{}: {who} takes no {} (use greedy, lagrange or dp, or uniform with a parameter ratio)",
            b.res.field(),
            b.res.field()
        )));
    }
    if !p.param_budget {
        return Err(Error::InvalidInput(format!(
            "ratio: {who} needs a parameter budget"
        )));
    }
    Ok(())
}

fn layer_rate_mode(p: &Problem, rate: f64) -> Allocation {
    let n = p.spec.layers.len();
    let (g, f) = apply_rates(p, &vec![rate; n], &vec![rate; n]);
    let notes = vec![format!(
        "uniform layer_rate={rate}: ratio is not a target; actual_ratio is what the floors achieve"
    )];
    p.finish_gf(&g, &f, Solver::Uniform, &[], notes, p.granule)
}

/// Parameters of every prunable component at full width (the base of a "per-layer rate").
pub(crate) fn prunable_params(p: &Problem) -> u64 {
    p.items
        .iter()
        .map(|it| {
            let s = p.spec.layers[it.layer];
            match it.kind {
                ItemKind::Attn => s.num_kv_heads * s.group_cost(),
                ItemKind::Mlp => s.intermediate * s.channel_cost(),
                ItemKind::Tied => {
                    s.num_kv_heads * s.group_cost() + s.intermediate * s.channel_cost()
                }
            }
        })
        .sum()
}

/// `uniform` on a validated problem.
pub(crate) fn solve(p: &Problem) -> Result<Allocation> {
    let spec = p.spec;
    if let Some(rate) = spec.layer_rate {
        if let Some(b) = p.secondary.first() {
            return Err(Error::InvalidInput(format!(
                "{}: uniform with layer_rate (per-layer floors) takes no {}",
                b.res.field(),
                b.res.field()
            )));
        }
        return Ok(layer_rate_mode(p, rate));
    }
    if !p.param_budget {
        return Err(Error::InvalidInput(
            "ratio: uniform needs a parameter budget (it matches one rate to the parameter count)"
                .into(),
        ));
    }
    p.check_budget()?;
    let t = p.target;
    let attn: Vec<usize> = (0..p.items.len())
        .filter(|&i| p.items[i].kind == ItemKind::Attn)
        .collect();
    let absorb: Vec<usize> = (0..p.items.len())
        .filter(|&i| p.items[i].kind != ItemKind::Attn)
        .collect();
    let prunable = prunable_params(p);
    let rho = if prunable > 0 {
        (t as f64 / prunable as f64).min(1.0)
    } else {
        0.0
    };
    let mut choice = vec![0usize; p.items.len()];

    let windows = [(p.granule, vec![]), (p.granule_max, vec!["granularity"])];
    if absorb.is_empty() {
        for (gran, binding) in windows {
            if level_fill(p, &attn, &mut choice, 0, t, t + gran) && p.meets_secondary(&choice) {
                return Ok(p.finish(&choice, Solver::Uniform, &binding, vec![], gran));
            }
        }
    } else {
        // candidate kept fractions of KV groups, closest to 1 - rho first
        let mut fracs: Vec<f64> = attn
            .iter()
            .flat_map(|&i| {
                let h = spec.layers[p.items[i].layer].num_kv_heads as f64;
                p.items[i].options.iter().map(move |o| o.g as f64 / h)
            })
            .collect();
        fracs.sort_by(|a, b| a.total_cmp(b));
        fracs.dedup_by(|a, b| (*a - *b).abs() < 1e-12);
        fracs.sort_by(|a, b| {
            ((1.0 - a) - rho)
                .abs()
                .total_cmp(&((1.0 - b) - rho).abs())
                .then(b.total_cmp(a))
        });
        if fracs.is_empty() {
            fracs.push(1.0);
        }
        for (gran, binding) in windows {
            for &kf in &fracs {
                let mut fixed = 0;
                for &i in &attn {
                    let it = &p.items[i];
                    let h = spec.layers[it.layer].num_kv_heads as f64;
                    let (j, o) = it
                        .options
                        .iter()
                        .enumerate()
                        .min_by(|a, b| {
                            (a.1.g as f64 / h - kf)
                                .abs()
                                .total_cmp(&(b.1.g as f64 / h - kf).abs())
                        })
                        .unwrap();
                    choice[i] = j;
                    fixed += o.removed;
                }
                if level_fill(p, &absorb, &mut choice, fixed, t, t + gran)
                    && p.meets_secondary(&choice)
                {
                    return Ok(p.finish(&choice, Solver::Uniform, &binding, vec![], gran));
                }
            }
        }
    }
    if let Some(b) = p.secondary.first() {
        let words: Vec<String> = p
            .secondary
            .iter()
            .map(|b| format!("{} {}", b.res.field(), b.ratio))
            .collect();
        return Err(Error::Infeasible(format!(
            "ratio {} and {}: no uniform rate (the same KV groups in every layer) meets {} within the parameter window",
            spec.ratio.unwrap_or(0.0),
            words.join(" and "),
            b.res.field()
        )));
    }
    // Nothing uniform lands in a window: walk greedily from the least pruning and report it.
    let mut c = vec![0usize; p.items.len()];
    fill(p, &mut c, t, u64::MAX);
    let ok = repair_single(p, &mut c, t, t + p.granule_max);
    let r = p.removed_of(&c);
    let gran = if ok {
        p.granule_max
    } else {
        r.saturating_sub(t)
    };
    Ok(p.finish(&c, Solver::Uniform, &["granularity"], vec!["uniform: no uniform level lands in the budget window; layers differ by more than one step".into()], gran))
}
