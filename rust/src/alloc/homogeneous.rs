//! `homogeneous`: the same widths in every layer.
//!
//! Every layer keeps the same number `g` of KV groups and `f` of MLP channels, so the pruned
//! model is described by the family's own config (no per-layer widths). The pair must be an
//! allowed option in every layer: min/max rates, `min_kv_groups`, `min_mlp`, `mlp_step` and `tie`
//! all apply. Candidates are the pairs whose total removal lies in the window `[T, T + W]`, `T`
//! the target of `ratio` and `W` the homogeneous granule: the sum over layers of each layer's
//! smallest step (one KV group or one `mlp_step` of channels), reported as `granule`. Among the
//! candidates that meet the KV-cache / FLOPs bounds, the lowest objective wins (the sum of the
//! layers' curve / surrogate losses, as every solver defines it); ties: more KV groups kept, then
//! fewer channels. Exhaustive over the `(Hkv + 1) * (ceil(I / mlp_step) + 1)` pairs at most.
//!
//! Refused (`InvalidInput`: the widths would differ): `protected` layers, attention / MLP layer
//! ranges that do not cover every layer, `layer_rate` and layers of different shapes. No pair in
//! the window is `Infeasible`, naming the nearest reachable ratios below and above.

use super::problem::{fmt_params, ItemKind, Problem};
use super::result::Allocation;
use super::spec::{attn_loss, mlp_loss, Resource, Solver, Spec};
use crate::error::{Error, Result};

/// The refusals of `homogeneous`: anything that would make the layers' widths differ.
fn refuse(spec: &Spec) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidInput(m));
    let n = spec.layers.len();
    if !spec.protected.is_empty() {
        let mut p = spec.protected.clone();
        p.sort_unstable();
        p.dedup();
        return bad(format!(
            "protected: homogeneous keeps the same widths in every layer, so it cannot leave layers {p:?} whole (drop protected or use another solver)"
        ));
    }
    for (part, start, end) in [
        ("attn", spec.attn_layer_start, spec.attn_layer_end),
        ("mlp", spec.mlp_layer_start, spec.mlp_layer_end),
    ] {
        let (s, e) = (start.unwrap_or(0), end.unwrap_or(n));
        if s > 0 || e < n {
            let field = if s > 0 { "start" } else { "end" };
            return bad(format!(
                "{part}_layer_{field}: homogeneous prunes every layer to the same widths; the range [{s}, {e}) would leave the other layers of the {n} whole"
            ));
        }
    }
    if spec.layer_rate.is_some() {
        return bad(
            "layer_rate: homogeneous matches the parameter budget (ratio); layer_rate is uniform's per-layer floor rate"
                .into(),
        );
    }
    if let Some(l) = spec.layers.iter().position(|s| *s != spec.layers[0]) {
        return bad(format!(
            "layers[{l}]: homogeneous needs every layer of the same shape (layer {l} differs from layer 0)"
        ));
    }
    Ok(())
}

/// One (g, f) pair: its option index in the attention, MLP and tied items (the same in every
/// layer: the layers and their constraints are identical) and its total removal.
#[derive(Debug, Clone, Copy)]
struct Pair {
    g: u64,
    f: u64,
    attn: usize,
    mlp: usize,
    tied: usize,
    removed: u64,
}

/// Every pair allowed in layer 0 (hence in every layer), with the removal over all layers.
fn pairs(p: &Problem) -> Vec<Pair> {
    let n = p.spec.layers.len() as u64;
    let first = |kind: ItemKind| p.items.iter().find(|it| it.layer == 0 && it.kind == kind);
    if let Some(t) = first(ItemKind::Tied) {
        return t
            .options
            .iter()
            .enumerate()
            .map(|(j, o)| Pair {
                g: o.g,
                f: o.f,
                attn: 0,
                mlp: 0,
                tied: j,
                removed: n * o.removed,
            })
            .collect();
    }
    // `refuse` leaves every layer prunable, so both items exist; a missing one keeps full width
    let attn = first(ItemKind::Attn);
    let mlp = first(ItemKind::Mlp);
    let s = p.spec.layers[0];
    let a_opts: Vec<(usize, u64, u64)> = match attn {
        Some(it) => it
            .options
            .iter()
            .enumerate()
            .map(|(j, o)| (j, o.g, o.removed))
            .collect(),
        None => vec![(0, s.num_kv_heads, 0)],
    };
    let m_opts: Vec<(usize, u64, u64)> = match mlp {
        Some(it) => it
            .options
            .iter()
            .enumerate()
            .map(|(j, o)| (j, o.f, o.removed))
            .collect(),
        None => vec![(0, s.intermediate, 0)],
    };
    let mut out = Vec::with_capacity(a_opts.len() * m_opts.len());
    for &(ja, g, ra) in &a_opts {
        for &(jm, f, rm) in &m_opts {
            out.push(Pair {
                g,
                f,
                attn: ja,
                mlp: jm,
                tied: 0,
                removed: n * (ra + rm),
            });
        }
    }
    out
}

