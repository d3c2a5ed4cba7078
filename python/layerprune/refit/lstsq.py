"""Refit of an output projection's kept input columns by least squares (the OBS update of SlimGPT / Týr).

A projection ``y = W x`` (``W``: ``[out, in]``) loses its input columns ``R`` (removed heads or MLP channels)
and keeps ``S``. Over the calibration inputs ``X`` (``[n, in]``, Gram matrix ``H = XᵀX``) the kept weights
that best reproduce the dense outputs minimise ``‖X Wᵀ − X_S W_Sᵀ‖²``:

    W_S' = W H[:, S] (H[S, S] + λ I)⁻¹        λ = damping · mean(diag H[S, S])

With a bias (``affine=True``) the same problem is solved on centred inputs, ``C = H/n − μμᵀ``, and the bias
absorbs the mean: ``W_S' = W C[:, S] (C[S, S] + λ I)⁻¹``, ``b' = b + W μ − W_S' μ_S``. FLAP's bias compensation
alone (``W_S`` unchanged) is ``b' = b + W[:, R] μ_R`` (:func:`compensation_bias`).

The damping keeps ``H[S, S]`` invertible when calibration is short (SparseGPT's 1% of the mean diagonal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from layerprune import distributed
from layerprune.errors import InternalError, InvalidInputError, NumericalError

DEFAULT_DAMPING = 0.01


GRAM_BLOCK = 256


def add_symmetric_gram_(out: torch.Tensor, rows: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``out += rowsᵀ rows`` from its upper block triangle only (the lower blocks are mirrored): about ``(k+1)/2k``
    of the full product's work for ``k`` column blocks of ``block`` columns. Added a strip at a time, computed
    where ``rows`` are and added where ``out`` is: never a whole product beside ``out``."""
    features = rows.shape[1]
    for start in range(0, features, block):
        end = min(start + block, features)
        strip = (rows[:, start:end].T @ rows[:, start:]).to(out.device)
        out[start:end, start:] += strip
        out[end:, start:end] += strip[:, end - start:].T
    return out


