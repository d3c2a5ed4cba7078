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
//! combination no allocation meets, is an [`AllocError::Infeasible`] naming the constraints
//! and the budgets that bind.
//!
//! Objective (minimised, additive over layers): per-layer cost curves, or with only importance
//! the convex surrogate `loss_l(k) = importance_l * (1 - k)^2` where `k` is the kept fraction of
//! the component (KV groups or MLP channels).

use std::fmt;

mod bounds;
mod dp;
mod greedy;
mod homogeneous;
mod lagrange;
mod seed;
mod uniform;

#[cfg(test)]
mod tests;

pub use dp::solve_dp;
pub use greedy::solve_greedy;
pub use homogeneous::solve_homogeneous;
pub use lagrange::solve_lagrange;
pub use seed::solve_seed;
pub use uniform::solve_uniform;

/// Shape of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    pub hidden: u64,
    pub num_q_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub intermediate: u64,
    /// q_proj, k_proj and v_proj have biases (pruned with their rows).
    pub qkv_bias: bool,
    /// o_proj has a bias (`hidden` params, never pruned).
    pub o_bias: bool,
    /// The layer has q_norm and k_norm weights of `head_dim` each (shared across heads:
    /// `2 * head_dim` params, never pruned).
    pub qk_norm: bool,
    pub mlp_bias: bool,
    /// Norm parameters of the layer (never pruned), e.g. `2 * hidden` for two RMSNorms.
    pub norm_params: u64,
}

impl LayerShape {
    pub fn group_ratio(&self) -> u64 {
        self.num_q_heads / self.num_kv_heads
    }
    /// Parameters removed per pruned KV group (q, k, v rows, o_proj columns, q/k/v biases).
    pub fn group_cost(&self) -> u64 {
        let r = self.group_ratio();
        let w = self.hidden * self.head_dim * (2 * r + 2);
        w + if self.qkv_bias {
            self.head_dim * (r + 2)
        } else {
            0
        }
    }
    /// Parameters removed per pruned MLP channel (gate/up rows, down column, gate/up biases).
    pub fn channel_cost(&self) -> u64 {
        3 * self.hidden + if self.mlp_bias { 2 } else { 0 }
    }
    pub fn attn_params(&self, g: u64) -> u64 {
        g * self.group_cost()
            + if self.o_bias { self.hidden } else { 0 }
            + if self.qk_norm { 2 * self.head_dim } else { 0 }
    }
    pub fn mlp_params(&self, f: u64) -> u64 {
        f * self.channel_cost() + if self.mlp_bias { self.hidden } else { 0 }
    }
    pub fn layer_params(&self, g: u64, f: u64) -> u64 {
        self.attn_params(g) + self.mlp_params(f) + self.norm_params
    }
    pub fn full_params(&self) -> u64 {
        self.layer_params(self.num_kv_heads, self.intermediate)
    }
    /// KV-cache bytes per token of the layer keeping `g` KV groups: `2 * g * head_dim * dtype_bytes`.
    pub fn kv_cache_bytes(&self, g: u64, dtype_bytes: u64) -> u64 {
        2 * g * self.head_dim * dtype_bytes
    }
    /// FLOPs per token removed with one KV group at context `seq_len`:
    /// `2*d*hd*(2r + 2) + 4*r*hd*seq_len` (projections, then Q.K^T and A.V).
    pub fn group_flops(&self, seq_len: u64) -> u64 {
        let r = self.group_ratio();
        2 * self.hidden * self.head_dim * (2 * r + 2) + 4 * r * self.head_dim * seq_len
    }
    /// FLOPs per token removed with one MLP channel: `6*d` (gate, up and down).
    pub fn channel_flops(&self) -> u64 {
        6 * self.hidden
    }
    /// FLOPs per token of the layer keeping `g` KV groups and `f` channels.
    pub fn layer_flops(&self, g: u64, f: u64, seq_len: u64) -> u64 {
        g * self.group_flops(seq_len) + f * self.channel_flops()
    }
}

/// The target count of a budget: `round(ratio * total)`, half away from zero (`f64::round`), so
/// ratio 0.5 of 25 is 13. The one rounding rule of every budget (parameters, KV cache, FLOPs).
pub fn target_count(ratio: f64, total: u64) -> u64 {
    (ratio * total as f64).round() as u64
}

