//! The allocation problem as given: layer shapes, budgets, objective and constraints
//! ([`Spec`]), which solver runs it ([`Solver`]), and the checks every field goes through.

use crate::error::{invalid, Error, Result};

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
    /// q_norm and k_norm span the whole projections (OLMo-2: `num_q_heads * head_dim` and
    /// `num_kv_heads * head_dim` weights), so a KV group takes `(r + 1) * head_dim` of them with it.
    pub group_norm: bool,
    pub mlp_bias: bool,
    /// Norm parameters of the layer (never pruned), e.g. `2 * hidden` for two RMSNorms.
    pub norm_params: u64,
}

impl LayerShape {
    pub fn group_ratio(&self) -> u64 {
        self.num_q_heads / self.num_kv_heads
    }
    /// Parameters removed per pruned KV group (q, k, v rows, o_proj columns, q/k/v biases, and the
    /// group's slice of whole-projection q/k norms).
    pub fn group_cost(&self) -> u64 {
        let r = self.group_ratio();
        let w = self.hidden * self.head_dim * (2 * r + 2);
        w + if self.qkv_bias {
            self.head_dim * (r + 2)
        } else {
            0
        } + if self.group_norm {
            self.head_dim * (r + 1)
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
    pub fn parse(name: &str) -> Result<DpMethod> {
        Ok(match name {
            "auto" => DpMethod::Auto,
            "second-dimension" => DpMethod::SecondDimension,
            "lagrangian" => DpMethod::Lagrangian,
            other => {
                return Err(Error::InvalidInput(format!(
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
    pub fn parse(name: &str) -> Result<Solver> {
        Ok(match name {
            "uniform" => Solver::Uniform,
            "seed" => Solver::Seed,
            "greedy" => Solver::Greedy,
            "lagrange" => Solver::Lagrange,
            "dp" => Solver::Dp,
            "homogeneous" => Solver::Homogeneous,
            other => {
                return Err(Error::InvalidInput(format!(
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

fn check_rate(name: &str, v: f64) -> Result<()> {
    if !v.is_finite() || !(0.0..=1.0).contains(&v) {
        return invalid(format!("{name}: must be a number in [0, 1], got {v}"));
    }
    Ok(())
}

/// Curve index of `f` kept channels.
pub(crate) fn mlp_index(f: u64, i: u64, step: u64) -> usize {
    if f >= i {
        i.div_ceil(step) as usize
    } else {
        (f / step) as usize
    }
}

/// Objective of layer `l`'s attention keeping `g` KV groups.
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

/// Objective of layer `l`'s MLP keeping `f` channels.
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

impl Spec<'_> {
    /// Layers `[start, end)` whose attention may be pruned (all of them unless a range is set).
    pub(crate) fn attn_range(&self) -> (usize, usize) {
        let n = self.layers.len();
        (
            self.attn_layer_start.unwrap_or(0),
            self.attn_layer_end.unwrap_or(n),
        )
    }

    /// Layers `[start, end)` whose MLP may be pruned (all of them unless a range is set).
    pub(crate) fn mlp_range(&self) -> (usize, usize) {
        let n = self.layers.len();
        (
            self.mlp_layer_start.unwrap_or(0),
            self.mlp_layer_end.unwrap_or(n),
        )
    }

    /// Check every field for `solver`, in a fixed order (the first failure is reported).
    /// `min_kv_groups` and `min_mlp` against each layer's width are checked by `build_problem`,
    /// layer by layer, in turn with the layer's feasibility.
    pub(crate) fn validate(&self, solver: Solver) -> Result<()> {
        let spec = self;
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
        let range = |name: &str, start: Option<usize>, end: Option<usize>| -> Result<()> {
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
            Ok(())
        };
        range("attn", spec.attn_layer_start, spec.attn_layer_end)?;
        range("mlp", spec.mlp_layer_start, spec.mlp_layer_end)?;
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
                            return invalid(format!(
                                "{name}_curves[{l}][{j}]: not finite ({})",
                                c[j]
                            ));
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
        Ok(())
    }
}
