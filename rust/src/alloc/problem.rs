//! The validated problem every solver works on: items (a layer's attention, its MLP, or both
//! when tied) with their option lists, per-layer bounds, and the budgets' targets.

use super::spec::{attn_loss, mlp_loss, target_count, Resource, Solver, Spec};
use crate::error::{invalid, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ItemKind {
    Attn,
    Mlp,
    Tied,
}

/// One choice of an item: groups kept `g`, channels kept `f`, params removed (relative to the
/// full layer component), KV-cache bytes and FLOPs per token removed (`res`, by [`Resource`])
/// and loss.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Opt {
    pub g: u64,
    pub f: u64,
    pub removed: u64,
    pub res: [u64; 2],
    pub loss: f64,
}

/// A decision: attention of a layer, MLP of a layer, or both when tied. Options are sorted by
/// `removed` ascending; option 0 is the least pruning the constraints allow.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub layer: usize,
    pub kind: ItemKind,
    pub options: Vec<Opt>,
}

/// Where a bound on a layer's choice comes from (for `binding`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Bounds {
    pub g_lo: u64,
    pub g_lo_src: Option<&'static str>,
    pub g_hi: u64,
    pub g_hi_src: Option<&'static str>,
    pub f_lo: u64,
    pub f_lo_src: Option<&'static str>,
    pub f_hi: u64,
    pub f_hi_src: Option<&'static str>,
}

/// A lower bound on a per-token quantity: remove at least `target` of `total`.
#[derive(Debug, Clone)]
pub(crate) struct SecondaryBound {
    pub res: Resource,
    pub ratio: f64,
    pub target: u64,
    pub total: u64,
    /// Most the constraints let the items remove.
    pub max_removed: u64,
}

/// A validated [`Spec`] as a multiple-choice problem: one [`Item`] per decision, with the
/// budgets' targets and the parameter window's granules.
#[derive(Debug, Clone)]
pub(crate) struct Problem<'s, 'a> {
    pub spec: &'s Spec<'a>,
    /// A parameter budget (`ratio`) was given: removal must land in `[target, target + granule]`.
    pub param_budget: bool,
    /// KV-cache / FLOPs bounds that were given.
    pub secondary: Vec<SecondaryBound>,
    pub kv_total: u64,
    pub flops_total: u64,
    pub items: Vec<Item>,
    pub attn_prunable: Vec<bool>,
    pub mlp_prunable: Vec<bool>,
    pub bounds: Vec<Bounds>,
    pub total: u64,
    pub layers_total: u64,
    pub target: u64,
    /// Smallest prunable step (params) and largest.
    pub granule: u64,
    pub granule_max: u64,
    pub min_removed: u64,
    pub max_removed: u64,
}

/// Allowed MLP widths of a layer: multiples of `step` below `I`, and `I` itself (ascending).
pub(crate) fn mlp_values(i: u64, step: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..).map(|j| j * step).take_while(|&f| f < i).collect();
    v.push(i);
    v
}

const RATE_EPS: f64 = 1e-9;

