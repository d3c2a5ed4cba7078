"""Type stubs for the compiled module `layerprune._core` (kept honest by mypy.stubtest in tests)."""

import numpy as np
import numpy.typing as npt

__version__: str

# --- allocation (issue 3): owned by rust/src/python/alloc.rs ---

def allocate(
    shapes: npt.NDArray[np.int64],
    ratio: float | None,
    solver: str = "dp",
    *,
    kv_cache_ratio: float | None = None,
    flops_ratio: float | None = None,
    flops_seq_len: int = 2048,
    kv_cache_dtype_bytes: int = 2,
    extra_flops: int = 0,
    dp_method: str = "auto",
    extra_params: int = 0,
    attn_importance: npt.NDArray[np.float64] | None = None,
    mlp_importance: npt.NDArray[np.float64] | None = None,
    attn_curves: list[npt.NDArray[np.float64]] | None = None,
    mlp_curves: list[npt.NDArray[np.float64]] | None = None,
    mlp_step: int = 1,
    min_kv_groups: int = 1,
    min_mlp: int | None = None,
    protected: list[int] = ...,
    min_attn_rate: float = 0.0,
    max_attn_rate: float = 1.0,
    min_mlp_rate: float = 0.0,
    max_mlp_rate: float = 1.0,
    tie: bool = False,
    attn_layer_start: int | None = None,
    attn_layer_end: int | None = None,
    mlp_layer_start: int | None = None,
    mlp_layer_end: int | None = None,
    min_effective_rate: float = 0.0,
    layer_rate: float | None = None,
    log_transform: bool = False,
    alpha: float = 1.0,
) -> dict[str, object]:
    """Solve an allocation problem; `shapes` is (L, 10) int64: hidden, num_q_heads, num_kv_heads,
    head_dim, intermediate, qkv_bias, o_bias, mlp_bias, qk_norm, norm_params (flags 0/1:
    qkv_bias = q/k/v projections have biases, o_bias = o_proj has a bias, qk_norm = q_norm and
    k_norm weights of head_dim each, counted but never pruned). Budgets: ``ratio`` (parameters),
    ``kv_cache_ratio``, ``flops_ratio`` (lower bounds), any subset but not none. Returns numpy arrays
    per layer (kv_groups_kept, q_heads_kept, mlp_kept, params_kept, attn_rate, mlp_rate) and scalars."""
    ...

# --- scoring (issue 4): owned by rust/src/python/scoring.rs ---

def weight_scores(
    weight: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    grad: npt.NDArray[np.float32] | npt.NDArray[np.uint16] | None = None,
    fisher: npt.NDArray[np.float32] | npt.NDArray[np.uint16] | None = None,
    *,
    kind: str = "taylor",
    axis: int = 0,
    group_size: int = 1,
    dtype: str = "float32",
) -> npt.NDArray[np.float32]:
    """Fused one-pass score of a C-contiguous 2-D weight per row (axis=0) or column (axis=1),
    summed over groups of `group_size`. bfloat16 / float16 arrive as uint16 bits (`dtype` says which)."""

def channel_sums(
    x: npt.NDArray[np.float32] | npt.NDArray[np.uint16], *, dtype: str = "float32"
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Per-channel (column) float32 sum and sum of squares of a tokens × channels array."""

def scoring_threads() -> int:
    """Threads used by the Rust scoring kernels (rayon global pool)."""
