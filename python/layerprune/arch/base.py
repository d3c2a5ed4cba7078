"""What the pipeline knows about a model family, in one object: the adapter.

Every family layerprune prunes has the Llama layout: ``model.model.layers[l]`` with ``input_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm`` and ``mlp.{gate,up,down}_proj``, a final
``model.model.norm`` and ``lm_head``. Families differ in which projections carry biases, in per-head q/k
norms, in settings their config must keep (rope scaling, sliding window) and in the class they are
saved as. A family file (``arch/<family>.py``) defines one :class:`FamilyAdapter` named ``ADAPTER``;
nothing outside ``arch/`` names a family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from layerprune.arch.budget import LayerShape, lm_head_flops
from layerprune.arch.modeling_layerprune import OUTPUT_BIAS_KEY, install_empty_blocks, split_fused_projections  # OUTPUT_BIAS_KEY: o_proj / down_proj carry a bias
from layerprune.errors import ModelError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Keyword arguments a decoder layer receives from its model that the attention needs again.
LAYER_KWARGS = ("attention_mask", "position_embeddings", "position_ids")



def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for a transformers config or a ``config.json`` dict; None counts as missing."""
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None else value


def head_dim(config: Any) -> int:
    """Head size: ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``."""
    explicit = config_value(config, "head_dim")
    if explicit:
        return int(explicit)
    return int(config_value(config, "hidden_size")) // int(config_value(config, "num_attention_heads"))


