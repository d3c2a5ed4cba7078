//! What a solver returns ([`Allocation`], one [`LayerAllocation`] per layer), and how a
//! choice of options becomes one (objective, binding constraints, achieved ratios).

use super::problem::{ItemKind, Problem};
use super::spec::{attn_loss, mlp_loss, Resource, Solver};

/// Per-layer result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerAllocation {
    pub kv_groups_kept: u64,
    pub q_heads_kept: u64,
    pub mlp_kept: u64,
    /// Fraction of KV groups removed.
    pub attn_rate: f64,
    /// Fraction of MLP channels removed.
    pub mlp_rate: f64,
    pub params_kept: u64,
}

/// Solver output.
#[derive(Debug, Clone)]
pub struct Allocation {
    pub layers: Vec<LayerAllocation>,
    pub params_before: u64,
    pub params_after: u64,
    /// Removed fraction of all parameters.
    pub actual_ratio: f64,
    /// Removed fraction of decoder-layer parameters.
    pub actual_ratio_layers: f64,
    pub objective: f64,
    pub solver: &'static str,
    pub solve_seconds: f64,
    pub binding: Vec<String>,
    /// Target number of removed parameters `target_count(ratio, params_before)` (0 without a
    /// parameter budget).
    pub target_removed: u64,
    /// Budget tolerance actually used (the window is `[target_removed, target_removed + granule]`).
    pub granule: u64,
    pub notes: Vec<String>,
    /// Whether `ratio` was given (else `target_removed` and `granule` mean nothing).
    pub param_budget: bool,
    /// KV-cache bytes per token, dense and kept, and the removed fraction.
    pub kv_cache_bytes_before: u64,
    pub kv_cache_bytes_after: u64,
    pub actual_kv_cache_ratio: f64,
    /// FLOPs per token at `flops_seq_len`, dense and kept, and the removed fraction.
    pub flops_before: u64,
    pub flops_after: u64,
    pub actual_flops_ratio: f64,
    pub flops_seq_len: u64,
    /// Least KV-cache bytes / FLOPs per token to remove (`target_count` of their ratios).
    pub target_kv_cache_removed: Option<u64>,
    pub target_flops_removed: Option<u64>,
    /// A certified lower bound on the optimal objective (`dp`), NaN when there is none.
    pub lower_bound: f64,
    /// `dp` proved `objective` optimal (`lower_bound == objective`).
    pub proven_optimal: bool,
}

impl Problem<'_, '_> {
    /// Turn one option index per item into the result (objective, binding, ratios).
    pub fn finish(
        &self,
        choice: &[usize],
        solver: Solver,
        extra_binding: &[&str],
        notes: Vec<String>,
        granule: u64,
    ) -> Allocation {
        let spec = self.spec;
        let mut g: Vec<u64> = spec.layers.iter().map(|s| s.num_kv_heads).collect();
        let mut f: Vec<u64> = spec.layers.iter().map(|s| s.intermediate).collect();
        for (it, &c) in self.items.iter().zip(choice) {
            let o = it.options[c];
            match it.kind {
                ItemKind::Attn => g[it.layer] = o.g,
                ItemKind::Mlp => f[it.layer] = o.f,
                ItemKind::Tied => {
                    g[it.layer] = o.g;
                    f[it.layer] = o.f;
                }
            }
        }
        self.finish_gf(&g, &f, solver, extra_binding, notes, granule)
    }