/// Validate a spec (every field, [`Spec::validate`]) and build the item lists.
pub(crate) fn build_problem<'s, 'a>(spec: &'s Spec<'a>, solver: Solver) -> Result<Problem<'s, 'a>> {
    spec.validate(solver)?;
    let n = spec.layers.len();
    let (as_, ae) = spec.attn_range();
    let (ms, me) = spec.mlp_range();

    let mut attn_prunable = vec![false; n];
    let mut mlp_prunable = vec![false; n];
    for l in 0..n {
        let prot = spec.protected.contains(&l);
        attn_prunable[l] = !prot && l >= as_ && l < ae;
        mlp_prunable[l] = !prot && l >= ms && l < me;
    }

    let mut bounds = vec![Bounds::default(); n];
    let mut items = Vec::new();
    for l in 0..n {
        let s = spec.layers[l];
        let h = s.num_kv_heads;
        let i = s.intermediate;
        let b = &mut bounds[l];
        // attention bounds
        b.g_hi = h;
        b.g_lo = h;
        if attn_prunable[l] {
            if spec.min_kv_groups > h {
                return invalid(format!(
                    "min_kv_groups: {} exceeds num_kv_heads {h} of layer {l}",
                    spec.min_kv_groups
                ));
            }
            let from_rate = ((1.0 - spec.max_attn_rate) * h as f64 - RATE_EPS)
                .ceil()
                .max(0.0) as u64;
            b.g_lo = spec.min_kv_groups.max(from_rate);
            if b.g_lo > 0 {
                b.g_lo_src = Some(if spec.min_kv_groups >= from_rate {
                    "min_kv_groups"
                } else {
                    "max_attn_rate"
                });
            }
            b.g_hi = (((1.0 - spec.min_attn_rate) * h as f64 + RATE_EPS).floor() as u64).min(h);
            if b.g_hi < h {
                b.g_hi_src = Some("min_attn_rate");
            }
            if b.g_lo > b.g_hi {
                return Err(Error::Infeasible(format!(
                    "layer {l}: no whole number of KV groups (num_kv_heads={h}) satisfies min_attn_rate={} , max_attn_rate={} and min_kv_groups={}",
                    spec.min_attn_rate, spec.max_attn_rate, spec.min_kv_groups
                )));
            }
        }
        // MLP bounds
        b.f_hi = i;
        b.f_lo = i;
        let mut fvals = vec![i];
        if mlp_prunable[l] {
            let min_mlp = spec.min_mlp.unwrap_or(spec.mlp_step.min(i));
            if min_mlp > i {
                return invalid(format!(
                    "min_mlp: {min_mlp} exceeds intermediate {i} of layer {l}"
                ));
            }
            let from_rate = (1.0 - spec.max_mlp_rate) * i as f64 - RATE_EPS;
            let hi_rate = (1.0 - spec.min_mlp_rate) * i as f64 + RATE_EPS;
            fvals = mlp_values(i, spec.mlp_step)
                .into_iter()
                .filter(|&f| f >= min_mlp && f as f64 >= from_rate && f as f64 <= hi_rate)
                .collect();
            if fvals.is_empty() {
                return Err(Error::Infeasible(format!(
                    "layer {l}: no allowed MLP width (intermediate={i}, mlp_step={}) satisfies min_mlp={min_mlp}, min_mlp_rate={} and max_mlp_rate={}",
                    spec.mlp_step, spec.min_mlp_rate, spec.max_mlp_rate
                )));
            }
            b.f_lo = fvals[0];
            b.f_hi = *fvals.last().unwrap();
            if b.f_lo > 0 {
                b.f_lo_src = Some(if (min_mlp as f64) >= from_rate {
                    "min_mlp"
                } else {
                    "max_mlp_rate"
                });
            }
            if b.f_hi < i {
                b.f_hi_src = Some("min_mlp_rate");
            }
        }
        let gc = s.group_cost();
        let cc = s.channel_cost();
        let kv_g = s.kv_cache_bytes(1, spec.kv_cache_dtype_bytes);
        let fl_g = s.group_flops(spec.flops_seq_len);
        let fl_c = s.channel_flops();
        let res = |g: u64, f: u64| [(h - g) * kv_g, (h - g) * fl_g + (i - f) * fl_c];
        let tied = spec.tie && attn_prunable[l] && mlp_prunable[l];
        if tied {
            let mut opts = Vec::new();
            for g in b.g_lo..=b.g_hi {
                for &f in &fvals {
                    let diff = (f as f64 / i as f64 - g as f64 / h as f64).abs();
                    if diff <= 0.5 / h as f64 + 1e-12 {
                        opts.push(Opt {
                            g,
                            f,
                            removed: (h - g) * gc + (i - f) * cc,
                            res: res(g, f),
                            loss: attn_loss(spec, l, g) + mlp_loss(spec, l, f),
                        });
                    }
                }
            }
            if opts.is_empty() {
                return Err(Error::Infeasible(format!(
                    "layer {l}: tie leaves no (KV groups, MLP width) pair within the rate bounds"
                )));
            }
            opts.sort_by(|a, b| a.removed.cmp(&b.removed).then(a.g.cmp(&b.g).reverse()));
            items.push(Item {
                layer: l,
                kind: ItemKind::Tied,
                options: opts,
            });
            continue;
        }
        if attn_prunable[l] {
            let opts = (b.g_lo..=b.g_hi)
                .rev()
                .map(|g| Opt {
                    g,
                    f: i,
                    removed: (h - g) * gc,
                    res: res(g, i),
                    loss: attn_loss(spec, l, g),
                })
                .collect();
            items.push(Item {
                layer: l,
                kind: ItemKind::Attn,
                options: opts,
            });
        }
        if mlp_prunable[l] {
            let opts = fvals
                .iter()
                .rev()
                .map(|&f| Opt {
                    g: h,
                    f,
                    removed: (i - f) * cc,
                    res: res(h, f),
                    loss: mlp_loss(spec, l, f),
                })
                .collect();
            items.push(Item {
                layer: l,
                kind: ItemKind::Mlp,
                options: opts,
            });
        }
    }

    let layers_total: u64 = spec.layers.iter().map(|s| s.full_params()).sum();
    let total = layers_total + spec.extra_params;
    let target = spec.ratio.map_or(0, |r| target_count(r, total));
    let kv_total: u64 = spec
        .layers
        .iter()
        .map(|s| s.kv_cache_bytes(s.num_kv_heads, spec.kv_cache_dtype_bytes))
        .sum();
    let flops_total: u64 = spec.extra_flops
        + spec
            .layers
            .iter()
            .map(|s| s.layer_flops(s.num_kv_heads, s.intermediate, spec.flops_seq_len))
            .sum::<u64>();
    let mut secondary = Vec::new();
    for (res, ratio, res_total) in [
        (Resource::KvCache, spec.kv_cache_ratio, kv_total),
        (Resource::Flops, spec.flops_ratio, flops_total),
    ] {
        let Some(ratio) = ratio else { continue };
        let k = res as usize;
        let max_removed = items
            .iter()
            .map(|it| it.options.iter().map(|o| o.res[k]).max().unwrap_or(0))
            .sum();
        secondary.push(SecondaryBound {
            res,
            ratio,
            target: target_count(ratio, res_total),
            total: res_total,
            max_removed,
        });
    }
    let mut granule = u64::MAX;
    let mut granule_max = 0u64;
    for l in 0..n {
        let s = &spec.layers[l];
        if attn_prunable[l] && bounds[l].g_hi > bounds[l].g_lo {
            granule = granule.min(s.group_cost());
            granule_max = granule_max.max(s.group_cost());
        }
        if mlp_prunable[l] && bounds[l].f_hi > bounds[l].f_lo {
            granule = granule.min(spec.mlp_step.min(s.intermediate) * s.channel_cost());
            granule_max = granule_max.max(spec.mlp_step.min(s.intermediate) * s.channel_cost());
        }
    }
    for it in &items {
        for w in it.options.windows(2) {
            granule_max = granule_max.max(w[1].removed - w[0].removed);
        }
    }
    if granule == u64::MAX {
        granule = 0;
    }
    granule_max = granule_max.max(granule);
    let min_removed = items.iter().map(|it| it.options[0].removed).sum();
    let max_removed = items
        .iter()
        .map(|it| it.options.last().unwrap().removed)
        .sum();
    let p = Problem {
        spec,
        param_budget: spec.ratio.is_some(),
        secondary,
        kv_total,
        flops_total,
        items,
        attn_prunable,
        mlp_prunable,
        bounds,
        total,
        layers_total,
        target,
        granule,
        granule_max,
        min_removed,
        max_removed,
    };
    Ok(p)
}

