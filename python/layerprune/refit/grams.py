"""Gram matrices of every decoder layer's output-projection inputs, from one forward pass of the dense model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from layerprune.arch import adapter_for
from layerprune.refit.lstsq import InputGram


@contextmanager
def output_projection_hooks(layers: Sequence[torch.nn.Module], sinks: Sequence[Mapping[str, Any]]) -> Iterator[None]:
    """While active, the o_proj and down_proj input of ``layers[l]`` goes to ``sinks[l]["o_proj"].update`` /
    ``sinks[l]["down_proj"].update`` on each forward call."""

    def collect(sink: Any):
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            sink.update(args[0])

        return hook

    handles: list[Any] = []
    try:
        for layer, sink in zip(layers, sinks):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(collect(sink["o_proj"])))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(collect(sink["down_proj"])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def observe_output_projection_inputs(model: torch.nn.Module, ids: torch.Tensor, sinks: Sequence[Mapping[str, Any]], *,
                                     micro_batch: int = 8, desc: str = "statistics", progress: bool = True) -> None:
    """Run ``ids`` ``[n, T]`` through the model in micro-batches (no gradients), handing every layer's o_proj
    and down_proj input to ``sinks[l]["o_proj"].update`` / ``sinks[l]["down_proj"].update``. The model is only read."""
    device = next(model.parameters()).device
    with output_projection_hooks(adapter_for(model).decoder_layers(model), sinks), torch.no_grad():
        for start in tqdm(range(0, ids.shape[0], micro_batch), desc=desc, disable=not progress, leave=False):
            adapter_for(model).inner_model(model)(input_ids=ids[start:start + micro_batch].to(device), use_cache=False)


def empty_grams(layer: torch.nn.Module, device: torch.device | str | None = None) -> dict[str, InputGram]:
    """``{"o_proj": InputGram, "down_proj": InputGram}`` of one decoder layer, empty, sized to the inputs, on
    ``device`` (default: where the layer's projections are, so that a model on CUDA keeps its Grams there)."""
    if device is None:
        device = layer.self_attn.o_proj.weight.device
    return {"o_proj": InputGram.empty(layer.self_attn.o_proj.in_features, device=device),
            "down_proj": InputGram.empty(layer.mlp.down_proj.in_features, device=device)}


def output_projection_grams(model: torch.nn.Module, ids: torch.Tensor, *, micro_batch: int = 8,
                            progress: bool = True) -> list[dict[str, InputGram]]:
    """Per layer ``{"o_proj": InputGram, "down_proj": InputGram}`` of the dense model on ``ids`` ``[n, T]``.

    ``o_proj``'s input is the attention output (heads as blocks of ``head_dim`` columns), ``down_proj``'s the
    gated intermediate. One forward pass in micro-batches; the model is only read. Data-parallel: ``ids`` are
    this rank's samples and the Grams are summed over the ranks. The Grams are on the model's device.
    """
    grams = [empty_grams(layer) for layer in adapter_for(model).decoder_layers(model)]
    observe_output_projection_inputs(model, ids, grams, micro_batch=micro_batch, desc="refit statistics",
                                     progress=progress)
    InputGram.all_reduce([stats for layer_grams in grams for stats in layer_grams.values()])
    return grams


__all__ = ["empty_grams", "observe_output_projection_inputs", "output_projection_grams", "output_projection_hooks"]
