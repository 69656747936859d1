"""`EveDecoderLayer`: a pre-norm decoder layer whose FFN is an Elastic Vision FFN, and the stage-3 conversion.

transformers' decoder layers call `self.mlp(hidden_states)` with no other argument, so an FFN cannot see which
tokens are image tokens. Rather than patch those classes, stage 3 replaces each chosen decoder layer by an
`EveDecoderLayer` built from the *same* submodules (`input_layernorm`, `self_attn`, `post_attention_layernorm`,
`mlp`, under the same names, so parameter names do not change) with the same forward, plus two keyword
arguments that transformers' decoder passes down untouched through `**kwargs`:

- `image_mask` (B, T) bool: which positions hold image tokens (design decision 3), and `has_image` (B,) bool:
  which sequences hold an image anywhere, the KV cache included. Because they are forward arguments, gradient
  checkpointing replays them on recompute, and during KV-cache decoding `image_mask` covers only the new (text)
  tokens while `has_image` keeps image requests on the routed path; `token_mask` (B, T) bool, False at padding
  (from the 2-D `attention_mask`): padding takes the language FFN and is never routed.
- `routing_recorder`: a `RoutingRecorder` the top model creates per forward to collect each EVF layer's aux
  loss and routing statistics, so the decoder loop keeps returning a plain tensor.

Supported: families whose decoder layer is exactly the Llama pre-norm block (Llama/SmolLM2, Qwen2, Qwen3,
Mistral, ...). Other layouts raise `ConfigError` at conversion instead of silently computing something else.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from eve_vlm.errors import ConfigError
from eve_vlm.model.configuration import EvfConfig, resolve_placement
from eve_vlm.model.evf import ElasticVisionFFN, EVFOutput

PRE_NORM_BLOCK = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})


class RoutingRecorder:
    """Collects the `EVFOutput` of every EVF layer during one forward pass.

    Only the first record per layer is kept, so a gradient-checkpointing recompute does not overwrite it.
    """

    def __init__(self) -> None:
        self.outputs: dict[int, EVFOutput] = {}

    def record(self, layer_idx: int, output: EVFOutput) -> None:
        self.outputs.setdefault(layer_idx, output)


class EveDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block `x + attn(norm(x))`, then `h + evf(norm(h), image_mask)`.

    Args:
        layer_idx: Index of the layer in the decoder (used as the key of its routing statistics).
        input_layernorm, self_attn, post_attention_layernorm: The original layer's submodules.
        mlp: The `ElasticVisionFFN` that owns the original FFN as expert 0.
    """

    def __init__(
        self,
        *,
        layer_idx: int,
        input_layernorm: nn.Module,
        self_attn: nn.Module,
        post_attention_layernorm: nn.Module,
        mlp: ElasticVisionFFN,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, D)
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_mask: torch.Tensor | None = None,  # (B, T) bool
        has_image: torch.Tensor | None = None,  # (B,) bool
        token_mask: torch.Tensor | None = None,  # (B, T) bool, False at padding
        routing_recorder: RoutingRecorder | None = None,
        **kwargs,  # the KV cache (`past_key_values`, or `cache` from transformers 5.24), `use_cache`, ...
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if image_mask is None:
            image_mask = torch.zeros(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        out = self.mlp(hidden_states, image_mask, has_image, token_mask)
        if routing_recorder is not None:
            routing_recorder.record(self.layer_idx, out)
        return residual + out.hidden_states


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM."""
    layers = getattr(language_model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"{type(language_model).__name__} has no `layers` ModuleList in its decoder; Eve needs a decoder-only "
            "LM whose layers have `.mlp` (Llama, Qwen2, Qwen3, Mistral, ...)."
        )
    return layers


def to_eve_layer(layer: nn.Module, layer_idx: int, evf: EvfConfig, hidden_size: int) -> EveDecoderLayer:
    """Builds an `EveDecoderLayer` around the submodules of a standard pre-norm decoder layer."""
    if isinstance(layer, EveDecoderLayer):
        raise ConfigError(f"Decoder layer {layer_idx} already has an Elastic Vision FFN.")
    children = {name for name, _ in layer.named_children()}
    if children != PRE_NORM_BLOCK:
        raise ConfigError(
            f"Decoder layer {layer_idx} ({type(layer).__name__}) has submodules {sorted(children)}; EVF insertion "
            f"supports the pre-norm block {sorted(PRE_NORM_BLOCK)} (Llama, Qwen2, Qwen3, Mistral families)."
        )
    options = {k: v for k, v in evf.to_dict().items() if k != "layers"}
    mlp = ElasticVisionFFN(language_ffn=layer.mlp, hidden_size=hidden_size, **options)
    param = next(layer.mlp.parameters())
    mlp.to(device=param.device)
    return EveDecoderLayer(
        layer_idx=layer_idx,
        input_layernorm=layer.input_layernorm,
        self_attn=layer.self_attn,
        post_attention_layernorm=layer.post_attention_layernorm,
        mlp=mlp,
    )


def insert_evf_layers(language_model: nn.Module, evf: EvfConfig) -> list[int]:
    """Replaces the decoder layers listed in `evf.layers` by `EveDecoderLayer`s, in place.

    The original FFN object becomes expert 0 (frozen), the vision FFNs start as its copies, so right after
    insertion with `combine="hard"` the model computes what it computed before.

    Returns:
        The indices of the converted layers.
    """
    layers = decoder_layers(language_model)
    resolve_placement(evf.layers, len(layers))  # range check
    hidden_size = int(language_model.config.hidden_size)
    for i in evf.layers:
        layers[i] = to_eve_layer(layers[i], i, evf, hidden_size).train(layers[i].training)
    return list(evf.layers)


def evf_modules(language_model: nn.Module) -> dict[int, ElasticVisionFFN]:
    """The EVF of each converted layer, by layer index."""
    return {
        i: layer.mlp
        for i, layer in enumerate(decoder_layers(language_model))
        if isinstance(layer, EveDecoderLayer)
    }