pub(crate) fn fmt_params(x: u64) -> String {
    let xf = x as f64;
    if xf >= 1e9 {
        format!("{:.3}B", xf / 1e9)
    } else if xf >= 1e6 {
        format!("{:.2}M", xf / 1e6)
    } else if xf >= 1e3 {
        format!("{:.1}K", xf / 1e3)
    } else {
        format!("{x}")
    }
}

impl<'s, 'a> Problem<'s, 'a> {
    /// The constraints that cap how much can be removed, for messages (`attention_only`: those
    /// that cap the attention, which alone holds the KV cache).
    fn capping_constraints(&self, attention_only: bool) -> Vec<String> {
        let spec = self.spec;
        let mut why: Vec<String> = Vec::new();
        if !spec.protected.is_empty() {
            let mut p = spec.protected.clone();
            p.sort_unstable();
            p.dedup();
            why.push(format!("protected layers {p:?}"));
        }
        let n = spec.layers.len();
        if spec.attn_layer_start.unwrap_or(0) > 0 || spec.attn_layer_end.unwrap_or(n) < n {
            why.push(format!(
                "attention range [{}, {})",
                spec.attn_layer_start.unwrap_or(0),
                spec.attn_layer_end.unwrap_or(n)
            ));
        }
        if !attention_only
            && (spec.mlp_layer_start.unwrap_or(0) > 0 || spec.mlp_layer_end.unwrap_or(n) < n)
        {
            why.push(format!(
                "MLP range [{}, {})",
                spec.mlp_layer_start.unwrap_or(0),
                spec.mlp_layer_end.unwrap_or(n)
            ));
        }
        why.push(format!("min_kv_groups={}", spec.min_kv_groups));
        if !attention_only {
            why.push(format!("min_mlp={}", spec.min_mlp.unwrap_or(spec.mlp_step)));
        }
        if spec.max_attn_rate < 1.0 {
            why.push(format!("max_attn_rate={}", spec.max_attn_rate));
        }
        if !attention_only && spec.max_mlp_rate < 1.0 {
            why.push(format!("max_mlp_rate={}", spec.max_mlp_rate));
        }
        if spec.tie {
            why.push("tie".into());
        }
        why
    }

