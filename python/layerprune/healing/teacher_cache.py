"""The teacher's next-token distributions, computed once and kept on disk as top-K log-probabilities.

A cache folder holds ``log_probs.npy`` (float32) and ``token_ids.npy`` (int32), both [sequences, seq_len − 1,
K], ``filled.npy`` (which sequences are computed) and ``meta.json``: the teacher's fingerprint, the hash of the
token sequences, K and the temperature. The folder is created whole (a temporary folder renamed into place);
rows are then computed on demand, only those a run reads, and marked filled only after they are on disk (the
mask is replaced atomically), so a killed run leaves rows that are either marked and whole, or recomputed. A
later epoch, a resumed run, a longer run or another student of the same teacher on the same text reads the
filled rows instead of running the teacher again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerprune.atomic import atomic_output_file, replace_dir, temp_sibling_dir, write_json_atomic
from layerprune.errors import DataError
from layerprune.healing.losses import teacher_top_k

CACHE_FORMAT = 1
META_FILE = "meta.json"
LOG_PROBS_FILE = "log_probs.npy"
TOKEN_IDS_FILE = "token_ids.npy"
FILLED_FILE = "filled.npy"
MARK_EVERY_BATCHES = 16  # the filled mask is saved this often while rows are computed


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's config and of every tensor of its state dict (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode("utf-8"))
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokens_fingerprint(sequences: torch.Tensor) -> str:
    """sha256 of the token sequences (int64, row-major) and their shape."""
    t = sequences.to(torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}|".encode() + t.numpy().tobytes()).hexdigest()


def expected_meta(teacher_fingerprint: str, sequences: torch.Tensor, top_k: int, temperature: float) -> dict[str, Any]:
    """What a cache of this teacher on these sequences holds (:func:`open_teacher_cache` compares it)."""
    return {
        "format": CACHE_FORMAT,
        "teacher": teacher_fingerprint,
        "tokens": tokens_fingerprint(sequences),
        "sequences": int(sequences.shape[0]),
        "seq_len": int(sequences.shape[1]),
        "top_k": int(top_k),
        "temperature": float(temperature),
    }


class TeacherCache:
    """A cache folder: :meth:`fill` computes the rows a run needs, :meth:`rows` reads them."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder = folder
        self.meta = meta
        self._log_probs: Any = np.load(folder / LOG_PROBS_FILE, mmap_mode="r+")
        self._token_ids: Any = np.load(folder / TOKEN_IDS_FILE, mmap_mode="r+")
        self.filled = np.load(folder / FILLED_FILE)

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    def missing(self, index: Sequence[int]) -> list[int]:
        """The rows of ``index`` not computed yet, in order, each once."""
        return sorted({int(i) for i in index if not self.filled[int(i)]})

    def _mark(self) -> None:
        self._log_probs.flush()
        self._token_ids.flush()
        with atomic_output_file(self.folder / FILLED_FILE) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, self.filled)

    def fill(self, teacher: torch.nn.Module | None, sequences: torch.Tensor, index: Sequence[int], *,
             batch_size: int = 4, progress: bool = True) -> int:
        """Compute the rows of ``index`` that are missing with ``teacher``; returns how many were computed."""
        from tqdm.auto import tqdm

        todo = self.missing(index)
        if not todo:
            return 0
        if teacher is None:
            raise DataError(f"teacher cache {self.folder} lacks {len(todo)} of the sequences this run reads, and no "
                            "teacher was given to compute them")
        device = next(teacher.parameters()).device
        was_training = teacher.training
        teacher.eval()
        batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
        try:
            with torch.inference_mode():
                for n, rows in enumerate(tqdm(batches, desc="teacher top-k", unit="batch", disable=not progress,
                                              leave=False)):
                    logits = teacher(input_ids=sequences[rows].to(device), use_cache=False).logits[:, :-1]
                    values, ids = teacher_top_k(logits, self.top_k, float(self.meta["temperature"]))
                    self._log_probs[rows] = values.cpu().numpy()
                    self._token_ids[rows] = ids.cpu().numpy()
                    self.filled[rows] = True
                    if (n + 1) % MARK_EVERY_BATCHES == 0:
                        self._mark()
        finally:
            teacher.train(was_training)
            self._mark()
        return len(todo)

    def rows(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs float32, token ids int32), each [len(index), seq_len − 1, K], read from disk."""
        order = np.asarray(list(index), dtype=np.int64)
        if not self.filled[order].all():
            raise DataError(f"teacher cache {self.folder}: row {int(order[~self.filled[order]][0])} was never computed")
        return (torch.from_numpy(np.ascontiguousarray(self._log_probs[order])),
                torch.from_numpy(np.ascontiguousarray(self._token_ids[order])))

    def close(self) -> None:
        for name in ("_log_probs", "_token_ids"):
            mm = getattr(getattr(self, name, None), "_mmap", None)
            if mm is not None:
                mm.close()
            setattr(self, name, None)


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise DataError(f"teacher cache {folder}: unreadable {META_FILE} ({err})") from None


def _create(target: Path, meta: dict[str, Any]) -> None:
    """A new cache folder with every row unfilled, renamed into place whole."""
    n, positions, k = int(meta["sequences"]), int(meta["seq_len"]) - 1, int(meta["top_k"])
    need = n * positions * k * 8
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if need > free:
        raise DataError(f"teacher cache {target}: needs {need / 2**30:.2f} GiB on disk, {free / 2**30:.2f} GiB free "
                        "(lower --top-k)")
    tmp = temp_sibling_dir(target)
    try:
        for name, dtype in ((LOG_PROBS_FILE, np.float32), (TOKEN_IDS_FILE, np.int32)):
            array = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=(n, positions, k))
            array.flush()
            array._mmap.close()  # type: ignore[attr-defined]
        np.save(tmp / FILLED_FILE, np.zeros(n, dtype=bool))
        write_json_atomic(tmp / META_FILE, meta)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_teacher_cache(folder: str | os.PathLike[str], expected: dict[str, Any], *, create: bool = True) -> TeacherCache:
    """The cache at ``folder``, created empty when there is none (``create``). A cache of another teacher, text,
    K or temperature is refused in one line (it is never overwritten). ``expected["teacher"]`` None accepts any
    teacher (a run given the cache but no teacher)."""
    path = Path(folder).expanduser().absolute()
    meta = _read_meta(path) if path.is_dir() else None
    if meta is None:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise DataError(f"teacher cache {path} exists and is not a teacher cache; pass an empty or new folder")
        if not create:
            raise DataError(f"teacher cache {path} does not exist")
        _create(path, expected)
        meta = dict(expected)
    differs = sorted(k for k in expected if k != "teacher" and meta.get(k) != expected[k])
    if expected.get("teacher") is not None and meta.get("teacher") != expected["teacher"]:
        differs.insert(0, "teacher")
    if differs:
        raise DataError(f"teacher cache {path} was made for another {', '.join(differs)}; pass a new folder for "
                        "this teacher and text")
    return TeacherCache(path, meta)


__all__ = ["FILLED_FILE", "TeacherCache", "expected_meta", "model_fingerprint", "open_teacher_cache",
           "tokens_fingerprint"]