    pub fn finish_gf(
        &self,
        g: &[u64],
        f: &[u64],
        solver: Solver,
        extra_binding: &[&str],
        notes: Vec<String>,
        granule: u64,
    ) -> Allocation {
        let spec = self.spec;
        let n = spec.layers.len();
        let mut layers = Vec::with_capacity(n);
        let mut objective = 0.0;
        let mut kept_layers = 0u64;
        let mut binding: Vec<String> = Vec::new();
        let add = |b: &mut Vec<String>, s: &str| {
            if !b.iter().any(|x| x == s) {
                b.push(s.to_string());
            }
        };
        if !spec.protected.is_empty() {
            add(&mut binding, "protected");
        }
        if spec.attn_layer_start.unwrap_or(0) > 0 || spec.attn_layer_end.unwrap_or(n) < n {
            add(&mut binding, "attn_layer_range");
        }
        if spec.mlp_layer_start.unwrap_or(0) > 0 || spec.mlp_layer_end.unwrap_or(n) < n {
            add(&mut binding, "mlp_layer_range");
        }
        for l in 0..n {
            let s = spec.layers[l];
            let b = &self.bounds[l];
            let pk = s.layer_params(g[l], f[l]);
            kept_layers += pk;
            objective += attn_loss(spec, l, g[l]) + mlp_loss(spec, l, f[l]);
            // a bound the solution sits on is binding, named by the constraint that set it
            let at_bounds = [
                (self.attn_prunable[l] && g[l] == b.g_lo, b.g_lo_src),
                (self.attn_prunable[l] && g[l] == b.g_hi, b.g_hi_src),
                (self.mlp_prunable[l] && f[l] == b.f_lo, b.f_lo_src),
                (self.mlp_prunable[l] && f[l] == b.f_hi, b.f_hi_src),
            ];
            for src in at_bounds
                .into_iter()
                .filter_map(|(hit, src)| src.filter(|_| hit))
            {
                add(&mut binding, src);
            }
            layers.push(LayerAllocation {
                kv_groups_kept: g[l],
                q_heads_kept: g[l] * s.group_ratio(),
                mlp_kept: f[l],
                attn_rate: 1.0 - g[l] as f64 / s.num_kv_heads as f64,
                mlp_rate: 1.0 - f[l] as f64 / s.intermediate as f64,
                params_kept: pk,
            });
        }
        if spec.tie && self.items.iter().any(|it| it.kind == ItemKind::Tied) {
            add(&mut binding, "tie");
        }
        for b in extra_binding {
            add(&mut binding, b);
        }
        let kv_after: u64 = (0..n)
            .map(|l| spec.layers[l].kv_cache_bytes(g[l], spec.kv_cache_dtype_bytes))
            .sum();
        let flops_after: u64 = spec.extra_flops
            + (0..n)
                .map(|l| spec.layers[l].layer_flops(g[l], f[l], spec.flops_seq_len))
                .sum::<u64>();
        // a KV-cache / FLOPs bound binds when keeping one more KV group or MLP step in some layer
        // (within its bounds) would break it
        for b in &self.secondary {
            let removed = b.total
                - if b.res == Resource::KvCache {
                    kv_after
                } else {
                    flops_after
                };
            let slack = removed - b.target.min(removed);
            let undo = (0..n)
                .map(|l| {
                    let s = &spec.layers[l];
                    let bl = &self.bounds[l];
                    let group = if self.attn_prunable[l] && g[l] < bl.g_hi {
                        match b.res {
                            Resource::KvCache => s.kv_cache_bytes(1, spec.kv_cache_dtype_bytes),
                            Resource::Flops => s.group_flops(spec.flops_seq_len),
                        }
                    } else {
                        0
                    };
                    let channels =
                        if self.mlp_prunable[l] && f[l] < bl.f_hi && b.res == Resource::Flops {
                            spec.mlp_step.min(bl.f_hi - f[l]) * s.channel_flops()
                        } else {
                            0
                        };
                    group.max(channels)
                })
                .max()
                .unwrap_or(0);
            if removed >= b.target && slack < undo {
                add(&mut binding, b.res.field());
            }
        }
        let frac = |before: u64, after: u64| {
            if before == 0 {
                0.0
            } else {
                (before - after) as f64 / before as f64
            }
        };
        let after = kept_layers + spec.extra_params;
        let target_of = |res: Resource| {
            self.secondary
                .iter()
                .find(|b| b.res == res)
                .map(|b| b.target)
        };
        Allocation {
            layers,
            params_before: self.total,
            params_after: after,
            actual_ratio: (self.total - after) as f64 / self.total as f64,
            actual_ratio_layers: (self.layers_total - kept_layers) as f64
                / self.layers_total as f64,
            objective,
            solver: solver.name(),
            solve_seconds: 0.0,
            binding,
            target_removed: if self.param_budget { self.target } else { 0 },
            granule: if self.param_budget { granule } else { 0 },
            notes,
            param_budget: self.param_budget,
            kv_cache_bytes_before: self.kv_total,
            kv_cache_bytes_after: kv_after,
            actual_kv_cache_ratio: frac(self.kv_total, kv_after),
            flops_before: self.flops_total,
            flops_after,
            actual_flops_ratio: frac(self.flops_total, flops_after),
            flops_seq_len: spec.flops_seq_len,
            target_kv_cache_removed: target_of(Resource::KvCache),
            target_flops_removed: target_of(Resource::Flops),
            lower_bound: f64::NAN,
            proven_optimal: false,
        }
    }
}
