"""Drop-in Torch-Pruning importances computed with the layerprune kernels.

`KernelTaylorImportance` and `KernelMagnitudeImportance` subclass Torch-Pruning's GroupTaylorImportance /
GroupMagnitudeImportance and return the SAME group scores as TP 1.6.1 for the same group,
group_reduction and normalizer (TP's own `_reduce` / `_normalize` are reused). Only the
per-layer term changes: for an nn.Linear, TP's

    out channels: (W[idxs] * G[idxs]).abs().sum(1)      in channels: (Wᵀ * Gᵀ).abs().sum(1)[idxs]

is one fused pass over the whole weight (`weight_scores` axis 0 / 1) indexed by `idxs`
(multivariable=True: the signed sum then |.|, kind `vectorize`; magnitude p=1 / 2: `l1` / `l2`).
With `scorer=` (a finished GradientScorer) Taylor terms come from its accumulated row / column
scores, so the gradients need not be kept. Other layer types (conv, batch/layer/group norm)
use the same formulas as TP in plain torch.

`ActivationStatsImportance` scores input channels of linear layers from activation statistics:
`wanda` ‖X_j‖₂·Σ_i|W_ij| (structured Wanda) or `flap` Var(X_j)·‖W[:, j]‖² (FLAP).
"""

from __future__ import annotations

import contextlib

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from layerprune.errors import InvalidInputError
from layerprune.scoring.dispatch import ActivationStats, flap_channel_scores, wanda_channel_scores, weight_scores

_OUT = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_IN = (function.prune_conv_in_channels, function.prune_linear_in_channels)


def _is_plain_linear(layer) -> bool:
    return isinstance(layer, nn.Linear) and not getattr(layer, "transposed", False)


def _conv_line_matrix(t: torch.Tensor, layer, out: bool) -> torch.Tensor:
    """TP's 2-D view of a conv/linear weight whose rows are the pruned channels."""
    transposed = getattr(layer, "transposed", False)
    if out:
        return (t.transpose(1, 0) if transposed else t).flatten(1)
    return (t if transposed else t.transpose(0, 1)).flatten(1)


def _repeat_for_groups(imp: torch.Tensor, layer, prune_fn) -> torch.Tensor:
    groups = getattr(layer, "groups", 1)
    if prune_fn == function.prune_conv_in_channels and groups != layer.in_channels and groups != 1:
        return imp.repeat(groups)
    return imp