    /// Error unless every budget's target lies within what the constraints allow.
    pub fn check_budget(&self) -> Result<()> {
        let spec = self.spec;
        if self.param_budget && self.target > self.max_removed {
            let mut why = self.capping_constraints(false);
            why.push(format!(
                "never-pruned parameters ({} outside decoder layers, norms and biases)",
                fmt_params(spec.extra_params)
            ));
            return Err(Error::Infeasible(format!(
                "ratio {} needs {} params removed ({} of {}) but {} allow at most {} ({:.4} of all parameters)",
                spec.ratio.unwrap_or(0.0),
                fmt_params(self.target),
                self.target,
                self.total,
                why.join(" and "),
                fmt_params(self.max_removed),
                self.max_removed as f64 / self.total as f64
            )));
        }
        if self.param_budget && self.min_removed > self.target + self.granule_max {
            return Err(Error::Infeasible(format!(
                "ratio {} asks for {} params removed but min_attn_rate={} and min_mlp_rate={} force at least {} removed",
                spec.ratio.unwrap_or(0.0),
                fmt_params(self.target),
                spec.min_attn_rate,
                spec.min_mlp_rate,
                fmt_params(self.min_removed)
            )));
        }
        for b in &self.secondary {
            if b.target > b.max_removed {
                let mut why = self.capping_constraints(b.res == Resource::KvCache);
                if b.res == Resource::Flops && spec.extra_flops > 0 {
                    why.push(format!(
                        "never-pruned FLOPs ({} per token outside decoder layers)",
                        fmt_params(spec.extra_flops)
                    ));
                }
                return Err(Error::Infeasible(format!(
                    "{} {} needs {} {} removed ({} of {}) but {} allow at most {} ({:.4} of them)",
                    b.res.field(),
                    b.ratio,
                    fmt_params(b.target),
                    b.res.what(),
                    b.target,
                    b.total,
                    why.join(" and "),
                    fmt_params(b.max_removed),
                    b.max_removed as f64 / b.total.max(1) as f64
                )));
            }
        }
        Ok(())
    }

    /// KV-cache bytes and FLOPs per token removed by a choice (by [`Resource`]).
    pub fn res_of(&self, choice: &[usize]) -> [u64; 2] {
        let mut out = [0u64; 2];
        for (it, &c) in self.items.iter().zip(choice) {
            for (k, v) in out.iter_mut().enumerate() {
                *v += it.options[c].res[k];
            }
        }
        out
    }

    /// Does a choice meet every KV-cache / FLOPs bound?
    pub fn meets_secondary(&self, choice: &[usize]) -> bool {
        let r = self.res_of(choice);
        self.secondary.iter().all(|b| r[b.res as usize] >= b.target)
    }

    /// Whether the budgets go beyond the parameter window alone (a KV-cache / FLOPs bound, or
    /// no parameter budget): then `greedy`, `lagrange` and `dp` run through `bounds`.
    pub fn has_secondary_budgets(&self) -> bool {
        !self.param_budget || !self.secondary.is_empty()
    }

    pub fn removed_of(&self, choice: &[usize]) -> u64 {
        self.items
            .iter()
            .zip(choice)
            .map(|(it, &c)| it.options[c].removed)
            .sum()
    }
}
