"""Pruned folders written tensor by tensor, for the layer-by-layer engine (:mod:`layerprune.pruning.sequential`).

A safetensors file starts with the JSON header of every tensor it holds, so it is usually written from a
state dict held whole in memory. Here the layout is planned first instead, from names, dtypes and shapes
alone (the engine knows them once the allocation is solved): shards of at most ``max_shard_bytes``, each
file created at its final length with its header, and every tensor then written at its offset as soon as it
is final (``pwrite``). Tensors written before the plan (the embeddings, read first) are staged in a scratch
file and copied into place file to file. One shard is ``model.safetensors``; several are
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``, as transformers writes them.

:class:`PrunedFolderWriter` puts those shards and the rest of a pruned folder (:func:`save_pruned`'s config,
generation config, remote-code module, tokenizer, report) in a temporary folder beside the output and swaps
it in at the end (:func:`layerprune.atomic.replace_dir`): an interrupted run leaves no output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerprune.arch import adapter_for, check_consistency
from layerprune.atomic import remove_stale_siblings, replace_dir, restore_interrupted, temp_sibling_dir
from layerprune.errors import InternalError, InvalidInputError
from layerprune.export.save import (
    WEIGHTS_FILE,
    check_layout,
    plain_family_config,
    prepare_out_dir,
    pruned_model_config,
    report_json_text,
    write_folder_files,
)
from layerprune.models.checkpoint import INDEX_FILE, TORCH_TO_SAFETENSORS

DEFAULT_MAX_SHARD_BYTES = 50 * 10**9  # transformers' save_pretrained default (50GB)
_WRITE_CHUNK = 1 << 30


@dataclass
class _Slot:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int
    rows_written: int = 0

    @property
    def rows(self) -> int:
        return _rows(self.shape)

    @property
    def written(self) -> bool:
        return self.rows_written == self.rows


def _rows(shape: tuple[int, ...]) -> int:
    """Rows of a tensor of ``shape`` as written (a scalar is one row)."""
    return shape[0] if shape else 1


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (on CPU, contiguous), without a copy."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + _WRITE_CHUNK], offset + done)


class SafetensorsShardWriter:
    """Safetensors shards in ``folder``, planned once, then filled tensor by tensor (module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 scratch: str | os.PathLike[str] | None = None, metadata: Mapping[str, str] | None = None) -> None:
        if max_shard_bytes < 1:
            raise InvalidInputError(f"max_shard_bytes: must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.scratch = Path(scratch) if scratch is not None else self.folder
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = dict(metadata or {"format": "pt"})
        self._slots: dict[str, _Slot] | None = None
        self._fds: dict[Path, int] = {}
        self._staged: dict[str, list[Any]] = {}  # name -> [dtype, shape, offset in the staging file, rows staged]
        self._staging: Path | None = None
        self.files: list[str] = []
        self.bytes_written = 0

    # ---- before the plan ---------------------------------------------------------------------------

    def _stage(self, name: str, rows: torch.Tensor, start: int, shape: tuple[int, ...]) -> None:
        """Append rows ``start:...`` of tensor ``name`` to the staging file (a tensor's rows come in order)."""
        if self._staging is None:
            self.scratch.mkdir(parents=True, exist_ok=True)
            self._staging = self.scratch / "staged.bin"
            self._staging.write_bytes(b"")
        entry = self._staged.get(name)
        if entry is None:
            if start != 0:
                raise InternalError(f"shard writer: {name} staged from row {start}, not 0")
            entry = self._staged[name] = [rows.dtype, tuple(shape), self._staging.stat().st_size, 0]
        elif start != entry[3] or next(reversed(self._staged)) != name:
            raise InternalError(f"shard writer: the staged rows of {name} are not in order")
        if rows.dtype != entry[0] or tuple(rows.shape[1:]) != tuple(shape[1:]) or start + rows.shape[0] > _rows(shape):
            raise InternalError(f"shard writer: rows {list(rows.shape)} of {rows.dtype} do not fit {name} {list(shape)}")
        with open(self._staging, "ab") as f:
            f.write(_bytes_of(rows))
        entry[3] += rows.shape[0]

    # ---- the plan ----------------------------------------------------------------------------------

    def plan(self, tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        """Fix every tensor's file and offset: consecutive tensors fill a shard up to ``max_shard_bytes``.
        Creates the files with their headers; copies the staged tensors into place."""
        if self._slots is not None:
            raise InternalError("shard writer: planned twice")
        for name, (dtype, shape) in tensors.items():
            if dtype not in TORCH_TO_SAFETENSORS:
                raise InternalError(f"shard writer: {name} has dtype {dtype}, which safetensors does not store")
        groups: list[list[str]] = []
        size = 0
        for name, (dtype, shape) in tensors.items():
            nbytes = _nbytes(dtype, tuple(shape))
            if not groups or (size + nbytes > self.max_shard_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        count = len(groups)
        self.files = [WEIGHTS_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                      for i in range(count)]
        slots: dict[str, _Slot] = {}
        for file, names in zip(self.files, groups):
            # widest elements first, so every tensor's data starts aligned to its element size
            ordered = sorted(names, key=lambda n: -tensors[n][0].itemsize)
            header: dict[str, Any] = {"__metadata__": self.metadata}
            offset = 0
            for name in ordered:
                dtype, shape = tensors[name]
                nbytes = _nbytes(dtype, tuple(shape))
                header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = self.folder / file
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            self._fds[path] = fd
            _pwrite_all(fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0)
            start = 8 + len(raw)
            os.ftruncate(fd, start + offset)
            for name in ordered:
                entry = header[name]
                begin, end = entry["data_offsets"]
                slots[name] = _Slot(path, tensors[name][0], tuple(tensors[name][1]), start + begin, end - begin)
        self._slots = slots
        self._copy_staged()

    def _copy_staged(self) -> None:
        assert self._slots is not None
        if self._staging is None:
            return
        with open(self._staging, "rb") as src:
            for name, (dtype, shape, offset, staged_rows) in self._staged.items():
                slot = self._check(name, dtype, shape)
                if staged_rows != slot.rows:
                    raise InternalError(f"shard writer: {staged_rows} of the {slot.rows} rows of {name} were staged")
                left, src_at, dst_at = slot.nbytes, offset, slot.offset
                while left:
                    copied = os.copy_file_range(src.fileno(), self._fds[slot.file], left, src_at, dst_at)
                    if copied == 0:
                        raise InternalError(f"shard writer: the staged copy of {name} is short")
                    left, src_at, dst_at = left - copied, src_at + copied, dst_at + copied
                slot.rows_written = slot.rows
                self.bytes_written += slot.nbytes
        self._staging.unlink()
        self._staging = None
        self._staged.clear()

    # ---- writing -----------------------------------------------------------------------------------

    def _check(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> _Slot:
        assert self._slots is not None
        slot = self._slots.get(name)
        if slot is None:
            raise InternalError(f"shard writer: {name} is not in the planned layout")
        if (slot.dtype, slot.shape) != (dtype, tuple(shape)):
            raise InternalError(f"shard writer: {name} is {dtype} {list(shape)}, the plan has {slot.dtype} {list(slot.shape)}")
        if slot.written and slot.rows:
            raise InternalError(f"shard writer: {name} written twice")
        return slot

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (staged until the plan exists)."""
        if self._slots is None and name in self._staged:
            raise InternalError(f"shard writer: {name} written twice")
        self.write_rows(name, tensor.reshape(1) if tensor.dim() == 0 else tensor, 0, tuple(tensor.shape))

    def write_rows(self, name: str, rows: torch.Tensor, start: int, shape: tuple[int, ...]) -> None:
        """Write rows ``start : start + len(rows)`` of tensor ``name`` (full shape ``shape``): a large tensor (an
        embedding) goes out in blocks, never whole in memory. Before the plan, rows are staged in order."""
        if self._slots is None:
            self._stage(name, rows, start, tuple(shape))
            return
        slot = self._check(name, rows.dtype, tuple(shape))
        if tuple(rows.shape[1:]) != tuple(shape[1:]) or start != slot.rows_written \
                or start + rows.shape[0] > slot.rows:
            raise InternalError(f"shard writer: rows {start}:{start + rows.shape[0]} of {name} out of order or shape")
        row_bytes = slot.nbytes // max(slot.rows, 1)
        _pwrite_all(self._fds[slot.file], _bytes_of(rows), slot.offset + start * row_bytes)
        slot.rows_written += rows.shape[0]
        self.bytes_written += rows.shape[0] * row_bytes

    def close(self) -> list[str]:
        """Check that every planned tensor was written, close the files and write the index when there are
        several shards; returns the file names."""
        if self._slots is None:
            raise InternalError("shard writer: closed before any plan")
        missing = [n for n, s in self._slots.items() if not s.written]
        if missing:
            raise InternalError(f"shard writer: {len(missing)} planned tensors were never written ({missing[0]} ...)")
        self._close_files()
        if len(self.files) > 1:
            weight_map = {name: slot.file.name for name, slot in self._slots.items()}
            total = sum(s.nbytes for s in self._slots.values())
            params = sum(s.nbytes // s.dtype.itemsize for s in self._slots.values())
            index = {"metadata": {"total_parameters": params, "total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)

    def _close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        self._close_files()
        if self._staging is not None:
            self._staging.unlink(missing_ok=True)


class PrunedFolderWriter:
    """A pruned folder assembled in a temporary folder beside ``out_dir`` and swapped in by :meth:`commit`.

    Use as a context manager: leaving it with an exception (Ctrl-C included) removes the temporary folder,
    so no output folder is left; an existing ``out_dir`` (with ``overwrite``) stays as it was.
    ``scratch`` is a folder inside it for the engine's spilled hidden states, removed before the swap.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.out = Path(out_dir).expanduser().absolute()
        restore_interrupted(self.out)
        remove_stale_siblings(self.out)
        prepare_out_dir(self.out, overwrite)
        self.tmp = temp_sibling_dir(self.out)
        self.scratch = self.tmp / ".scratch"
        self.shards = SafetensorsShardWriter(self.tmp, max_shard_bytes=max_shard_bytes, scratch=self.scratch)
        self._done = False

    def plan(self, tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.shards.plan(tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.write(name, tensor)

    def write_rows(self, name: str, rows: torch.Tensor, start: int, shape: tuple[int, ...]) -> None:
        self.shards.write_rows(name, rows, start, shape)

    def commit(self, model: nn.Module, tokenizer: Any, report: dict[str, Any] | None = None,
               generation_config: Any = None, plain_config: bool = True) -> Path:
        """Finish the folder for the pruned ``model`` (its skeleton is enough: shapes, config, dtype) and swap it
        into place; the config is :func:`save_pruned`'s (the family's own when every layer has the same widths,
        unless ``plain_config=False``)."""
        adapter = adapter_for(model, "model")
        check_consistency(model)
        check_layout(model, adapter)
        embed = model.get_input_embeddings().weight
        tie = adapter.lm_head(model).weight is embed
        plain = plain_family_config(model, adapter, tie) if plain_config else None
        config = plain if plain is not None else pruned_model_config(model, adapter, tie)
        report_text = report_json_text(report)
        self.shards.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
        if generation_config is None:
            generation_config = getattr(model, "generation_config", None)
        write_folder_files(self.tmp, config, generation_config, tokenizer, report_text)
        replace_dir(self.tmp, self.out)
        self._done = True
        return self.out

    def abort(self) -> None:
        if not self._done:
            self.shards.abort()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "PrunedFolderWriter":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None or not self._done:
            self.abort()


def prune_checkpoint(
    model: str | os.PathLike[str],
    config: Any,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    hidden_budget_bytes: int | None = None,
    max_memory: int | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    calib_ids: torch.Tensor | None = None,
    calib_source: dict[str, Any] | None = None,
    refit_ids: torch.Tensor | None = None,
    report_extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[Path, Any]:
    """Prune a safetensors checkpoint folder layer by layer into ``out_dir``: (the folder, the
    :class:`~layerprune.pruning.PruneResult`). ``model`` is a folder or ``smollm2-135m``;
    the tokenizer is read from it unless given. The folder is :func:`save_pruned`'s (sharded past
    ``max_shard_bytes``) and is written atomically; ``report_extra`` is added to its report.json. Only
    forward-only importance (``activation``, ``l1``, ``l2``)."""
    from layerprune.models import resolve_model
    from layerprune.models.checkpoint import SafetensorsCheckpoint
    from layerprune.models.loading import load_tokenizer
    from layerprune.pruning.config import resolve_config
    from layerprune.pruning.sequential import SequentialOptions, prune_sequential

    config = resolve_config(config, "layers")
    resolved = resolve_model(model)
    if not isinstance(resolved, Path) or not resolved.is_dir():
        raise InvalidInputError(f"model: layer-by-layer pruning reads a local folder of safetensors, got {os.fspath(model)!r}")
    with SafetensorsCheckpoint(resolved) as checkpoint:
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if tokenizer is None and (calib_ids is None or any((resolved / f).is_file() for f in tokenizer_files)):
            tokenizer = load_tokenizer(resolved, os.fspath(model), calib_ids is None)
        generation_config = _generation_config(resolved)
        with PrunedFolderWriter(out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes) as writer:
            options = SequentialOptions(device=device, hidden_budget_bytes=hidden_budget_bytes, max_memory=max_memory,
                                        spill_dir=writer.scratch)
            result = prune_sequential(checkpoint, tokenizer, config, writer, dtype=dtype, calib_ids=calib_ids,
                                      calib_source=calib_source, refit_ids=refit_ids, options=options, progress=progress)
            result.report.update(report_extra or {})
            out = writer.commit(result.model, tokenizer, result.report,
                                generation_config=generation_config or getattr(result.model, "generation_config", None))
    return out, result


def _generation_config(folder: Path) -> Any:
    """The checkpoint's generation_config.json, as from_pretrained reads it (None when there is none)."""
    if not (folder / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "PrunedFolderWriter", "SafetensorsShardWriter", "prune_checkpoint"]
