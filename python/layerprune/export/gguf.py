"""GGUF export: a pruned (or plain) model as one file that llama.cpp runs, each layer at its own widths.

**Architecture.** When every layer has the same widths and the family's own llama.cpp architecture can
hold them (the adapter's ``gguf_*`` facts: ``llama`` for Llama and Mistral, ``qwen2``, ``qwen3``), the file
uses that architecture with scalar head counts and feed-forward length. Otherwise it uses ``deci``
(Nemotron-NAS): its loader reads ``attention.head_count``, ``attention.head_count_kv`` and
``feed_forward_length`` as per-layer arrays and builds every layer, and its KV cache, at that layer's widths.
``llama`` also reads those arrays but builds every layer at layer 0's widths, so it is never given them.
An empty block (a layer left with no head or no MLP channel) is a 0 in those arrays, which ``deci`` skips with its
norm; its tensors are not written. Two cases llama.cpp cannot say with a 0 are written as one head or channel of zero
weights, whose output is zero: layer 0's attention (llama.cpp reads the head size only from layer 0's heads), an
empty MLP beside an attention (``deci`` skips a layer with no MLP channel whole, its attention included) and the last
layer's empty MLP (llama.cpp stops on a model that ends on a skipped layer).
Two layouts cannot be written, and are refused with the reason: a Qwen3 model that needs ``deci`` (deci has
no per-head q/k norms), and biases a family's loader does not read when ``deci`` cannot take over.

**Scales.** A family's own architecture reads its scales as keys (Granite: ``granite.embedding_scale``,
``residual_scale``, ``attention.scale``, ``logit_scale``); written as ``deci``, the same scales are folded into
the weights (token embeddings, lm_head, Q rows, o_proj and down_proj), and a tied lm_head is written on its own.

**Tensors** are named as the ``gguf`` package names them (``token_embd``, ``blk.N.attn_q``, ...), shaped as
in transformers (``[out, in]``, which GGUF stores as ``ne = [in, out]``), and checked against the
architecture's tensor list in ``gguf``. Architectures whose RoPE rotates adjacent pairs of a head (``llama``,
``deci``) get the Q and K rows (and biases) of every head reordered from transformers' half-split order.
RoPE scaling is taken from the model's own rotary embedding: per-dimension factors ``inv_freq_default /
inv_freq`` become ``rope_freqs`` (one common factor becomes linear scaling); a scaling that also changes the
attention scale (yarn, longrope, dynamic) is refused.

**Types** (``--outtype``): ``f32``; ``f16`` and ``bf16`` (matrices; norms and biases stay f32); ``q8_0``
(matrices whose rows are a multiple of 32 values, the others f16). The file is written beside its target
and renamed into place (:func:`layerprune.atomic.atomic_output_file`).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerprune.arch import adapter_for, check_consistency, config_value, layer_shapes
from layerprune.atomic import atomic_output_file
from layerprune.errors import InvalidInputError, ModelError
from layerprune.export.gguf_vocab import tokenizer_fields
from layerprune.faults import fault_point

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
PER_LAYER_ARCHITECTURE = "deci"
# Projections whose biases deci's loader reads (all of them); its RoPE rotates adjacent pairs.
PER_LAYER_BIASES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q8_0_BLOCK = 32
# The block each pre-norm of the Llama layout feeds (skipped with it when the block is empty).
_NORM_BLOCK = {"ATTN_NORM": "self_attn", "FFN_NORM": "mlp"}
ROPE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class GGUFLayout:
    """What the file will say about the model: architecture, per-layer widths, Q/K order."""

    architecture: str
    num_q_heads: tuple[int, ...]
    num_kv_heads: tuple[int, ...]
    intermediate: tuple[int, ...]
    head_dim: int
    per_layer: bool  # head counts and feed-forward lengths written as arrays
    permute_qk: bool  # Q/K rows reordered for a RoPE that rotates adjacent pairs
    notes: tuple[str, ...] = ()


@dataclass
class GGUFExport:
    """Summary of a written file."""

    path: Path
    layout: GGUFLayout
    outtype: str
    tensors: int
    bytes: int
    tokenizer: str
    tensor_types: dict[str, int] = field(default_factory=dict)


def _projection_biases(model: Any) -> set[str]:
    adapter = adapter_for(model)
    found = set()
    for layer in adapter.decoder_layers(model):
        for name, linear in adapter.projections(layer).items():
            if linear.bias is not None:
                found.add(name.rsplit(".", 1)[-1])
    return found


def _sliding_window_note(config: Any, architecture: str) -> str | None:
    window = config_value(config, "sliding_window")
    if window is None or not config_value(config, "use_sliding_window", True):
        return None
    if int(window) >= int(config_value(config, "max_position_embeddings", 0)):
        return None
    return (f"llama.cpp's `{architecture}` architecture has no sliding window: it attends to the whole context, so "
            f"beyond {int(window)} tokens its outputs differ from transformers' (sliding_window={int(window)})")


def plan_layout(model: Any) -> GGUFLayout:
    """Decide architecture and tensor order for ``model`` (see the module docstring); ModelError if llama.cpp
    has no architecture that runs it as transformers does."""
    adapter = adapter_for(model)
    config = model.config
    shapes = layer_shapes(model)
    if not shapes:
        raise ModelError("model: it has no decoder layers")
    head_dim = shapes[0]["head_dim"]
    hidden = int(config_value(config, "hidden_size"))
    q = tuple(s["num_q_heads"] for s in shapes)
    kv = tuple(s["num_kv_heads"] for s in shapes)
    ff = tuple(s["intermediate"] for s in shapes)
    biases = _projection_biases(model)
    own = adapter.gguf_architecture
    reasons = []
    if min(kv) == 0 or min(ff) == 0:
        reasons.append("it has empty blocks, written as 0 heads or 0 feed-forward length in per-layer arrays")
        if biases & {"o_proj", "down_proj"}:
            raise ModelError(f"model: llama.cpp's `{PER_LAYER_ARCHITECTURE}` skips an empty block whole, so its "
                             "o_proj / down_proj bias would be lost")
    if len(set(zip(q, kv, ff))) > 1:
        reasons.append("its layers have different widths")
    if adapter.gguf_full_width_attention and any(h * head_dim != hidden for h in q):
        reasons.append(f"llama.cpp's `{own}` loader fixes q_proj at hidden x hidden and the model keeps "
                       f"{min(q)}-{max(q)} of {hidden // head_dim} query heads")
    unread = sorted(biases - set(adapter.gguf_biases))
    if unread:
        reasons.append(f"llama.cpp's `{own}` loader reads no {', '.join(unread)} bias")
    if not reasons:
        note = None if adapter.gguf_sliding_window else _sliding_window_note(config, own)
        return GGUFLayout(own, q, kv, ff, head_dim, per_layer=False, permute_qk=adapter.gguf_rope_adjacent_pairs,
                          notes=(note,) if note else ())
    if adapter.qk_norm or not adapter.gguf_per_layer:
        lacks = "per-head q/k norms" if adapter.qk_norm else f"{adapter.name}'s norms, caps and scales"
        raise ModelError(f"model: this {adapter.name} model cannot be written as GGUF: {'; '.join(reasons)}, so it "
                         f"needs llama.cpp's `{PER_LAYER_ARCHITECTURE}` architecture, which has no {lacks}")
    unread = sorted(biases - set(PER_LAYER_BIASES))
    if unread:
        raise ModelError(f"model: llama.cpp's `{PER_LAYER_ARCHITECTURE}` loader reads no {', '.join(unread)} bias")
    notes = [f"written as `{PER_LAYER_ARCHITECTURE}`, not `{own}`: " + "; ".join(reasons)]
    if kv[0] == 0:
        q, kv = (1, *q[1:]), (1, *kv[1:])
        notes.append("layer 0 has no attention; it is written as one head whose weights are zero (its output is zero), "
                     "because llama.cpp reads the head size only where layer 0 has heads")
    last = len(ff) - 1
    stand_ins = [f == 0 and (h > 0 or l == last) for l, (f, h) in enumerate(zip(ff, q))]
    if any(stand_ins):
        ff = tuple(1 if stand_in else f for stand_in, f in zip(stand_ins, ff))
        notes.append("an empty MLP beside an attention, or in the last layer, is written as one channel whose weights "
                     "are zero (its output is zero): llama.cpp's `deci` skips a layer with no MLP channel whole, "
                     "attention included, and cannot end on a skipped layer")
    note = _sliding_window_note(config, PER_LAYER_ARCHITECTURE)
    if note:
        notes.append(note)
    return GGUFLayout(PER_LAYER_ARCHITECTURE, q, kv, ff, head_dim, per_layer=True, permute_qk=True, notes=tuple(notes))


def adjacent_pair_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Q or K projection rows (or their bias) reordered, head by head, from transformers' half-split RoPE
    order (dimension ``i`` rotates with ``i + head_dim/2``) to adjacent pairs (``2i`` with ``2i + 1``)."""
    head_dim = rows.shape[0] // num_heads
    halves = rows.reshape(num_heads, 2, head_dim // 2, *rows.shape[1:])
    return np.ascontiguousarray(halves.swapaxes(1, 2).reshape(rows.shape))


def rope_factors(model: Any, head_dim: int) -> tuple[float, np.ndarray]:
    """``(rope_theta, per-dimension frequency divisors)`` of the model's rotary embedding: llama.cpp divides
    the default frequency ``theta^(-2i/d)`` by ``rope_freqs[i]``."""
    adapter = adapter_for(model)
    rotary = adapter.rotary_embedding(model)
    config = model.config
    params = config_value(config, "rope_parameters") or {}
    params = params.get("full_attention", params) if isinstance(params, dict) else {}
    rope_type = params.get("rope_type", (config_value(config, "rope_scaling") or {}).get("rope_type", "default"))
    theta = params.get("rope_theta", config_value(config, "rope_theta"))
    if theta is None:
        raise ModelError("model: config has no rope_theta")
    scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    if rope_type == "dynamic" or abs(scaling - 1.0) > ROPE_TOLERANCE:
        raise ModelError(f"model: its {rope_type} RoPE scaling (attention scaling {scaling:g}) has no counterpart "
                         "in this GGUF export (supported: default, linear, llama3)")
    inv_freq = rotary.inv_freq.detach().to("cpu", torch.float64).numpy()
    if inv_freq.shape != (head_dim // 2,):
        raise ModelError(f"model: rotary embedding covers {2 * inv_freq.shape[0]} of {head_dim} head dimensions; "
                         "llama.cpp's architectures here rotate the whole head")
    default = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return float(theta), default / inv_freq


def _tensor_name(kind: Any, suffix: str = "weight", bid: int | None = None) -> str:
    import gguf

    return gguf.TENSOR_NAMES[kind].format(bid=bid) + f".{suffix}"


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def _tied(model: Any) -> bool:
    adapter = adapter_for(model)
    head, embed = adapter.lm_head(model).weight, adapter.embeddings(model).weight
    return head is embed or (head.data_ptr() == embed.data_ptr() and head.shape == embed.shape)


def gguf_tensors(model: Any, layout: GGUFLayout) -> Iterator[tuple[str, np.ndarray, Any]]:
    """``(gguf name, float32 array, tensor kind)`` for every tensor of the file, in llama.cpp's usual order."""
    import gguf

    T = gguf.MODEL_TENSOR
    adapter = adapter_for(model)
    fold = adapter.gguf_folded_scales(model.config, layout.architecture)
    offset = np.float32(adapter.gguf_norm_offset)
    embed_scale, output_scale = fold.get("embed", 1.0), fold.get("output", 1.0)
    residual_scale = fold.get("residual", 1.0)
    scales = {"self_attn.q_proj": fold.get("query", 1.0), "self_attn.o_proj": residual_scale,
              "mlp.down_proj": residual_scale}
    yield _tensor_name(T.TOKEN_EMBD), _numpy(adapter.embeddings(model).weight) * np.float32(embed_scale), T.TOKEN_EMBD
    yield _tensor_name(T.OUTPUT_NORM), _numpy(adapter.final_norm(model).weight) + offset, T.OUTPUT_NORM
    if not _tied(model) or embed_scale != output_scale:  # a tied head is written on its own when scales differ
        yield _tensor_name(T.OUTPUT), _numpy(adapter.lm_head(model).weight) * np.float32(output_scale), T.OUTPUT
    projection_kinds = {"self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V,
                        "self_attn.o_proj": T.ATTN_OUT, "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP,
                        "mlp.down_proj": T.FFN_DOWN}
    head_norm_kinds = {"q_norm": T.ATTN_Q_NORM, "k_norm": T.ATTN_K_NORM}
    for bid, layer in enumerate(adapter.decoder_layers(model)):
        heads = {"self_attn.q_proj": layout.num_q_heads[bid], "self_attn.k_proj": layout.num_kv_heads[bid]}
        # an empty block is skipped whole by deci (0 heads, 0 feed-forward length), its norm included
        empty = {"self_attn": layout.num_kv_heads[bid] == 0, "mlp": layout.intermediate[bid] == 0}
        for attribute, kind_name in adapter.gguf_layer_norms():
            kind = getattr(T, kind_name)
            if empty.get(_NORM_BLOCK.get(kind_name, "")):
                continue
            yield _tensor_name(kind, bid=bid), _numpy(getattr(layer, attribute).weight) + offset, kind
        # a block empty in the model that the layout writes as one zero head or channel (plan_layout's notes)
        stand_in = {"self_attn": not empty["self_attn"] and layer.self_attn.k_proj.out_features == 0,
                    "mlp": not empty["mlp"] and layer.mlp.gate_proj.out_features == 0}
        for name, linear in adapter.projections(layer).items():
            block = name.split(".")[0]
            if empty[block]:
                continue
            kind = projection_kinds[name]
            if stand_in[block]:
                width = layout.head_dim if block == "self_attn" else 1
                output = name.endswith(("o_proj", "down_proj"))
                shape = (linear.out_features, width) if output else (width, linear.in_features)
                yield _tensor_name(kind, bid=bid), np.zeros(shape, dtype=np.float32), kind
                continue
            for suffix, param in (("weight", linear.weight), ("bias", linear.bias)):
                if param is None:
                    continue
                array = _numpy(param)
                if scales.get(name, 1.0) != 1.0:
                    array = array * np.float32(scales[name])
                if layout.permute_qk and name in heads:
                    array = adjacent_pair_rows(array, heads[name])
                yield _tensor_name(kind, suffix, bid), array, kind
        for norm in () if empty["self_attn"] else (*adapter.unpruned_attention_parameters(),
                                                   *adapter.sliced_attention_norms()):
            yield (_tensor_name(head_norm_kinds[norm], bid=bid), _numpy(getattr(layer.self_attn, norm).weight) + offset,
                   head_norm_kinds[norm])


def _encode(array: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """The array in the file's type: vectors stay float32; matrices take ``outtype`` (q8_0 falls back to f16
    for rows that are not a whole number of 32-value blocks)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or outtype == "f32":
        return array.astype(np.float32), Q.F32
    if outtype == "f16" or (outtype == "q8_0" and array.shape[-1] % Q8_0_BLOCK):
        return array.astype(np.float16), Q.F16
    qtype = Q.BF16 if outtype == "bf16" else Q.Q8_0
    return gguf.quants.quantize(array, qtype), qtype


def _file_type(outtype: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype])


def _arch_enum(name: str) -> Any:
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ModelError(f"the installed gguf package does not know llama.cpp's `{name}` architecture")


# llama.cpp's vocabulary loader (llama-vocab.cpp) sets token attributes by general.name: for a name holding one of
# these words it looks the tokens up and stops ("unordered_map::at") on a vocabulary without one of them.
NAME_KEYED_TOKENS = {("phi-3", "phi3"): ("</s>", "<unk>", "<s>", "<|endoftext|>")}


def llama_cpp_safe_name(name: str, tokenizer: Any) -> str:
    """``name``, with a word llama.cpp keys a vocabulary rule on (:data:`NAME_KEYED_TOKENS`) spaced out (``phi3`` →
    ``phi 3``) when the vocabulary lacks a token that rule looks up, so that llama.cpp can load the file."""
    vocab = tokenizer.get_vocab()
    for words, tokens in NAME_KEYED_TOKENS.items():
        if any(w in name.lower() for w in words) and not all(t in vocab for t in tokens):
            for word in words:
                name = re.sub(re.escape(word), lambda m: m.group(0)[:3] + " " + m.group(0)[3:].lstrip("-"), name,
                              flags=re.IGNORECASE)
    return name


def build_writer(model: Any, tokenizer: Any, outtype: str = "f16", name: str | None = None) -> tuple[Any, GGUFExport]:
    """A ``gguf.GGUFWriter`` holding the whole file (metadata and tensors), not yet written, and its summary."""
    import gguf

    from layerprune import __version__

    if outtype not in OUTTYPES:
        raise InvalidInputError(f"--outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    if tokenizer is None:
        raise ModelError("model: it has no tokenizer, which a GGUF file must carry")
    adapter = adapter_for(model)
    check_consistency(model)
    layout = plan_layout(model)
    config = model.config
    arch = layout.architecture
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(llama_cpp_safe_name(name, tokenizer))
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab_size = int(adapter.embeddings(model).weight.shape[0])
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(int(config_value(config, "max_position_embeddings")))
    writer.add_embedding_length(int(config_value(config, "hidden_size")))
    writer.add_block_count(len(layout.num_q_heads))
    if layout.per_layer:
        writer.add_head_count(list(layout.num_q_heads))
        writer.add_head_count_kv(list(layout.num_kv_heads))
        writer.add_feed_forward_length(list(layout.intermediate))
    else:
        writer.add_head_count(layout.num_q_heads[0])
        writer.add_head_count_kv(layout.num_kv_heads[0])
        writer.add_feed_forward_length(layout.intermediate[0])
    # The head size is written, never derived: llama.cpp's default is hidden / layer 0's head count.
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_layer_norm_rms_eps(float(config_value(config, "rms_norm_eps")))
    theta, factors = rope_factors(model, layout.head_dim)
    writer.add_rope_freq_base(theta)
    extra: list[tuple[str, np.ndarray, Any]] = []
    if np.allclose(factors, factors[0], rtol=ROPE_TOLERANCE, atol=0.0):
        if abs(factors[0] - 1.0) > ROPE_TOLERANCE:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(factors[0]))
    elif gguf.MODEL_TENSOR.ROPE_FREQS in gguf.MODEL_TENSORS[_arch_enum(arch)]:
        extra.append((_tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS), factors.astype(np.float32),
                      gguf.MODEL_TENSOR.ROPE_FREQS))
    else:
        raise ModelError(f"model: llama.cpp's `{arch}` architecture has no per-dimension RoPE factors (rope_freqs)")
    if arch == adapter.gguf_architecture:
        for key, value in adapter.gguf_metadata(config).items():
            if isinstance(value, (list, tuple)):
                writer.add_array(f"{arch}.{key}", list(value))
            elif isinstance(value, int):
                writer.add_uint32(f"{arch}.{key}", value)
            else:
                writer.add_float32(f"{arch}.{key}", float(value))
    writer.add_string("layerprune.version", __version__)
    writer.add_string("layerprune.family", adapter.name)

    description, fields = tokenizer_fields(tokenizer, vocab_size)
    for key, value, vtype, sub_type in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)

    allowed = set(gguf.MODEL_TENSORS[_arch_enum(arch)])
    types: dict[str, int] = {}
    count = 0
    for tensor_name, array, kind in [*gguf_tensors(model, layout), *extra]:
        if kind not in allowed:
            raise ModelError(f"model: llama.cpp's `{arch}` architecture has no tensor {tensor_name}")
        fault_point("gguf-tensor")
        data, qtype = _encode(array, outtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        count += 1
    summary = GGUFExport(Path(), layout, outtype, count, 0, description, types)
    return writer, summary


def check_output_path(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """The absolute output path, or InvalidInputError for one that cannot be written (checked before any work)."""
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise InvalidInputError(f"--out {out} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise InvalidInputError(f"--out {out} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise InvalidInputError(f"--out {out}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"--out {out}: folder {path.parent} is not writable")
    return path


def write_gguf(model: Any, tokenizer: Any, out: str | os.PathLike[str], outtype: str = "f16",
               overwrite: bool = False, name: str | None = None) -> GGUFExport:
    """Write ``model`` (dense or pruned, any supported family) and its tokenizer as one GGUF file."""
    path = check_output_path(out, overwrite)
    writer, summary = build_writer(model, tokenizer, outtype, name=name)
    with atomic_output_file(path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except OSError as err:
            if err.errno is not None:
                raise
            # numpy's tofile reports a short write ("N requested and M written") without an errno: on a regular
            # file that is a full disk or a file-size limit
            raise OSError(errno.ENOSPC, f"{err}: the disk or the file-size limit is full", str(path)) from None
        finally:
            writer.close()
    summary.path = path
    summary.bytes = path.stat().st_size
    return summary


def export_gguf(model_path: str | os.PathLike[str], out: str | os.PathLike[str], outtype: str = "f16",
                overwrite: bool = False, dtype: torch.dtype = torch.float32) -> GGUFExport:
    """Load a pruned or plain model folder (or ``smollm2-135m``) in ``dtype`` and write it as GGUF."""
    from layerprune.models import load_model, resolve_model

    if outtype not in OUTTYPES:
        raise InvalidInputError(f"--outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    check_output_path(out, overwrite)
    resolved = resolve_model(model_path)
    if not isinstance(resolved, Path):
        raise ModelError(f"--model {model_path}: not a local folder; export reads a pruned or plain model folder")
    if resolved.is_file():
        raise ModelError(f"--model {model_path} is already a GGUF file; export reads a pruned or plain model folder")
    model, tokenizer = load_model(resolved, dtype=dtype)
    return write_gguf(model, tokenizer, out, outtype, overwrite=overwrite, name=resolved.name)


__all__ = ["OUTTYPES", "PER_LAYER_ARCHITECTURE", "GGUFExport", "GGUFLayout", "adjacent_pair_rows", "build_writer",
           "check_output_path", "export_gguf", "gguf_tensors", "plan_layout", "rope_factors", "write_gguf"]