fn choice_of(p: &Problem, c: &Pair) -> Vec<usize> {
    p.items
        .iter()
        .map(|it| match it.kind {
            ItemKind::Attn => c.attn,
            ItemKind::Mlp => c.mlp,
            ItemKind::Tied => c.tied,
        })
        .collect()
}

/// The objective of keeping `g` groups and `f` channels in every layer, summed as
/// `Problem::finish_gf` sums it (the same floating-point operations, the same value).
fn objective(spec: &Spec, g: u64, f: u64) -> f64 {
    let mut obj = 0.0;
    for l in 0..spec.layers.len() {
        obj += attn_loss(spec, l, g) + mlp_loss(spec, l, f);
    }
    obj
}

/// `homogeneous` on a validated problem.
pub(crate) fn solve(p: &Problem) -> Result<Allocation> {
    let spec = p.spec;
    refuse(spec)?;
    if !p.param_budget {
        return Err(Error::InvalidInput(
            "ratio: homogeneous needs a parameter budget (it picks the equal widths that remove ratio of all parameters)"
                .into(),
        ));
    }
    p.check_budget()?;
    let n = spec.layers.len() as u64;
    let t = p.target;
    let window = n * p.granule;
    let ratio = spec.ratio.unwrap_or(0.0);
    let all = pairs(p);
    let inside: Vec<&Pair> = all
        .iter()
        .filter(|c| c.removed >= t && c.removed <= t + window)
        .collect();
    if inside.is_empty() {
        let frac = |r: u64| format!("{:.6}", r as f64 / p.total as f64);
        let below = all
            .iter()
            .filter(|c| c.removed < t)
            .map(|c| c.removed)
            .max()
            .map_or("none".to_string(), frac);
        let above = all
            .iter()
            .filter(|c| c.removed > t + window)
            .map(|c| c.removed)
            .min()
            .map_or("none".to_string(), frac);
        return Err(Error::Infeasible(format!(
            "ratio {ratio}: no homogeneous allocation (the same KV groups and MLP channels in every layer) removes between {} and {} params (the target {} plus one step per layer); the nearest reachable ratios are {below} below and {above} above",
            t,
            t + window,
            fmt_params(t)
        )));
    }
    let mut best: Option<(f64, &Pair, Vec<usize>)> = None;
    let mut reached = [0u64; 2];
    for &c in &inside {
        let choice = choice_of(p, c);
        let res = p.res_of(&choice);
        for (k, v) in reached.iter_mut().enumerate() {
            *v = (*v).max(res[k]);
        }
        if !p.meets_secondary(&choice) {
            continue;
        }
        let obj = objective(spec, c.g, c.f);
        let better = match &best {
            None => true,
            Some((bo, bc, _)) => obj
                .total_cmp(bo)
                .then(bc.g.cmp(&c.g))
                .then(c.f.cmp(&bc.f))
                .is_lt(),
        };
        if better {
            best = Some((obj, c, choice));
        }
    }
    let Some((_, c, choice)) = best else {
        let failing: Vec<_> = p
            .secondary
            .iter()
            .filter(|b| reached[b.res as usize] < b.target)
            .collect();
        let named: Vec<_> = if failing.is_empty() {
            p.secondary.iter().collect()
        } else {
            failing
        };
        let words: Vec<String> = named
            .iter()
            .map(|b| {
                format!(
                    "{} {} (at most {:.4} of the {} removed there)",
                    b.res.field(),
                    b.ratio,
                    reached[b.res as usize] as f64 / b.total.max(1) as f64,
                    match b.res {
                        Resource::KvCache => "KV-cache bytes",
                        Resource::Flops => "FLOPs",
                    }
                )
            })
            .collect();
        return Err(Error::Infeasible(format!(
            "ratio {ratio}: no homogeneous allocation in the parameter window [{t}, {}] meets {}",
            t + window,
            words.join(" and ")
        )));
    };
    let notes = vec![format!(
        "homogeneous: every layer keeps {} KV groups and {} MLP channels (window: one step per layer, {} params)",
        c.g,
        c.f,
        fmt_params(window)
    )];
    Ok(p.finish(&choice, Solver::Homogeneous, &[], notes, window))
}