/// Per-token quantities a budget can bound besides parameters (index into `Opt::res`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    KvCache = 0,
    Flops = 1,
}

impl Resource {
    pub const ALL: [Resource; 2] = [Resource::KvCache, Resource::Flops];
    /// The spec field that bounds it.
    pub fn field(&self) -> &'static str {
        match self {
            Resource::KvCache => "kv_cache_ratio",
            Resource::Flops => "flops_ratio",
        }
    }
    /// What is counted, for messages.
    pub fn what(&self) -> &'static str {
        match self {
            Resource::KvCache => "KV-cache bytes per token",
            Resource::Flops => "FLOPs per token",
        }
    }
}

/// How `dp` meets KV-cache / FLOPs bounds (see `bounds.rs`). `Auto` runs the exact second
/// dimension and falls back to the Lagrangian relaxation only when its state space is too large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpMethod {
    Auto,
    SecondDimension,
    Lagrangian,
}

impl DpMethod {
    pub fn parse(name: &str) -> Result<DpMethod, AllocError> {
        Ok(match name {
            "auto" => DpMethod::Auto,
            "second-dimension" => DpMethod::SecondDimension,
            "lagrangian" => DpMethod::Lagrangian,
            other => {
                return Err(AllocError::InvalidInput(format!(
                    "dp_method: unknown method {other:?} (expected auto, second-dimension or lagrangian)"
                )))
            }
        })
    }
}

/// What the solvers minimise.
#[derive(Debug, Clone)]
pub enum Curve<'a> {
    /// Surrogate `weight * (1 - kept_fraction)^2`.
    Importance(f64),
    /// Explicit curve: attention index = KV groups kept (len Hkv+1); MLP index j = kept
    /// `min(j*mlp_step, I)` channels (len ceil(I/mlp_step)+1).
    Values(&'a [f64]),
    /// No objective (only allowed for `uniform` and `homogeneous`): loss 0.
    Zero,
}

/// The allocation problem. Slices borrow caller memory (numpy arrays) without copying.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// Fraction of all parameters to remove (the window `[T, T + granule]`); `None`: no
    /// parameter budget (then `kv_cache_ratio` or `flops_ratio` must be given).
    pub ratio: Option<f64>,
    /// At least this fraction of the KV-cache bytes per token is removed.
    pub kv_cache_ratio: Option<f64>,
    /// At least this fraction of the FLOPs per token (at `flops_seq_len`) is removed.
    pub flops_ratio: Option<f64>,
    /// Positions a token attends to in the FLOPs count.
    pub flops_seq_len: u64,
    /// Bytes of one cached K or V element.
    pub kv_cache_dtype_bytes: u64,
    /// FLOPs per token outside the decoder layers (lm_head: `2 * vocab * hidden`).
    pub extra_flops: u64,
    /// How `dp` meets the KV-cache / FLOPs bounds.
    pub dp_method: DpMethod,
    pub layers: Vec<LayerShape>,
    pub extra_params: u64,
    pub attn_objective: Vec<Curve<'a>>,
    pub mlp_objective: Vec<Curve<'a>>,
    pub mlp_step: u64,
    pub min_kv_groups: u64,
    /// `None` = `mlp_step` (capped at the layer's width).
    pub min_mlp: Option<u64>,
    pub protected: Vec<usize>,
    pub min_attn_rate: f64,
    pub max_attn_rate: f64,
    pub min_mlp_rate: f64,
    pub max_mlp_rate: f64,
    pub tie: bool,
    pub attn_layer_start: Option<usize>,
    pub attn_layer_end: Option<usize>,
    pub mlp_layer_start: Option<usize>,
    pub mlp_layer_end: Option<usize>,
    pub min_effective_rate: f64,
    pub layer_rate: Option<f64>,
    pub log_transform: bool,
    pub alpha: f64,
    /// Raw importance for `seed` (attention, MLP); when absent it is derived from the curves.
    pub seed_importance: Option<(&'a [f64], &'a [f64])>,
}