class KernelTaylorImportance(tp.importance.GroupTaylorImportance):
    """First-order Taylor |W·G| (multivariable=True: |Σ W·G| per channel), TP-compatible."""

    def __init__(
        self,
        group_reduction: str = "mean",
        normalizer: str = "mean",
        multivariable: bool = False,
        bias: bool = False,
        target_types=(nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.modules.LayerNorm),
        *,
        scorer=None,
        backend: str = "auto",
    ) -> None:
        super().__init__(group_reduction, normalizer, multivariable, bias, list(target_types))
        self.kind = "vectorize" if multivariable else "taylor"
        self.scorer = scorer
        self.backend = backend
        self._names = {}
        if scorer is not None:
            if self.kind not in scorer.kinds:
                raise InvalidInputError(f"scorer: was built without kind {self.kind!r} (kinds={scorer.kinds})")
            self._names = {id(m): n for n, m in scorer.modules.items()}

    def _linear_scores(self, layer: nn.Linear, axis: int) -> torch.Tensor:
        name = self._names.get(id(layer))
        if name is not None:
            return self.scorer.row_scores(name, self.kind) if axis == 0 else self.scorer.col_scores(name, self.kind)
        if layer.weight.grad is None:
            raise InvalidInputError("group: a linear layer has no .grad; run backward first (or pass scorer=)")
        return weight_scores(layer.weight.data, layer.weight.grad.data, kind=self.kind, axis=axis, backend=self.backend)

    def _pair(self, w: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
        return (w * dw).sum(1).abs() if self.multivariable else (w * dw).abs().sum(1)

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            idxs.sort()
            layer, prune_fn, root_idxs = dep.target.module, dep.handler, group[i].root_idxs
            if not isinstance(layer, tuple(self.target_types)):
                continue
            if prune_fn in _OUT or prune_fn in _IN:
                out = prune_fn in _OUT
                if _is_plain_linear(layer):
                    local = self._linear_scores(layer, 0 if out else 1)[idxs]
                else:
                    w = _conv_line_matrix(layer.weight.data, layer, out)
                    dw = _conv_line_matrix(layer.weight.grad.data, layer, out)
                    local = self._pair(w[idxs], dw[idxs]) if out else _repeat_for_groups(self._pair(w, dw), layer, prune_fn)[idxs]
                group_imp.append(local)
                group_idxs.append(root_idxs)
                if out and self.bias and layer.bias is not None:
                    group_imp.append((layer.bias.data[idxs] * layer.bias.grad.data[idxs]).abs())
                    group_idxs.append(root_idxs)
            elif prune_fn in (function.prune_groupnorm_out_channels, function.prune_layernorm_out_channels):
                # TP 1.6.1 scores affine norms through these two handlers only (not batchnorm)
                affine = layer.affine if prune_fn == function.prune_groupnorm_out_channels else layer.elementwise_affine
                if affine:
                    group_imp.append((layer.weight.data[idxs] * layer.weight.grad.data[idxs]).abs())
                    group_idxs.append(root_idxs)
                    if self.bias and layer.bias is not None:
                        group_imp.append((layer.bias.data[idxs] * layer.bias.grad.data[idxs]).abs())
                        group_idxs.append(root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class KernelMagnitudeImportance(tp.importance.GroupMagnitudeImportance):
    """Group Lp magnitude Σ|W|^p per channel (p = 1 or 2 through the kernels), TP-compatible."""

    def __init__(
        self,
        p: int = 2,
        group_reduction: str = "mean",
        normalizer: str = "mean",
        bias: bool = False,
        target_types=(nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm),
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(p, group_reduction, normalizer, bias, list(target_types))
        self.backend = backend

    def _lines(self, w2d: torch.Tensor, axis: int) -> torch.Tensor:
        if self.p in (1, 2):
            return weight_scores(w2d, kind=f"l{self.p}", axis=axis, backend=self.backend)
        return w2d.abs().pow(self.p).sum(1 - axis)

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, prune_fn, root_idxs = dep.layer, dep.pruning_fn, group[i].root_idxs
            if not isinstance(layer, tuple(self.target_types)):
                continue
            if prune_fn in _OUT:
                if _is_plain_linear(layer):
                    local = self._lines(layer.weight.data, 0)[idxs]
                else:
                    local = self._lines(_conv_line_matrix(layer.weight.data, layer, True)[idxs].contiguous(), 0)
                group_imp.append(local)
                group_idxs.append(root_idxs)
                if self.bias and layer.bias is not None:
                    group_imp.append(layer.bias.data[idxs].abs().pow(self.p))
                    group_idxs.append(root_idxs)
            elif prune_fn in _IN:
                if _is_plain_linear(layer):
                    local = self._lines(layer.weight.data, 1)
                else:
                    local = self._lines(_conv_line_matrix(layer.weight.data, layer, False).contiguous(), 0)
                group_imp.append(_repeat_for_groups(local, layer, prune_fn)[idxs])
                group_idxs.append(root_idxs)
            elif prune_fn in (function.prune_batchnorm_out_channels, function.prune_layernorm_out_channels):
                affine = layer.affine if prune_fn == function.prune_batchnorm_out_channels else layer.elementwise_affine
                if affine:
                    group_imp.append(layer.weight.data[idxs].abs().pow(self.p))
                    group_idxs.append(root_idxs)
                    if self.bias and layer.bias is not None:
                        group_imp.append(layer.bias.data[idxs].abs().pow(self.p))
                        group_idxs.append(root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class ActivationStatsImportance(tp.importance.GroupMagnitudeImportance):
    """Input-channel importance of linear layers from activation statistics.

    metric="wanda": ‖X_j‖₂·Σ_i |W_ij| (structured Wanda); metric="flap": Var(X_j)·‖W[:, j]‖²
    (FLAP fluctuation). Collect statistics with `with imp.collect(model): model(calib)`.
    Output-channel dependencies carry no activation term and are skipped (as TP's
    ActivationStatsImportance does); group_reduction / normalizer as in TP.
    """

    def __init__(self, metric: str = "wanda", group_reduction: str = "mean", normalizer: str = "mean",
                 target_types=(nn.Linear,), *, backend: str = "auto") -> None:
        if metric not in ("wanda", "flap"):
            raise InvalidInputError(f"metric: expected 'wanda' or 'flap', got {metric!r}")
        super().__init__(2, group_reduction, normalizer, False, list(target_types))
        self.metric = metric
        self.backend = backend
        self.stats: dict[int, ActivationStats] = {}

    @contextlib.contextmanager
    def collect(self, model: nn.Module):
        """Hooks every target linear layer's input into an ActivationStats while inside."""
        def hook(module, args):
            self.stats.setdefault(id(module), ActivationStats(self.backend)).update(args[0])

        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, prune_fn, root_idxs = dep.layer, dep.pruning_fn, group[i].root_idxs
            if not isinstance(layer, tuple(self.target_types)) or prune_fn != function.prune_linear_in_channels:
                continue
            stats = self.stats.get(id(layer))
            if stats is None:
                raise InvalidInputError("group: no activation statistics for a linear layer; run the model inside collect()")
            if self.metric == "wanda":
                local = wanda_channel_scores(layer.weight.data, stats, axis=1, backend=self.backend)
            else:
                local = flap_channel_scores(layer.weight.data, stats, backend=self.backend)
            group_imp.append(local.to(layer.weight.device)[idxs])
            group_idxs.append(root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


__all__ = ["ActivationStatsImportance", "KernelMagnitudeImportance", "KernelTaylorImportance"]