@dataclass
class InputGram:
    """Running ``H = Σ xᵀx``, ``Σ x`` and the row count of a projection's inputs, in float64. With ``columns``
    the Gram is that of those input columns only (``H[C, C]``; ``Σ x`` stays whole): what FLAP's bias
    compensation and its errors need, the removed columns' second moments."""

    gram: torch.Tensor
    total: torch.Tensor
    count: int = 0
    columns: torch.Tensor | None = None

    @classmethod
    def empty(cls, features: int, device: torch.device | str = "cpu",
              columns: Sequence[int] | None = None) -> "InputGram":
        index = None if columns is None else torch.as_tensor(list(columns), dtype=torch.long, device=device)
        size = features if index is None else index.numel()
        return cls(torch.zeros(size, size, dtype=torch.float64, device=device),
                   torch.zeros(features, dtype=torch.float64, device=device), columns=index)

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (``[..., features]``): one matmul per micro-batch in float32 (float64 inputs
        in float64), summed in float64. The product is computed where ``x`` is and added where the Gram is."""
        rows = x.detach().reshape(-1, x.shape[-1])
        rows = rows.to(torch.float64) if rows.dtype == torch.float64 else rows.float()
        add_symmetric_gram_(self.gram, rows if self.columns is None else rows[:, self.columns.to(rows.device)])
        # in the rows' dtype (a float64 reduction of float32 rows is 10× slower)
        self.total += rows.sum(0).to(self.total.device)
        self.count += rows.shape[0]

    def whole(self, who: str) -> "InputGram":
        """Itself, when its Gram covers every input column (what a refit solves with)."""
        if self.columns is not None:
            raise InternalError(f"{who}: needs the Gram of every input column, this one covers {self.columns.numel()}")
        return self

    @staticmethod
    def all_reduce(grams: Sequence[InputGram]) -> None:
        """Sum ``H``, ``Σ x`` and the row counts of ``grams`` (the same list, in the same order, on every rank)
        over the data-parallel ranks, each of which collected its own samples; nothing in one process."""
        if distributed.active() is None:
            return
        counts = torch.tensor([float(g.count) for g in grams], dtype=torch.float64)
        distributed.all_reduce_sum_([t for g in grams for t in (g.gram, g.total)] + [counts])
        for g, n in zip(grams, counts.tolist()):
            g.count = int(n)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def _kept_index(kept: Sequence[int] | torch.Tensor, features: int) -> torch.Tensor:
    index = torch.as_tensor(list(kept) if not isinstance(kept, torch.Tensor) else kept, dtype=torch.long)
    if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= features:
        raise InvalidInputError(f"kept: column indices must be in 0..{features - 1} and not empty")
    return index


def factor_in_place_(m: torch.Tensor) -> bool:
    """``m ← L``, the lower Cholesky factor of the symmetric ``m`` (upper triangle zeroed), in ``m``'s own memory:
    ``m``'s transpose is the column-major matrix LAPACK factors in place, so no second matrix is made. False
    (``m`` overwritten with a partial factor) where ``m`` is not positive definite."""
    view = m.T
    info = torch.empty((), dtype=torch.int32, device=m.device)
    torch.linalg.cholesky_ex(view, upper=True, out=(view, info))
    return int(info) == 0


def damped_cholesky_(m: torch.Tensor, damping: float, who: str,
                     refill: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, float]:
    """``m ← L`` with ``L Lᵀ = m + λI``, ``λ = damping · mean diag m``, in place; the damping grows tenfold until
    it factors (the one damping rule of the refit and of structured OBS). ``refill(m)`` writes the undamped matrix
    into ``m`` again after a failed try. Returns ``(m, λ)``."""
    diag = torch.diagonal(m)
    plain = diag.clone()
    scale = float(plain.mean()) if plain.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    lam = damping * scale
    for attempt in range(8):
        if attempt:
            refill(m)
        diag.copy_(plain + lam)
        if factor_in_place_(m):
            return m, lam
        lam = max(lam * 10.0, 1e-8 * scale)
    raise NumericalError(f"{who}: the calibration Gram matrix is not positive definite even with damping")


def _copy_of(a: torch.Tensor, divisor: float | None) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
    """A new matrix holding ``a / divisor`` (``a`` without one) and the function that writes it again."""

    def refill(out: torch.Tensor) -> None:
        if divisor is None:
            out.copy_(a)
        else:
            torch.div(a, divisor, out=out)

    m = torch.empty_like(a, memory_format=torch.contiguous_format)
    refill(m)
    return m, refill


def damped_cholesky(a: torch.Tensor, damping: float, who: str = "refit", divisor: float | None = None) -> torch.Tensor:
    """The lower Cholesky factor of ``a / divisor + λI`` (:func:`damped_cholesky_`) in one new matrix; ``a`` is
    left as it was."""
    m, refill = _copy_of(a, divisor)
    return damped_cholesky_(m, damping, who, refill)[0]


def damping_added(a: torch.Tensor, damping: float, divisor: float | None = None) -> float:
    """The ``λ`` :func:`damped_cholesky_` adds to ``a / divisor`` (``damping`` times the mean diagonal, grown tenfold
    until the matrix factors)."""
    m, refill = _copy_of(a, divisor)
    return damped_cholesky_(m, damping, "damping", refill)[1]


def solve_with_factor(rhs: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``rhs (L Lᵀ)⁻¹`` for ``rhs`` ``[rows, n]`` and the lower factor ``L``: two triangular solves from the right,
    which read ``L`` where it is (``torch.cholesky_solve`` makes a column-major copy of it)."""
    y = torch.linalg.solve_triangular(factor.T, rhs, upper=True, left=False)
    return torch.linalg.solve_triangular(factor, y, upper=False, left=False)


