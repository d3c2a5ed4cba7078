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

from collections.abc import Sequence
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

    def covariance(self) -> torch.Tensor:
        """``H/n − μμᵀ`` (the second moment of the centred inputs)."""
        mean = self.mean
        return self.gram / max(self.count, 1) - torch.outer(mean, mean)


def _kept_index(kept: Sequence[int] | torch.Tensor, features: int) -> torch.Tensor:
    index = torch.as_tensor(list(kept) if not isinstance(kept, torch.Tensor) else kept, dtype=torch.long)
    if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= features:
        raise InvalidInputError(f"kept: column indices must be in 0..{features - 1} and not empty")
    return index


def damped_cholesky(a: torch.Tensor, damping: float, who: str = "refit", divisor: float | None = None,
                    overwrite: bool = False) -> torch.Tensor:
    """The Cholesky factor of ``m + λI`` for symmetric ``m = a / divisor`` (``a`` without a divisor),
    ``λ = damping · mean diag m``; the damping grows tenfold until it factors (the one damping rule of the refit
    and of structured OBS). Holds one copy of ``a`` besides the factor (none with ``overwrite``: ``a`` itself is
    divided and damped): the damping goes onto its diagonal."""
    if overwrite:
        m = a.div_(divisor) if divisor is not None else a
    else:
        m = a / divisor if divisor is not None else a.clone()
    return _damped_factor(m, damping, who)[0]


def damping_added(a: torch.Tensor, damping: float, divisor: float | None = None) -> float:
    """The ``λ`` :func:`damped_cholesky` adds to ``a / divisor`` (``damping`` times the mean diagonal, grown tenfold
    until the matrix factors)."""
    return _damped_factor(a / divisor if divisor is not None else a.clone(), damping, "damping")[1]


def _damped_factor(m: torch.Tensor, damping: float, who: str) -> tuple[torch.Tensor, float]:
    """Cholesky factor of ``m + λI`` and ``λ``; ``m``'s diagonal is overwritten with the damped one."""
    diag = torch.diagonal(m)
    plain = diag.clone()
    scale = float(plain.mean()) if plain.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    lam = damping * scale
    for _ in range(8):
        diag.copy_(plain + lam)
        factor, info = torch.linalg.cholesky_ex(m)
        if int(info) == 0:
            return factor, lam
        lam = max(lam * 10.0, 1e-8 * scale)
    raise NumericalError(f"{who}: the calibration Gram matrix is not positive definite even with damping")


def _solve_damped(a: torch.Tensor, rhs: torch.Tensor, damping: float, overwrite: bool = False) -> torch.Tensor:
    """``rhs (a + λI)⁻¹`` for symmetric ``a`` (:func:`damped_cholesky`; ``overwrite``: ``a`` is the factor's
    scratch)."""
    return torch.cholesky_solve(rhs.T, damped_cholesky(a, damping, overwrite=overwrite)).T


def _gram_block(gram: torch.Tensor, s: torch.Tensor, divisor: float) -> torch.Tensor:
    """``gram[s][:, s] / divisor``, ``COLUMN_BLOCK`` rows of ``s`` at a time (no ``[|s|, |s|]`` index arrays)."""
    out = torch.empty(s.numel(), s.numel(), dtype=gram.dtype, device=gram.device)
    for b in range(0, s.numel(), COLUMN_BLOCK):
        out[b:b + COLUMN_BLOCK] = gram.index_select(0, s[b:b + COLUMN_BLOCK]).index_select(1, s) / divisor
    return out


COLUMN_BLOCK = 1024  # columns of a Gram slice taken at a time (a [in, |S|] slice of an 8192-wide MLP is 384 MiB)


def _times_gram_columns(w: torch.Tensor, gram: torch.Tensor, s: torch.Tensor, divisor: float) -> torch.Tensor:
    """``w (gram[:, s] / divisor)``, ``COLUMN_BLOCK`` columns of ``s`` at a time."""
    return torch.cat([w @ (gram[:, s[b:b + COLUMN_BLOCK]] / divisor) for b in range(0, s.numel(), COLUMN_BLOCK)],
                     dim=1)


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
    w = weight.detach().to(stats.gram.device, torch.float64)
    if affine:
        second = stats.covariance()
        new_w = _solve_damped(second[s][:, s], w @ second[:, s], damping)
    else:  # never a whole copy of the Gram: its kept block, and its kept columns in blocks
        rhs = _times_gram_columns(w, stats.gram, s, stats.count)
        new_w = _solve_damped(_gram_block(stats.gram, s, stats.count), rhs, damping, overwrite=True)
    if not affine:
        return new_w.to(weight.dtype).to(weight.device), bias
    mean = stats.mean
    base = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.detach().to(w)
    new_b = base + w @ mean - new_w @ mean[s]
    return new_w.to(weight.dtype).to(weight.device), new_b.to(weight.dtype).to(weight.device)


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
    new_w = _solve_damped(h[s][:, s], w @ h[:, s], damping)
    full = torch.einsum("ij,jk,ik->", w, h, w)
    kept_part = torch.einsum("ij,jk,ik->", new_w, h[s][:, s], new_w)
    cross = torch.einsum("ij,jk,ik->", w, h[:, s], new_w)
    return float(full - 2 * cross + kept_part)


__all__ = ["DEFAULT_DAMPING", "InputGram", "damping_added", "compensation_bias", "reconstruction_error", "refit_output_projection",
           "add_symmetric_gram_"]