@dataclass(frozen=True)
class LayerGeometry:
    """One decoder layer's widths, read from its weights (so it holds after pruning)."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def ratio(self) -> int:
        """Query heads per KV head; 0 for an empty attention (no head left)."""
        return self.num_q_heads // self.num_kv_heads if self.num_kv_heads else 0


@dataclass(frozen=True)
class FamilyAdapter:
    """One model family.

    ``architectures`` / ``model_type``: how a config names the family. ``transformers_prefix``: the
    transformers class prefix (``Qwen2`` for ``Qwen2Config`` / ``Qwen2ForCausalLM``); the pruned model is
    saved as ``Layerprune<prefix>ForCausalLM`` with model_type ``layerprune_<model_type>``.
    ``kept_settings``: config keys a saved pruned model must carry unchanged (checked by the tests).
    ``qkv_bias`` / ``o_bias``: None reads ``attention_bias`` from the config; a bool is fixed by the
    family. ``qk_norm``: per-head ``q_norm``/``k_norm`` of shape ``[head_dim]`` in every attention;
    ``qk_norm_whole``: ``q_norm``/``k_norm`` over the whole q and k projections, whose rows go with their heads.

    llama.cpp (GGUF export): ``gguf_architecture`` is the family's own llama.cpp architecture;
    ``gguf_rope_adjacent_pairs`` says whether that architecture's RoPE rotates adjacent pairs of a head
    (GGML "normal" RoPE, so Q/K rows are permuted from transformers' half-split order on export);
    ``gguf_biases`` are the projections whose biases its loader reads; ``gguf_full_width_attention``: its
    loader fixes q_proj / o_proj at hidden x hidden, so it cannot hold removed query heads;
    ``gguf_norm_offset`` is added to every norm weight on export; ``gguf_per_layer``: whether ``deci`` runs the
    family when its layers have different widths.
    """

    name: str
    architectures: tuple[str, ...]
    model_type: str
    transformers_prefix: str
    kept_settings: tuple[str, ...] = ("rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
                                      "tie_word_embeddings", "max_position_embeddings")
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm: bool = False
    qk_norm_whole: bool = False  # q_norm / k_norm over the whole projections (OLMo-2): sliced with their heads
    description: str = ""
    gguf_architecture: str = "llama"
    gguf_rope_adjacent_pairs: bool = True
    gguf_biases: tuple[str, ...] = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
    gguf_full_width_attention: bool = False
    gguf_norm_offset: float = 0.0  # added to every norm weight (Gemma's norms scale by 1 + w; llama.cpp's by w)
    gguf_per_layer: bool = True  # deci can run it (per-layer widths); False: unequal widths are refused
    gguf_sliding_window: bool = False  # the family's own architecture implements its sliding window
    window_bos: bool = False  # the model needs BOS at the start of every evaluated window (Gemma's attention sink)
    plain_save_obstacle: str | None = None  # why even equal widths are saved with per-layer widths (None: they are not)

    # ---- names -------------------------------------------------------------------------------------

    @property
    def pruned_model_type(self) -> str:
        return f"layerprune_{self.model_type}"

    @property
    def pruned_architecture(self) -> str:
        return f"Layerprune{self.transformers_prefix}ForCausalLM"

    @property
    def pruned_config_class(self) -> str:
        return f"Layerprune{self.transformers_prefix}Config"

    # ---- config ------------------------------------------------------------------------------------

    def biases(self, config: Any) -> tuple[bool, bool, bool]:
        """(q/k/v biases, o_proj bias, MLP biases) of a model of this family."""
        attention = bool(config_value(config, "attention_bias", False))
        qkv = attention if self.qkv_bias is None else self.qkv_bias
        o = attention if self.o_bias is None else self.o_bias
        return qkv, o, bool(config_value(config, "mlp_bias", False))

    def projection_biases(self, config: Any) -> dict[str, bool]:
        """Whether each projection has a bias; ``OUTPUT_BIAS_KEY`` adds one to o_proj and down_proj."""
        qkv, o, mlp = self.biases(config)
        output = bool(config_value(config, OUTPUT_BIAS_KEY, False))
        return {"q_proj": qkv, "k_proj": qkv, "v_proj": qkv, "o_proj": o or output,
                "gate_proj": mlp, "up_proj": mlp, "down_proj": mlp or output}

    def layer_shape(self, config: Any, output_bias: bool = False) -> LayerShape:
        """The layer's budget shape from its config (two RMSNorms of ``hidden`` each). ``output_bias``:
        o_proj and down_proj will carry a bias (bias compensation), counted though never pruned."""
        try:
            hidden = int(config_value(config, "hidden_size"))
            heads = int(config_value(config, "num_attention_heads"))
            kv = int(config_value(config, "num_key_value_heads", heads))
            inter = int(config_value(config, "intermediate_size"))
            hd = head_dim(config)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"config: missing or non-integer {self.name} field ({exc})") from None
        qkv, o, mlp = self.biases(config)
        output_bias = output_bias or bool(config_value(config, OUTPUT_BIAS_KEY, False))
        down_bias_only = output_bias and not mlp  # a down_proj bias alone: a constant d parameters
        return LayerShape(hidden, heads, kv, hd, inter, qkv_bias=qkv, o_bias=o or output_bias, mlp_bias=mlp,
                          qk_norm=self.qk_norm, norm_params=2 * hidden + (hidden if down_bias_only else 0),
                          group_norm=self.qk_norm_whole)

    def num_layers(self, config: Any) -> int:
        return int(config_value(config, "num_hidden_layers"))

    def extra_params(self, config: Any) -> int:
        """Parameters outside the decoder layers: embeddings, ``lm_head`` unless tied, the final norm."""
        hidden = int(config_value(config, "hidden_size"))
        vocab = int(config_value(config, "vocab_size"))
        tied = bool(config_value(config, "tie_word_embeddings", False))
        return vocab * hidden * (1 if tied else 2) + hidden

    def extra_flops(self, config: Any) -> int:
        """FLOPs per token outside the decoder layers: ``lm_head`` (:func:`~layerprune.arch.budget.lm_head_flops`)."""
        return lm_head_flops(int(config_value(config, "hidden_size")), int(config_value(config, "vocab_size")))

    # ---- modules -----------------------------------------------------------------------------------

    def inner_model(self, model: Any) -> Any:
        """The decoder stack (``model.model``; a bare decoder model is its own)."""
        inner = getattr(model, "model", model)
        if getattr(inner, "layers", None) is None:
            raise ModelError(f"model: {type(model).__name__} has no model.layers (not a {self.name} causal LM)")
        return inner

    def decoder_layers(self, model: Any) -> list[Any]:
        """The decoder layers, each checked for the modules the pipeline uses. A fused projection (Phi-3's
        ``qkv_proj`` and ``gate_up_proj``) is first split in place into the separate ones the pipeline prunes
        (:func:`~layerprune.arch.modeling_layerprune.split_fused_projections`; the forward is unchanged)."""
        layers = list(self.inner_model(model).layers)
        for i, layer in enumerate(layers):
            if hasattr(layer, "self_attn") and hasattr(layer, "mlp"):
                split_fused_projections(layer, model.config)
            self._check_layer(layer, i)
        return layers

    def _check_layer(self, layer: Any, index: int) -> None:
        from torch import nn

        for sub in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, sub):
                raise ModelError(f"model.layers[{index}] ({type(layer).__name__}) has no `{sub}`: not a {self.name} layer")
        for block, names in ((layer.self_attn, ATTENTION_PROJECTIONS), (layer.mlp, MLP_PROJECTIONS)):
            for n in names:
                if not isinstance(getattr(block, n, None), nn.Linear):
                    raise ModelError(f"model.layers[{index}]: expected a Linear `{n}` (not a {self.name} layer)")

    def final_norm(self, model: Any) -> Any:
        return self.inner_model(model).norm

    def embeddings(self, model: Any) -> Any:
        return self.inner_model(model).embed_tokens

    def rotary_embedding(self, model: Any) -> Any:
        """The model's rotary embedding (``inv_freq``, ``attention_scaling``), shared by every layer."""
        rotary = getattr(self.inner_model(model), "rotary_emb", None)
        if rotary is None or getattr(rotary, "inv_freq", None) is None:
            raise ModelError(f"model: {type(model).__name__} has no model.rotary_emb.inv_freq (not a {self.name} model)")
        return rotary

    def lm_head(self, model: Any) -> Any:
        head = getattr(model, "lm_head", None)
        if head is None:
            raise ModelError(f"model: {type(model).__name__} has no lm_head (not a causal LM)")
        return head

    def projections(self, layer: Any) -> dict[str, Any]:
        """``{"self_attn.q_proj": Linear, ..., "mlp.down_proj": Linear}`` of one layer."""
        out = {f"self_attn.{n}": getattr(layer.self_attn, n) for n in ATTENTION_PROJECTIONS}
        out.update({f"mlp.{n}": getattr(layer.mlp, n) for n in MLP_PROJECTIONS})
        return out

    def layer_prefix(self, index: int) -> str:
        """Qualified module name of decoder layer ``index`` inside the causal LM."""
        return f"model.layers.{index}"

    def unpruned_attention_parameters(self) -> tuple[str, ...]:
        """Attention submodules that own parameters but are never sliced (shared across heads)."""
        return ("q_norm", "k_norm") if self.qk_norm else ()

    def sliced_attention_norms(self) -> dict[str, str]:
        """Attention norms sliced with their heads' rows: ``{"q_norm": "q_proj", "k_norm": "k_proj"}`` (OLMo-2's,
        over the whole projections), each by the rows of the projection it normalises; none for Llama."""
        return {"q_norm": "q_proj", "k_norm": "k_proj"} if self.qk_norm_whole else {}

    def geometry(self, model: Any, layer: Any) -> LayerGeometry:
        """Widths of one layer from its weights; ``head_dim`` from the config."""
        hd = head_dim(model.config)
        attn = layer.self_attn
        return LayerGeometry(attn.q_proj.out_features // hd, attn.k_proj.out_features // hd, hd,
                             layer.mlp.gate_proj.out_features)

    def set_widths(self, layer: Any, geometry: LayerGeometry) -> None:
        """Per-module attributes some transformers releases reshape with (newer ones infer from weights), after the
        layer's projections were cut to ``geometry``; a block left with no head or channel becomes empty
        (:func:`~layerprune.arch.modeling_layerprune.install_empty_blocks`)."""
        attn, mlp = layer.self_attn, layer.mlp
        attn.num_key_value_groups = geometry.ratio
        if hasattr(attn, "num_heads"):
            attn.num_heads = geometry.num_q_heads
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = geometry.num_kv_heads
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = geometry.intermediate
        install_empty_blocks(layer)

    # ---- scales a family puts around the Llama layout -------------------------------------------------

    def logits_divisor(self, config: Any) -> float:
        """``d`` in ``logits = lm_head(norm(h)) / d`` (1 for Llama; Granite's ``logits_scaling``)."""
        return 1.0

    def logit_softcap(self, config: Any) -> float | None:
        """``c`` in ``logits = c · tanh(z / c)`` (Gemma 2's ``final_logit_softcapping``); None: no cap."""
        return None

    def final_logits(self, config: Any, logits: Any) -> Any:
        """The model's logits from ``lm_head``'s output ``z``, element by element (so a block of vocabulary rows at a
        time gives the same): ``z / d`` (:meth:`logits_divisor`), then ``c · tanh(· / c)`` (:meth:`logit_softcap`)."""
        divisor, cap = self.logits_divisor(config), self.logit_softcap(config)
        logits = logits / divisor if divisor != 1.0 else logits
        return logits if cap is None else (logits / cap).tanh() * cap

    def scale_embeddings(self, model: Any, embedded: Any) -> Any:
        """What the embedding module returns for rows looked up from its weight: the rows times its ``embed_scale``
        where it has one (Gemma's √hidden, inside transformers' scaled embedding), else the rows."""
        scale = getattr(self.embeddings(model), "embed_scale", None)
        return embedded if scale is None else embedded * scale.to(embedded.dtype).to(embedded.device)

    def gguf_metadata(self, config: Any) -> dict[str, Any]:
        """GGUF keys (without the architecture prefix) that this family's own llama.cpp architecture reads for its
        scales, caps and windows, e.g. ``{"logit_scale": 16.0}`` (a float is written as float32, an int as uint32,
        a list as an array); none for Llama."""
        return {}

    def gguf_folded_scales(self, config: Any, architecture: str) -> dict[str, float]:
        """Scales written into the weights for llama.cpp's ``architecture`` where it has no key for them, or computes
        them otherwise: ``embed`` (token embeddings), ``output`` (lm_head), ``query`` (q_proj rows and biases),
        ``residual`` (o_proj and down_proj). Missing keys mean 1."""
        return {}

    def gguf_layer_norms(self) -> tuple[tuple[str, str], ...]:
        """(layer attribute, ``gguf.MODEL_TENSOR`` name) of each norm of a decoder layer."""
        return (("input_layernorm", "ATTN_NORM"), ("post_attention_layernorm", "FFN_NORM"))

    # ---- the decoder block, written out (layer importance) -------------------------------------------

    def branch_output(self, layer: Any, projection: str, out: Any) -> Any:
        """The branch's output (:meth:`attention_block`, :meth:`mlp_block`) from its output projection's
        (``"o_proj"`` or ``"down_proj"``): the same for the Llama layout; Granite scales it, Gemma norms it."""
        return out

    def attention_block(self, layer: Any, hidden: Any, kwargs: Mapping[str, Any]) -> Any:
        """``Attn(input_layernorm(x))`` without the residual, with the kwargs the model passed the layer."""
        out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **{k: kwargs.get(k) for k in LAYER_KWARGS})
        return out[0] if isinstance(out, tuple) else out

    def mlp_block(self, layer: Any, hidden: Any) -> Any:
        """``MLP(post_attention_layernorm(h))`` without the residual."""
        return layer.mlp(layer.post_attention_layernorm(hidden))

    def layer_forward(self, layer: Any, hidden: Any, kwargs: Mapping[str, Any], *, skip_attn: bool = False,
                      skip_mlp: bool = False) -> Any:
        """Pre-norm residual block: ``h = x + Attn(LN1 x)``; ``y = h + MLP(LN2 h)``; either branch skippable."""
        if not skip_attn:
            hidden = hidden + self.attention_block(layer, hidden, kwargs)
        if not skip_mlp:
            hidden = hidden + self.mlp_block(layer, hidden)
        return hidden


__all__ = ["ATTENTION_PROJECTIONS", "LAYER_KWARGS", "MLP_PROJECTIONS", "OUTPUT_BIAS_KEY", "FamilyAdapter", "LayerGeometry",
           "config_value", "head_dim"]
