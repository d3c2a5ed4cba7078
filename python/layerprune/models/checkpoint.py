"""A safetensors checkpoint read one tensor at a time, and a model skeleton with no weights.

``SafetensorsCheckpoint`` opens a Hugging Face folder holding ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``. Opening checks everything that can fail later without reading a weight: every
shard the index names exists, each file's header parses, and each file is as long as its header says (a truncated
download is caught here, in one error line). :meth:`SafetensorsCheckpoint.read` copies one tensor from its file with
``pread`` into a tensor of its own: the file is never memory-mapped, so the page cache of a checkpoint that was read
once does not count in this process's resident memory.

The safetensors layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` and the data, offsets counted
from the end of the header.

``empty_model`` builds the causal LM of a config with every parameter on the meta device (accelerate's
``init_empty_weights``; buffers such as the rotary frequencies are real); ``load_module`` gives one of its
submodules its weights from a checkpoint and ``release_module`` puts them back on the meta device.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerprune.arch import check_supported, is_pruned_config
from layerprune.arch.modeling_layerprune import FUSED_PROJECTIONS, fused_rows
from layerprune.errors import InternalError, ModelError, NumericalError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype names <-> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
_READ_CHUNK = 1 << 30  # a single read(2) returns at most ~2 GiB on Linux


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype, shape and byte range (absolute offsets in the file)."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """(tensors, ``__metadata__``) of one safetensors file, checked against the file's length."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelError(f"checkpoint: {path} is truncated ({size:,} bytes: not even a safetensors header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER:
                raise ModelError(f"checkpoint: {path} is not a safetensors file (header length {length:,})")
            if 8 + length > size:
                raise ModelError(f"checkpoint: {path} is truncated ({size:,} bytes, its header alone needs {8 + length:,})")
            raw = f.read(length)
    except OSError as err:
        raise ModelError(f"checkpoint: cannot read {path}: {err.strerror or err}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ModelError(f"checkpoint: {path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"checkpoint: {path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"checkpoint: {path}: tensor {name} has an unreadable or unsupported entry {info!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise ModelError(f"checkpoint: {path}: tensor {name} has {end - begin:,} bytes for shape {list(shape)}")
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise ModelError(f"checkpoint: {path} is truncated ({size:,} bytes, its header needs {data_start + data_end:,})")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """An empty host tensor that a read fills: page-locked (pinned) when it is bound for a CUDA device, so that
    the copy to the device runs without waiting and without the driver's staging through a pageable buffer; a
    plain one otherwise, or when no page-locked memory can be had. The caching host allocator keeps a pinned block
    from reuse until the copy that reads it has finished, so the buffer may be dropped right after the copy."""
    if torch.device(device).type == "cuda":
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # no driver, or the page-locked memory exhausted: a plain buffer works too
            pass
    return torch.empty(shape, dtype=dtype)


class SafetensorsCheckpoint:
    """The tensors of a checkpoint folder, read one at a time (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise ModelError(f"checkpoint: {self.folder} is not a folder")
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError):
                raise ModelError(f"checkpoint: {index} is not a safetensors index (no weight_map)") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.folder / s).is_file()]
            if missing:
                raise ModelError(f"checkpoint: shard {missing[0]} listed in {index} is missing"
                                 + (f" ({len(missing)} of {len(shards)} shards are)" if len(missing) > 1 else ""))
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map, shards = None, [SINGLE_FILE]
        else:
            raise ModelError(f"checkpoint: {self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                             "(layer-by-layer pruning reads safetensors checkpoints)")
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for shard in shards:
            entries, metadata = read_safetensors_header(self.folder / shard)
            self.metadata[shard] = metadata
            for name, entry in entries.items():
                if weight_map is None or weight_map.get(name) == shard:
                    self.entries[name] = entry
        if weight_map is not None:
            absent = [n for n in weight_map if n not in self.entries]
            if absent:
                raise ModelError(f"checkpoint: tensor {absent[0]} is listed in {index} but not in {weight_map[absent[0]]}")
        self._files: dict[Path, Any] = {}
        self.bytes_read = 0

    # ---- what is there ---------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, names: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of the named tensors (default: all), at their stored dtype or at ``dtype``."""
        chosen = self.entries.values() if names is None else (self.entries[n] for n in names)
        return sum(e.numel * (dtype.itemsize if dtype is not None else e.dtype.itemsize) for e in chosen)

    def check_covers(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        """Every expected tensor is in the checkpoint with the expected shape (one error line otherwise)."""
        missing = [n for n in expected if n not in self.entries]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelError(f"checkpoint: {self.folder} has no tensor {missing[0]}{more}")
        for name, shape in expected.items():
            if tuple(self.entries[name].shape) != tuple(shape):
                raise ModelError(f"checkpoint: tensor {name} has shape {list(self.entries[name].shape)}, "
                                 f"the config gives {list(shape)}")

    def layer_indices(self, adapter: Any) -> list[int]:
        """The decoder layers the tensor names hold (``model.layers.<i>.``), sorted."""
        base = adapter.layer_prefix(0)[:-1]
        found = set()
        for name in self.entries:
            if name.startswith(base):
                index = name[len(base):].split(".", 1)[0]
                if index.isdigit():
                    found.add(int(index))
        return sorted(found)

    def split_fused(self, config: Any) -> None:
        """Name each fused projection's row ranges as the separate tensors layerprune's model holds (Phi-3's
        ``qkv_proj`` as ``q_proj`` / ``k_proj`` / ``v_proj``, ``gate_up_proj`` as ``gate_proj`` / ``up_proj``:
        :func:`~layerprune.arch.modeling_layerprune.split_fused_projections`), in place of the fused name; each
        is one contiguous byte range of the file. Row counts come from the dense ``config``; idempotent."""
        fused_names = [n for n in self.entries if len(n.split(".")) >= 3 and n.rsplit(".", 2)[1] in FUSED_PROJECTIONS]
        for name in fused_names:
            prefix, fused, kind = name.rsplit(".", 2)
            entry = self.entries[name]
            if not entry.shape:
                raise ModelError(f"checkpoint: tensor {name} is a scalar, not a fused projection")
            sizes = fused_rows(fused, config, entry.shape[0])
            if sum(sizes) != entry.shape[0]:
                raise ModelError(f"checkpoint: tensor {name} has {entry.shape[0]} rows; config.json gives {sum(sizes)}")
            row_bytes = entry.nbytes // entry.shape[0]
            start = 0
            for part, size in zip(FUSED_PROJECTIONS[fused], sizes):
                begin = entry.begin + start * row_bytes
                self.entries[f"{prefix}.{part}.{kind}"] = TensorEntry(entry.path, entry.dtype, (size, *entry.shape[1:]),
                                                                       begin, begin + size * row_bytes)
                start += size
            del self.entries[name]

    def check_layers(self, config: Any) -> None:
        """``config`` (a transformers config or the ``config.json`` dict, read before transformers builds anything
        from it) has sane sizes (:func:`layerprune.arch.check_geometry`) and the layer count the tensor names hold,
        so an absurd ``num_hidden_layers`` is refused before a config object or a skeleton is built."""
        adapter = check_supported(config, "model")
        self.split_fused(config)
        layers, found = adapter.num_layers(config), self.layer_indices(adapter)
        if len(found) != layers or (found and found[-1] != layers - 1):  # sorted, unique: then 0..layers-1
            held = f"layers 0..{found[-1]}" + (f" with {found[-1] + 1 - len(found)} missing" if
                                               len(found) != found[-1] + 1 else "") if found else "no layer"
            raise ModelError(f"checkpoint: config.json of {self.folder} has num_hidden_layers {layers}; "
                             f"its weights hold {held}")

    def check_config(self, config: Any) -> None:
        """:meth:`check_layers`, then every tensor ``config`` implies is here with its shape."""
        self.check_layers(config)
        self.check_covers(expected_tensors(skeleton(config)))

    # ---- reading -----------------------------------------------------------------------------------

    def _file(self, path: Path) -> Any:
        handle = self._files.get(path)
        if handle is None:
            try:
                handle = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open until close()
            except OSError as err:
                raise ModelError(f"checkpoint: cannot open {path}: {err.strerror or err}") from None
            self._files[path] = handle
        return handle

    def _entry(self, name: str) -> TensorEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelError(f"checkpoint: {self.folder} has no tensor {name}")
        return entry

    def _pread(self, entry: TensorEntry, name: str, out: torch.Tensor, offset: int) -> None:
        """Fill ``out`` (contiguous) with the bytes of ``entry`` from ``offset`` (relative to its start) on."""
        nbytes = out.numel() * out.element_size()
        if not nbytes:
            return
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        handle = self._file(entry.path)
        done = 0
        while done < nbytes:
            try:
                got = os.preadv(handle.fileno(), [view[done:done + _READ_CHUNK]], entry.begin + offset + done)
            except OSError as err:
                raise ModelError(f"checkpoint: cannot read {name} from {entry.path}: {err.strerror or err}") from None
            if got == 0:
                raise ModelError(f"checkpoint: {entry.path} ended inside tensor {name} (truncated while reading)")
            done += got
        self.bytes_read += nbytes

    @staticmethod
    def _finish(out: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
        """``out`` (read on the host) converted to ``dtype`` and moved to ``device``. On the CPU it is converted
        there. Elsewhere the stored bytes are moved as they are (from page-locked memory, :func:`host_buffer`,
        without waiting) and converted on the device: no host-side conversion, and no wider copy over the bus."""
        if torch.device(device).type == "cpu":
            return out if dtype is None or dtype == out.dtype else out.to(dtype)
        moved = out.to(device, non_blocking=out.is_pinned())
        return moved if dtype is None or dtype == moved.dtype else moved.to(dtype)

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor ``name`` as a new tensor of its own (converted to ``dtype``, moved to ``device``)."""
        entry = self._entry(name)
        out = host_buffer(entry.shape, entry.dtype, device)
        self._pread(entry, name, out, 0)
        return self._finish(out, dtype, device)

    def read_rows(self, name: str, start: int, end: int, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows ``start:end`` (first dimension) of tensor ``name``: one contiguous byte range of the file."""
        entry = self._entry(name)
        if not entry.shape or not 0 <= start <= end <= entry.shape[0]:
            raise InternalError(f"checkpoint: rows {start}:{end} of {name} {list(entry.shape)}")
        out = host_buffer((end - start, *entry.shape[1:]), entry.dtype, device)
        self._pread(entry, name, out, start * (entry.nbytes // entry.shape[0]))
        return self._finish(out, dtype, device)

    def read_row_set(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> torch.Tensor:
        """The rows ``rows`` (sorted, unique indices) of tensor ``name`` (an embedding's rows of some tokens)."""
        entry = self._entry(name)
        out = host_buffer((rows.numel(), *entry.shape[1:]), entry.dtype, device)
        row_bytes = entry.nbytes // entry.shape[0]
        for i, row in enumerate(rows.tolist()):
            self._pread(entry, name, out[i], int(row) * row_bytes)
        return self._finish(out, dtype, device)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# The skeleton


def skeleton(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``config``, dense or pruned, in eval mode with every parameter on the meta device (no
    memory), tied like a loaded one."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from layerprune.arch.modeling_layerprune import pruned_classes

    adapter = check_supported(config, "model")
    with init_empty_weights():
        if is_pruned_config(config) and type(config).__name__ == adapter.pruned_config_class:
            model = pruned_classes(adapter.transformers_prefix)[1](config).to(dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    adapter.decoder_layers(model)  # fused projections split, as the checkpoint names them (split_fused)
    return model.eval()


def empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """:func:`skeleton` of a dense model (a pruned one is refused: the executors prune dense models)."""
    if is_pruned_config(config):
        raise ModelError("model: this folder was already pruned by layerprune; prune the dense model")
    return skeleton(config, dtype)


def check_checkpoint(folder: str | os.PathLike[str], config: Any, *, tensors: bool = True) -> None:
    """:meth:`SafetensorsCheckpoint.check_config` (``tensors=False``: only ``check_layers``, for the raw
    ``config.json``) of a folder that holds safetensors; others are left to their loader."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in (INDEX_FILE, SINGLE_FILE)):
        return
    with SafetensorsCheckpoint(folder) as checkpoint:
        if tensors:
            checkpoint.check_config(config)
        else:
            checkpoint.check_layers(config)


def check_finite(model: nn.Module, where: str = "model") -> None:
    """Every floating parameter and buffer of ``model`` is finite: NumericalError naming the first that is not."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NumericalError(f"{where}: tensor {name} holds {bad:,} NaN or infinite value(s)")


def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter and persistent buffer a checkpoint of ``model`` holds (a tied
    ``lm_head`` counted once, under the embedding's name)."""
    out = {name: tuple(p.shape) for name, p in model.named_parameters()}
    persistent = set(model.state_dict(keep_vars=True))
    out.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in persistent})
    return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf


def load_module(model: nn.Module, prefix: str, checkpoint: SafetensorsCheckpoint, dtype: torch.dtype,
                device: str | torch.device = "cpu") -> int:
    """Give the submodule ``prefix`` of ``model`` its weights from ``checkpoint`` (in ``dtype`` on ``device``);
    returns the bytes now held. Parameters do not require grad."""
    module = model.get_submodule(prefix) if prefix else model
    held = 0
    for local, param in list(module.named_parameters()):
        name = f"{prefix}.{local}" if prefix else local
        tensor = checkpoint.read(name, dtype if param.dtype.is_floating_point else None, device)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelError(f"checkpoint: tensor {name} has shape {list(tensor.shape)}, the model expects {list(param.shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NumericalError(f"checkpoint: tensor {name} holds {int((~torch.isfinite(tensor)).sum()):,} NaN or "
                                 "infinite value(s)")
        owner, leaf = _owner(module, local)
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        held += tensor.numel() * tensor.element_size()
    return held


def release_module(module: nn.Module) -> None:
    """Put every parameter of ``module`` back on the meta device (same shapes and dtypes): its memory is freed."""
    for local, param in list(module.named_parameters()):
        owner, leaf = _owner(module, local)
        owner._parameters[leaf] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                               requires_grad=False)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the parameters of ``module`` that hold memory (not on the meta device)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type != "meta")


def check_materialized(module: nn.Module, where: str) -> None:
    meta = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if meta:
        raise InternalError(f"{where}: parameter {meta[0]} was never read from the checkpoint")


__all__ = ["INDEX_FILE", "SAFETENSORS_DTYPES", "SINGLE_FILE", "TORCH_TO_SAFETENSORS", "SafetensorsCheckpoint",
           "TensorEntry", "check_checkpoint", "check_finite", "check_materialized", "empty_model", "expected_tensors",
           "host_buffer", "load_module", "read_safetensors_header", "release_module", "skeleton", "tensor_bytes"]