impl<'a> Spec<'a> {
    /// A spec with default constraints and the importance surrogate objective.
    pub fn with_importance(
        ratio: f64,
        layers: Vec<LayerShape>,
        importance: &[f64],
    ) -> Spec<'static> {
        let n = layers.len();
        let attn = importance.iter().map(|&w| Curve::Importance(w)).collect();
        let mlp = importance.iter().map(|&w| Curve::Importance(w)).collect();
        let mut s = Spec::bare(ratio, layers);
        s.attn_objective = attn;
        s.mlp_objective = mlp;
        debug_assert_eq!(s.attn_objective.len(), n);
        s
    }
    /// A spec with default constraints and no objective (fill `attn_objective`/`mlp_objective`).
    pub fn bare(ratio: f64, layers: Vec<LayerShape>) -> Spec<'static> {
        let n = layers.len();
        Spec {
            ratio: Some(ratio),
            kv_cache_ratio: None,
            flops_ratio: None,
            flops_seq_len: 2048,
            kv_cache_dtype_bytes: 2,
            extra_flops: 0,
            dp_method: DpMethod::Auto,
            layers,
            extra_params: 0,
            attn_objective: vec![Curve::Zero; n],
            mlp_objective: vec![Curve::Zero; n],
            mlp_step: 1,
            min_kv_groups: 1,
            min_mlp: None,
            protected: vec![],
            min_attn_rate: 0.0,
            max_attn_rate: 1.0,
            min_mlp_rate: 0.0,
            max_mlp_rate: 1.0,
            tie: false,
            attn_layer_start: None,
            attn_layer_end: None,
            mlp_layer_start: None,
            mlp_layer_end: None,
            min_effective_rate: 0.0,
            layer_rate: None,
            log_transform: false,
            alpha: 1.0,
            seed_importance: None,
        }
    }
}

/// Which solver to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Solver {
    Uniform,
    Seed,
    Greedy,
    Lagrange,
    Dp,
    Homogeneous,
}

