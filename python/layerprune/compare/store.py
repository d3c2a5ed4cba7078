"""The run store of `compare`: finished runs and layer importance under DIR, keyed by what decides them.

Every file is written temp + rename, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from layerprune.atomic import write_json_atomic
from layerprune.compare.settings import CompareSettings
from layerprune.importance import LayerImportance
from layerprune.models import count_parameters, model_info
from layerprune.provenance import source_digest, versions

def ratio_key(ratio: float) -> str:
    return f"{ratio:.6g}"


def run_path(out_dir: Path, method: str, ratio: float | None) -> Path:
    if method == "dense":
        return out_dir / "runs" / "dense.json"
    return out_dir / "runs" / ratio_key(ratio) / f"{method}.json"  # type: ignore[arg-type]


def model_dir(out_dir: Path, method: str, ratio: float) -> Path:
    return out_dir / "models" / ratio_key(ratio) / method


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # missing or torn: recompute


def weights_probe(model: torch.nn.Module, per_tensor: int = 256) -> str:
    """Digest of the first values of every parameter tensor: tells two checkpoints of one shape apart."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        h.update(name.encode())
        h.update(param.detach().reshape(-1)[:per_tensor].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(model: torch.nn.Module, model_name: str, eval_ids: torch.Tensor, calib_ids: torch.Tensor,
                 settings: CompareSettings, refit_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """What a stored run must share with the current invocation to be reused."""
    info = model_info(model)
    info.pop("architecture", None)
    return {
        "model": model_name,
        "model_shape": info,
        "model_params": int(count_parameters(model)["total"]),
        "weights_probe": weights_probe(model),
        "dtype": str(next(model.parameters()).dtype),
        "eval_tokens": tokens_digest(eval_ids),
        "eval_tokens_count": int(eval_ids.numel()),
        "seq_len": settings.seq_len,
        "calib_tokens": tokens_digest(calib_ids),
        "refit_tokens": None if refit_ids is None else tokens_digest(refit_ids),
        "seed": settings.seed,
        "importance": settings.importance,
        "mlp_step": settings.mlp_step,
        "prompts": list(settings.prompts),
        "max_new_tokens": settings.max_new_tokens,
        "search_generations": settings.search_generations if "unbalanced-search" in settings.methods else None,
        # results survive only the code and libraries that made them
        "versions": versions(),
        "source": source_digest(),
    }


IMPORTANCE_FINGERPRINT_KEYS = ("model", "model_shape", "model_params", "weights_probe", "dtype", "calib_tokens",
                               "refit_tokens", "seed",
                               "importance", "mlp_step", "versions", "source")


class RunStore:
    """Finished runs and layer importance under DIR, written temp + rename, reused on a match."""

    def __init__(self, out_dir: Path, fingerprint: Mapping[str, Any], log: Callable[[str], None], fresh: bool = False):
        self.out_dir = out_dir
        self.fresh = fresh  # reuse nothing: every run and layer importance is recomputed (and stored again)
        self.key = _digest(fingerprint)
        # layer importance depends on the model and the calibration batch only, not on the test tokens
        self.importance_key = _digest({k: fingerprint[k] for k in IMPORTANCE_FINGERPRINT_KEYS})
        self.log = log

    def load_run(self, method: str, ratio: float | None, config_json: Mapping[str, Any] | None) -> dict[str, Any] | None:
        path = run_path(self.out_dir, method, ratio)
        data = None if self.fresh else _load_json(path)
        if data is None:
            return None
        if data.get("fingerprint") != self.key or data.get("config") != (None if config_json is None else dict(config_json)):
            self.log(f"{path} was made with other settings: recomputing it")
            return None
        return data

    def save_run(self, run: dict[str, Any]) -> None:
        ratio = None if run["method"] == "dense" else run["target_ratio"]
        write_json_atomic(run_path(self.out_dir, run["method"], ratio), dict(run, fingerprint=self.key))

    def importance_path(self, method: str) -> Path:
        return self.out_dir / "layer_importance" / f"{method}.json"

    def load_importance(self, method: str) -> Any | None:
        data = None if self.fresh else _load_json(self.importance_path(method))
        if data is None or data.get("fingerprint") != self.importance_key:
            return None
        return LayerImportance.from_json(data["layer_importance"])

    def save_importance(self, key: str, li: Any) -> None:
        write_json_atomic(self.importance_path(key),
                                     {"fingerprint": self.importance_key, "layer_importance": li.to_json(full_curves=True)})
