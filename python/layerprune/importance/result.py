"""The result of a layer-importance method, and its one JSON codec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerprune.errors import InvalidInputError


@dataclass
class LayerImportance:
    """Per-layer importance. Higher = more important (pruning it costs more).

    ``attn``/``mlp``/``combined`` have one entry per decoder layer. ``attn_curves[l][g]`` is the loss
    increase when layer ``l`` keeps ``g`` KV groups (g = 0..Hkv); ``mlp_curves[l][k]`` the increase
    when it keeps ``k * mlp_step`` MLP channels (k = 0..I/mlp_step, the allocation module's grid).
    """

    method: str
    attn: np.ndarray
    mlp: np.ndarray
    combined: np.ndarray
    attn_curves: list[np.ndarray] | None = None
    mlp_curves: list[np.ndarray] | None = None
    mlp_step: int = 1
    metric: str = "loss"
    base_loss: float | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(len(self.combined))

    def to_json(self, full_curves: bool = False) -> dict[str, Any]:
        """JSON form. ``full_curves`` keeps every MLP curve point (what :meth:`from_json` needs to
        reuse the curves); otherwise the report keeps the sampled points only."""
        def arr(a: np.ndarray) -> list[float]:
            return [float(v) for v in np.asarray(a, dtype=np.float64)]

        out: dict[str, Any] = {
            "method": self.method,
            "metric": self.metric,
            "base_loss": self.base_loss,
            "attn": arr(self.attn),
            "mlp": arr(self.mlp),
            "combined": arr(self.combined),
            "seconds": round(float(self.seconds), 3),
            "details": self.details,
        }
        if self.attn_curves is not None:
            out["attn_curves"] = [arr(c) for c in self.attn_curves]
        if self.mlp_curves is not None:
            out["mlp_step"] = self.mlp_step
            out["mlp_curve_samples"] = self.details.get("mlp_samples")
            if full_curves:
                out["mlp_curves"] = [arr(c) for c in self.mlp_curves]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LayerImportance":
        """Inverse of ``to_json(full_curves=True)``."""
        try:
            curves = {key: [np.asarray(c, dtype=np.float64) for c in data[key]] if data.get(key) is not None else None
                      for key in ("attn_curves", "mlp_curves")}
            return cls(
                method=str(data["method"]),
                attn=np.asarray(data["attn"], dtype=np.float64),
                mlp=np.asarray(data["mlp"], dtype=np.float64),
                combined=np.asarray(data["combined"], dtype=np.float64),
                attn_curves=curves["attn_curves"],
                mlp_curves=curves["mlp_curves"],
                mlp_step=int(data.get("mlp_step", 1)),
                metric=str(data.get("metric", "loss")),
                base_loss=data.get("base_loss"),
                seconds=float(data.get("seconds", 0.0)),
                details=dict(data.get("details") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"layer importance JSON: {type(exc).__name__}: {exc}") from None


__all__ = ["LayerImportance"]
