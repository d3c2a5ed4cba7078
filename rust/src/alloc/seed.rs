//! `seed`: the reference importance-to-rate mapping, reproduced step by step.
//!
//! Over the prunable layers of a component (attention or MLP), with importance `x_l`:
//! 1. optional `x = ln(x)` (`log_transform`; values below the smallest positive f64 are raised to it);
//! 2. min-max normalisation `n = (x - min) / (max - min)` (all equal: `n = 0`);
//! 3. power `n^alpha`; 4. inverse mapping `s = 1 - n^alpha` (more important, lower rate);
//! 5. rescale to the target mean rate `rate = s * mean_target / mean(s)`;
//! 6. clip to `[0, max_rate]`; 7. rescale again to the target mean (no second clip; rates are
//!    only held to `[0, 1]`); 8. rates below `min_effective_rate` become 0.
//!
//! Rates are then applied as the pruner would: `floor(rate * Hkv)` KV groups and
//! `floor(rate * I)` channels removed (kept width rounded up to an allowed multiple of
//! `mlp_step`), clamped into the constraints. The target mean is the per-layer rate that removes
//! `ratio` of all parameters when applied uniformly and continuously to every prunable component:
//! `mean_target = T / prunable params`. Flooring makes the result miss the target; the achieved
//! ratio is reported. Tied layers use the sum of attention and MLP importance for one shared rate.
//! Without importance, a component's importance is its curve's loss at full removal
//! (`curve[0] - curve[last]`).

use super::problem::{ItemKind, Problem};
use super::result::Allocation;
use super::spec::{Curve, Solver};
use super::uniform::{apply_rates, prunable_params};
use crate::error::Result;

/// Steps 1-8 above for the importance of the layers of one component.
pub fn seed_rates(
    importance: &[f64],
    mean_target: f64,
    log_transform: bool,
    alpha: f64,
    max_rate: f64,
    min_effective_rate: f64,
) -> Vec<f64> {
    if importance.is_empty() {
        return vec![];
    }
    let x: Vec<f64> = if log_transform {
        importance
            .iter()
            .map(|&v| v.max(f64::MIN_POSITIVE).ln())
            .collect()
    } else {
        importance.to_vec()
    };
    let mn = x.iter().cloned().fold(f64::INFINITY, f64::min);
    let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: Vec<f64> = x
        .iter()
        .map(|&v| {
            let nrm = if mx > mn { (v - mn) / (mx - mn) } else { 0.0 };
            1.0 - nrm.powf(alpha)
        })
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let ms = mean(&s);
    let mut r: Vec<f64> = if ms > 0.0 {
        s.iter().map(|&v| v * mean_target / ms).collect()
    } else {
        vec![mean_target; s.len()]
    };
    for v in r.iter_mut() {
        *v = v.clamp(0.0, max_rate);
    }
    let mr = mean(&r);
    if mr > 0.0 {
        for v in r.iter_mut() {
            *v = (*v * mean_target / mr).clamp(0.0, 1.0);
        }
    }
    for v in r.iter_mut() {
        if *v < min_effective_rate {
            *v = 0.0;
        }
    }
    r
}

fn component_importance(c: &Curve) -> f64 {
    match c {
        Curve::Importance(w) => *w,
        Curve::Values(v) => v[0] - v[v.len() - 1],
        Curve::Zero => 0.0,
    }
}

/// `seed` on a validated problem.
pub(crate) fn solve(p: &Problem) -> Result<Allocation> {
    let spec = p.spec;
    super::uniform::require_param_budget_only(p, "seed: the reference mapping")?;
    p.check_budget()?;
    let n = spec.layers.len();
    let (ai, mi): (Vec<f64>, Vec<f64>) = match &spec.seed_importance {
        Some((a, m)) => (a.to_vec(), m.to_vec()),
        None => (
            spec.attn_objective
                .iter()
                .map(component_importance)
                .collect(),
            spec.mlp_objective
                .iter()
                .map(component_importance)
                .collect(),
        ),
    };
    let prunable = prunable_params(p);
    let mean_target = if prunable > 0 {
        (p.target as f64 / prunable as f64).min(1.0)
    } else {
        0.0
    };
    let mut attn_rate = vec![0.0; n];
    let mut mlp_rate = vec![0.0; n];
    let mut dropped = false;
    for (kind, max_rate) in [
        (ItemKind::Attn, spec.max_attn_rate),
        (ItemKind::Mlp, spec.max_mlp_rate),
        (ItemKind::Tied, spec.max_attn_rate.min(spec.max_mlp_rate)),
    ] {
        let layers: Vec<usize> = p
            .items
            .iter()
            .filter(|it| it.kind == kind)
            .map(|it| it.layer)
            .collect();
        let imp: Vec<f64> = layers
            .iter()
            .map(|&l| match kind {
                ItemKind::Attn => ai[l],
                ItemKind::Mlp => mi[l],
                ItemKind::Tied => ai[l] + mi[l],
            })
            .collect();
        let rates = seed_rates(
            &imp,
            mean_target,
            spec.log_transform,
            spec.alpha,
            max_rate,
            spec.min_effective_rate,
        );
        let undropped = seed_rates(
            &imp,
            mean_target,
            spec.log_transform,
            spec.alpha,
            max_rate,
            0.0,
        );
        dropped |= rates.iter().zip(&undropped).any(|(a, b)| a != b);
        for (&l, &r) in layers.iter().zip(&rates) {
            match kind {
                ItemKind::Attn => attn_rate[l] = r,
                ItemKind::Mlp => mlp_rate[l] = r,
                ItemKind::Tied => {
                    attn_rate[l] = r;
                    mlp_rate[l] = r;
                }
            }
        }
    }
    let (g, f) = apply_rates(p, &attn_rate, &mlp_rate);
    let binding: Vec<&str> = if dropped {
        vec!["min_effective_rate"]
    } else {
        vec![]
    };
    let notes = vec![format!(
        "seed: target mean per-layer rate {mean_target:.6} (= target removed / prunable params); rates floored to whole heads/channels, so the budget is not hit exactly"
    )];
    Ok(p.finish_gf(&g, &f, Solver::Seed, &binding, notes, p.granule))
}
