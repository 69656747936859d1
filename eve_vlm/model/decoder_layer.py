"""Stage-3 conversion: a decoder layer keeps its class and its forward; only its FFN becomes an Elastic Vision FFN.

transformers' decoder layers call `self.mlp(hidden_states)` with no other argument, so an FFN cannot see which
tokens are image tokens. For each chosen layer, stage 3 changes two things and nothing else:

- Composition: `layer.mlp` becomes an `ElasticVisionFFN` that owns the original FFN as its frozen expert 0
  (parameter names `mlp.language_ffn.*`, `mlp.vision_ffns.*`, `mlp.router.weight`; every other name is the
  family's own).
- The layer's class becomes `Evf<LayerClass>` (`evf_layer_class`), a subclass of the family's own class, made
  once per class, that only changes how the FFN is called: its `forward` takes one more keyword argument,
  `evf_routing` (`RoutingInputs`: image mask, `has_image`, padding mask, recorder), binds it to the layer's EVF
  for the duration of the call and runs the family's forward unchanged (pre-norm, sandwich norms, scaled
  residuals, whatever the family does). The existing layer object is re-classed in place, as
  `torch.nn.utils.parametrize` does, so its submodules and hooks stay as they are.

Why it holds:
- Gradient checkpointing: transformers checkpoints `partial(forward, **kwargs)` of the outermost layer class, so
  the recompute in backward calls this forward again with the same `evf_routing`, after the model's forward
  returned; the recorder keeps the first record per layer.
- KV-cache decoding: every step brings its own `evf_routing`; `has_image` keeps image requests routed while their
  new tokens are text.
- `isinstance(layer, LlamaDecoderLayer)` (transformers' `output_hidden_states` capture, FSDP auto-wrap by class)
  still holds. Tools keyed on class names (`device_map`'s `_no_split_modules`) get the `Evf<...>` names added.

Supported: every family whose decoder layers own an `mlp` module and call it on the hidden states (Llama,
Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3, OLMo2, Granite, ...); a layer without one raises `ConfigError`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig

from eve_vlm.errors import ConfigError
from eve_vlm.model.configuration import EvfConfig, resolve_placement
from eve_vlm.model.evf import ElasticVisionFFN, RoutingInputs, RoutingRecorder

__all__ = [
    "EvfDecoderLayer",
    "RoutingInputs",
    "RoutingRecorder",
    "decoder_layers",
    "evf_layer_class",
    "evf_modules",
    "insert_evf_layers",
]


class EvfDecoderLayer(nn.Module):
    """Mixed in front of a decoder-layer class by `evf_layer_class`: the family's forward, with the layer's EVF
    bound to `evf_routing` for the call.

    Attributes:
        evf_layer_idx: Index of the layer in the decoder (the key of its routing statistics).
    """

    evf_layer_idx: int
    mlp: ElasticVisionFFN

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, D)
        *args,
        evf_routing: RoutingInputs | None = None,
        **kwargs,  # the family's own arguments (attention mask, position embeddings, KV cache, ...)
    ):
        with self.mlp.bind(evf_routing, self.evf_layer_idx):
            return super().forward(hidden_states, *args, **kwargs)


@functools.cache
def evf_layer_class(layer_class: type[nn.Module]) -> type[nn.Module]:
    """`Evf<LayerClass>`, the subclass of `layer_class` that EVF layers take (one per class, made on first use)."""
    return type(
        f"Evf{layer_class.__name__}",
        (EvfDecoderLayer, layer_class),
        {
            "__module__": __name__,
            "__doc__": f"A `{layer_class.__name__}` whose `mlp` is an ElasticVisionFFN.",
        },
    )


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM."""
    layers = getattr(language_model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"{type(language_model).__name__} has no `layers` ModuleList in its decoder; Eve needs a decoder-only "
            "LM whose layers own an `mlp` (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3, OLMo2, Granite, ...)."
        )
    return layers


def check_convertible(layer: nn.Module, layer_idx: int) -> None:
    """Raises `ConfigError` unless `layer` is a plain decoder layer that owns an `mlp` module."""
    name = type(layer).__name__
    if isinstance(layer, EvfDecoderLayer):
        raise ConfigError(f"Decoder layer {layer_idx} ({name}) already has an Elastic Vision FFN.")
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module) or next(mlp.parameters(), None) is None:
        children = sorted(child for child, _ in layer.named_children())
        raise ConfigError(
            f"Decoder layer {layer_idx} ({name}) has no `mlp` FFN module (its submodules: {children}); EVF "
            "insertion replaces `layer.mlp` and needs a family whose decoder layers own one (Llama, Mistral, "
            "Qwen2, Qwen3, Gemma 2/3, Phi-3, OLMo2, Granite, ...). Use such a language model, or train this one "
            "without stage 3 (stages 1 and 2 work with any causal LM)."
        )


def check_family_convertible(text_config: PreTrainedConfig) -> None:
    """Raises `ConfigError` (as `check_convertible`) unless the causal LM `text_config` describes has decoder
    layers that own an `mlp`, from its config alone: the LM is built on the meta device, so no weight is
    allocated or read, and a stage 3 on an unsuitable family stops before its model is loaded."""
    with torch.device("meta"):
        language_model = AutoModelForCausalLM.from_config(text_config)
    check_convertible(decoder_layers(language_model)[0], 0)


def insert_evf_layers(language_model: nn.Module, evf: EvfConfig) -> list[int]:
    """Gives the decoder layers listed in `evf.layers` an Elastic Vision FFN, in place.

    The original FFN object becomes expert 0 (frozen), the vision FFNs start as its copies, so right after
    insertion with `combine="hard"` the model computes what it computed before. Every layer is checked before
    any is changed.

    Returns:
        The indices of the converted layers.
    """
    layers = decoder_layers(language_model)
    resolve_placement(evf.layers, len(layers))  # range check
    for i in evf.layers:
        check_convertible(layers[i], i)
    hidden_size = int(language_model.config.hidden_size)
    options = {k: v for k, v in evf.to_dict().items() if k != "layers"}
    for i in evf.layers:
        layer = layers[i]
        param = next(layer.mlp.parameters())
        mlp = ElasticVisionFFN(language_ffn=layer.mlp, hidden_size=hidden_size, **options)
        layer.mlp = mlp.to(device=param.device).train(layer.training)
        layer.__class__ = evf_layer_class(type(layer))
        layer.evf_layer_idx = i
    language_model._no_split_modules = no_split_modules(language_model)
    return list(evf.layers)


def no_split_modules(language_model: nn.Module) -> set[str]:
    """The language model's `_no_split_modules` with the `Evf<...>` layer classes it now holds, and without a
    layer class none of its layers has any more (accelerate's FSDP auto-wrap raises on a name it cannot find)."""
    names = set(getattr(language_model, "_no_split_modules", None) or ())
    present = {type(layer).__name__ for layer in decoder_layers(language_model)}
    originals = {cls.__name__ for layer in decoder_layers(language_model) for cls in type(layer).__mro__}
    return (names - (originals - present)) | present


def evf_modules(language_model: nn.Module) -> dict[int, ElasticVisionFFN]:
    """The EVF of each converted layer, by layer index."""
    return {
        i: layer.mlp
        for i, layer in enumerate(decoder_layers(language_model))
        if isinstance(layer, EvfDecoderLayer)
    }