def _gram_block(gram: torch.Tensor, s: torch.Tensor, divisor: float, mean: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``gram[s][:, s] / divisor`` (``− mean[s] mean[s]ᵀ`` with ``mean``: the centred second moment), ``COLUMN_BLOCK``
    rows of ``s`` at a time (no ``[|s|, |s|]`` index arrays); written into ``out`` when given."""
    if out is None:
        out = torch.empty(s.numel(), s.numel(), dtype=gram.dtype, device=gram.device)
    kept_mean = None if mean is None else mean[s]
    for b in range(0, s.numel(), COLUMN_BLOCK):
        rows = out[b:b + COLUMN_BLOCK]
        torch.div(gram.index_select(0, s[b:b + COLUMN_BLOCK]).index_select(1, s), divisor, out=rows)
        if kept_mean is not None:
            rows.sub_(torch.outer(kept_mean[b:b + COLUMN_BLOCK], kept_mean))
    return out


ROW_BLOCK_BYTES = 16 * 2**20  # output rows refit at a time: this many bytes of them in float64
COLUMN_BLOCK = 256  # Gram rows gathered at a time into its kept block (a [256, in] slice of an 8192-wide MLP: 16 MiB)


def _times_gram_columns(w: torch.Tensor, gram: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``w H[:, s]``, as ``w H[s_b, :]ᵀ`` for ``COLUMN_BLOCK`` rows ``s_b`` of the symmetric ``H`` at a time."""
    out = torch.empty(w.shape[0], s.numel(), dtype=w.dtype, device=w.device)
    for b in range(0, s.numel(), COLUMN_BLOCK):
        torch.matmul(w, gram.index_select(0, s[b:b + COLUMN_BLOCK]).T, out=out[:, b:b + COLUMN_BLOCK])
    return out


def refit_output_projection(
    weight: torch.Tensor,
    stats: InputGram,
    kept: Sequence[int] | torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    bias: torch.Tensor | None = None,
    affine: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New weights for the kept columns (``[out, |S|]``, weight's dtype) and, with ``affine``, the new bias.

    ``weight`` is the dense ``[out, in]`` matrix; ``stats`` the Gram of its dense inputs. Without ``affine``
    the returned bias is ``bias`` unchanged.
    """
    stats = stats.whole("refit")
    if weight.dim() != 2 or stats.gram.shape != (weight.shape[1], weight.shape[1]):
        raise InvalidInputError(f"refit: weight {tuple(weight.shape)} does not match the Gram {tuple(stats.gram.shape)}")
    if stats.count < 1:
        raise InvalidInputError("refit: no calibration rows were collected")
    s = _kept_index(kept, weight.shape[1]).to(stats.gram.device)
    # never a whole copy of the Gram: its kept block (factored in place); and the output rows, each refit alone
    # with the same factor, ROW_BLOCK_BYTES of them at a time (no [out, in] float64 copies)
    mean = stats.mean if affine else None  # affine: the centred second moment H/n − μμᵀ
    factor, _ = damped_cholesky_(_gram_block(stats.gram, s, stats.count, mean), damping, "refit",
                                 lambda out: _gram_block(stats.gram, s, stats.count, mean, out=out))
    new_w = torch.empty(weight.shape[0], s.numel(), dtype=weight.dtype, device=weight.device)
    new_b = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device) if affine else None
    step = max(1, ROW_BLOCK_BYTES // (8 * weight.shape[1]))
    for r in range(0, weight.shape[0], step):
        w = weight.detach()[r:r + step].to(stats.gram.device, torch.float64)
        rhs = _times_gram_columns(w, stats.gram, s).div_(stats.count)
        if mean is not None:
            rhs.sub_(torch.outer(w @ mean, mean[s]))
        rows = solve_with_factor(rhs, factor)
        new_w[r:r + step] = rows.to(weight.device)
        if new_b is not None:
            base = 0.0 if bias is None else bias.detach()[r:r + step].to(w)
            new_b[r:r + step] = (base + w @ mean - rows @ mean[s]).to(weight.device)
    return new_w, (new_b if affine else bias)


def compensation_bias(
    weight: torch.Tensor, stats: InputGram, kept: Sequence[int] | torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """FLAP's bias compensation: ``b' = b + W[:, R] μ_R`` for the removed columns ``R`` (kept weights unchanged)."""
    s = _kept_index(kept, weight.shape[1])
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[s] = False
    w_removed = weight.detach()[:, removed.to(weight.device)].to(torch.float64).cpu()  # never a whole float64 copy
    out = w_removed @ stats.mean.cpu()[removed]
    if bias is not None:
        out = out + bias.detach().to(torch.float64).cpu()
    return out.to(weight.dtype).to(weight.device)


def reconstruction_error(weight: torch.Tensor, stats: InputGram, kept: Sequence[int] | torch.Tensor,
                         damping: float = DEFAULT_DAMPING) -> float:
    """``‖X Wᵀ − X_S W_S'ᵀ‖² / n`` after the refit: ``tr(W (H − H[:, S] H[S, S]⁻¹ H[S, :]) Wᵀ) / n``."""
    s = _kept_index(kept, weight.shape[1]).to(stats.gram.device)
    w = weight.detach().to(stats.gram.device, torch.float64)
    h = stats.gram / stats.count
    new_w = solve_with_factor(w @ h[:, s], damped_cholesky(h[s][:, s], damping))
    full = torch.einsum("ij,jk,ik->", w, h, w)
    kept_part = torch.einsum("ij,jk,ik->", new_w, h[s][:, s], new_w)
    cross = torch.einsum("ij,jk,ik->", w, h[:, s], new_w)
    return float(full - 2 * cross + kept_part)


__all__ = ["DEFAULT_DAMPING", "InputGram", "add_symmetric_gram_", "compensation_bias", "damped_cholesky",
           "damped_cholesky_", "damping_added", "factor_in_place_", "reconstruction_error", "refit_output_projection",
           "solve_with_factor"]