impl Solver {
    pub fn parse(name: &str) -> Result<Solver, AllocError> {
        Ok(match name {
            "uniform" => Solver::Uniform,
            "seed" => Solver::Seed,
            "greedy" => Solver::Greedy,
            "lagrange" => Solver::Lagrange,
            "dp" => Solver::Dp,
            "homogeneous" => Solver::Homogeneous,
            other => {
                return Err(AllocError::InvalidInput(format!(
                    "solver: unknown solver {other:?} (expected one of uniform, seed, greedy, lagrange, dp, homogeneous)"
                )))
            }
        })
    }
    pub fn name(&self) -> &'static str {
        match self {
            Solver::Uniform => "uniform",
            Solver::Seed => "seed",
            Solver::Greedy => "greedy",
            Solver::Lagrange => "lagrange",
            Solver::Dp => "dp",
            Solver::Homogeneous => "homogeneous",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AllocError {
    InvalidInput(String),
    Infeasible(String),
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocError::InvalidInput(m) | AllocError::Infeasible(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for AllocError {}

fn invalid<T>(msg: String) -> Result<T, AllocError> {
    Err(AllocError::InvalidInput(msg))
}

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

// ---------------------------------------------------------------------------------------------
// Validated problem: items with option lists
// ---------------------------------------------------------------------------------------------

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

fn check_rate(name: &str, v: f64) -> Result<(), AllocError> {
    if !v.is_finite() || !(0.0..=1.0).contains(&v) {
        return invalid(format!("{name}: must be a number in [0, 1], got {v}"));
    }
    Ok(())
}

/// Allowed MLP widths of a layer: multiples of `step` below `I`, and `I` itself (ascending).
pub(crate) fn mlp_values(i: u64, step: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..).map(|j| j * step).take_while(|&f| f < i).collect();
    v.push(i);
    v
}

/// Curve index of `f` kept channels.
pub(crate) fn mlp_index(f: u64, i: u64, step: u64) -> usize {
    if f >= i {
        i.div_ceil(step) as usize
    } else {
        (f / step) as usize
    }
}

pub(crate) fn attn_loss(spec: &Spec, l: usize, g: u64) -> f64 {
    let h = spec.layers[l].num_kv_heads;
    match spec.attn_objective[l] {
        Curve::Importance(w) => {
            let x = 1.0 - g as f64 / h as f64;
            w * x * x
        }
        Curve::Values(c) => c[g as usize],
        Curve::Zero => 0.0,
    }
}

pub(crate) fn mlp_loss(spec: &Spec, l: usize, f: u64) -> f64 {
    let i = spec.layers[l].intermediate;
    match spec.mlp_objective[l] {
        Curve::Importance(w) => {
            let x = 1.0 - f as f64 / i as f64;
            w * x * x
        }
        Curve::Values(c) => c[mlp_index(f, i, spec.mlp_step)],
        Curve::Zero => 0.0,
    }
}

const RATE_EPS: f64 = 1e-9;

/// Validate a spec (every field) and build the item lists.
pub(crate) fn build_problem<'s, 'a>(
    spec: &'s Spec<'a>,
    solver: Solver,
) -> Result<Problem<'s, 'a>, AllocError> {
    let n = spec.layers.len();
    if n == 0 {
        return invalid("layers: at least one layer is required".into());
    }
    for (name, v) in [
        ("ratio", spec.ratio),
        ("kv_cache_ratio", spec.kv_cache_ratio),
        ("flops_ratio", spec.flops_ratio),
    ] {
        if let Some(r) = v {
            if !r.is_finite() || !(0.0..1.0).contains(&r) {
                return invalid(format!("{name}: must be in [0, 1), got {r}"));
            }
        }
    }
    if spec.ratio.is_none() && spec.kv_cache_ratio.is_none() && spec.flops_ratio.is_none() {
        return invalid(
            "ratio: no budget given (give ratio, kv_cache_ratio or flops_ratio)".into(),
        );
    }
    if spec.flops_seq_len == 0 {
        return invalid("flops_seq_len: must be at least 1".into());
    }
    if spec.kv_cache_dtype_bytes == 0 {
        return invalid("kv_cache_dtype_bytes: must be at least 1".into());
    }
    for (l, s) in spec.layers.iter().enumerate() {
        for (name, v) in [
            ("hidden", s.hidden),
            ("num_q_heads", s.num_q_heads),
            ("num_kv_heads", s.num_kv_heads),
            ("head_dim", s.head_dim),
            ("intermediate", s.intermediate),
        ] {
            if v == 0 {
                return invalid(format!("layers[{l}].{name}: must be positive, got 0"));
            }
        }
        if s.num_q_heads % s.num_kv_heads != 0 {
            return invalid(format!(
                "layers[{l}].num_q_heads: {} is not a multiple of num_kv_heads {}",
                s.num_q_heads, s.num_kv_heads
            ));
        }
        if s.hidden
            .checked_mul(s.head_dim)
            .and_then(|x| x.checked_mul(s.num_q_heads * 4))
            .is_none()
            || s.hidden.checked_mul(s.intermediate * 4).is_none()
        {
            return invalid(format!("layers[{l}]: shape too large"));
        }
    }
    if spec.mlp_step == 0 {
        return invalid("mlp_step: must be at least 1".into());
    }
    for (name, v) in [
        ("min_attn_rate", spec.min_attn_rate),
        ("max_attn_rate", spec.max_attn_rate),
        ("min_mlp_rate", spec.min_mlp_rate),
        ("max_mlp_rate", spec.max_mlp_rate),
    ] {
        check_rate(name, v)?;
    }
    if spec.min_attn_rate > spec.max_attn_rate {
        return invalid(format!(
            "min_attn_rate: {} is above max_attn_rate {}",
            spec.min_attn_rate, spec.max_attn_rate
        ));
    }
    if spec.min_mlp_rate > spec.max_mlp_rate {
        return invalid(format!(
            "min_mlp_rate: {} is above max_mlp_rate {}",
            spec.min_mlp_rate, spec.max_mlp_rate
        ));
    }
    if !spec.min_effective_rate.is_finite() || !(0.0..1.0).contains(&spec.min_effective_rate) {
        return invalid(format!(
            "min_effective_rate: must be in [0, 1), got {}",
            spec.min_effective_rate
        ));
    }
    if !spec.alpha.is_finite() || spec.alpha <= 0.0 {
        return invalid(format!(
            "alpha: must be a positive number, got {}",
            spec.alpha
        ));
    }
    if let Some(r) = spec.layer_rate {
        if !r.is_finite() || !(0.0..1.0).contains(&r) {
            return invalid(format!("layer_rate: must be in [0, 1), got {r}"));
        }
    }
    for &p in &spec.protected {
        if p >= n {
            return invalid(format!(
                "protected: layer {p} out of range (model has {n} layers)"
            ));
        }
    }
    let range = |name: &str,
                 start: Option<usize>,
                 end: Option<usize>|
     -> Result<(usize, usize), AllocError> {
        let s = start.unwrap_or(0);
        let e = end.unwrap_or(n);
        if e > n {
            return invalid(format!("{name}_layer_end: {e} is beyond the {n} layers"));
        }
        if s > e {
            return invalid(format!(
                "{name}_layer_start: {s} is after {name}_layer_end {e}"
            ));
        }
        Ok((s, e))
    };
    let (as_, ae) = range("attn", spec.attn_layer_start, spec.attn_layer_end)?;
    let (ms, me) = range("mlp", spec.mlp_layer_start, spec.mlp_layer_end)?;
    if spec.attn_objective.len() != n || spec.mlp_objective.len() != n {
        return invalid(format!(
            "importance: expected one value per layer ({n}), got {} (attention) and {} (MLP)",
            spec.attn_objective.len(),
            spec.mlp_objective.len()
        ));
    }
    for l in 0..n {
        let s = &spec.layers[l];
        for (name, obj, want) in [
            ("attn", &spec.attn_objective[l], s.num_kv_heads as usize + 1),
            (
                "mlp",
                &spec.mlp_objective[l],
                s.intermediate.div_ceil(spec.mlp_step) as usize + 1,
            ),
        ] {
            match obj {
                Curve::Importance(w) => {
                    if !w.is_finite() || *w < 0.0 {
                        return invalid(format!(
                            "{name}_importance[{l}]: must be finite and non-negative, got {w}"
                        ));
                    }
                }
                Curve::Values(c) => {
                    if c.len() != want {
                        return invalid(format!(
                            "{name}_curves[{l}]: expected length {want}, got {}",
                            c.len()
                        ));
                    }
                    if let Some(j) = c.iter().position(|v| !v.is_finite()) {
                        return invalid(format!("{name}_curves[{l}][{j}]: not finite ({})", c[j]));
                    }
                }
                Curve::Zero => {
                    if !matches!(solver, Solver::Uniform | Solver::Homogeneous) {
                        return invalid(format!(
                            "importance: solver {} needs an objective (importance, attn_importance/mlp_importance or attn_curves/mlp_curves); layer {l} has none for {name}",
                            solver.name()
                        ));
                    }
                }
            }
        }
    }
    if let Some((a, m)) = &spec.seed_importance {
        for (name, v) in [("attn_importance", a), ("mlp_importance", m)] {
            if v.len() != n {
                return invalid(format!("{name}: expected {n} values, got {}", v.len()));
            }
            if let Some(j) = v.iter().position(|x| !x.is_finite() || *x < 0.0) {
                return invalid(format!(
                    "{name}[{j}]: must be finite and non-negative, got {}",
                    v[j]
                ));
            }
        }
    }

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
                return Err(AllocError::Infeasible(format!(
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
                return Err(AllocError::Infeasible(format!(
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
                return Err(AllocError::Infeasible(format!(
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
    pub fn check_budget(&self) -> Result<(), AllocError> {
        let spec = self.spec;
        if self.param_budget && self.target > self.max_removed {
            let mut why = self.capping_constraints(false);
            why.push(format!(
                "never-pruned parameters ({} outside decoder layers, norms and biases)",
                fmt_params(spec.extra_params)
            ));
            return Err(AllocError::Infeasible(format!(
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
            return Err(AllocError::Infeasible(format!(
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
                return Err(AllocError::Infeasible(format!(
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

    pub fn removed_of(&self, choice: &[usize]) -> u64 {
        self.items
            .iter()
            .zip(choice)
            .map(|(it, &c)| it.options[c].removed)
            .sum()
    }
}

/// Solve `spec` with `solver`.
pub fn allocate(spec: &Spec, solver: Solver) -> Result<Allocation, AllocError> {
    let t0 = std::time::Instant::now();
    let mut out = match solver {
        Solver::Uniform => solve_uniform(spec)?,
        Solver::Seed => solve_seed(spec)?,
        Solver::Greedy => solve_greedy(spec)?,
        Solver::Lagrange => solve_lagrange(spec)?,
        Solver::Dp => solve_dp(spec)?,
        Solver::Homogeneous => solve_homogeneous(spec)?,
    };
    out.solve_seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}
