"""Parameter accounting: total, trainable, and activated per token for text and for image tokens.

"Activated per token" counts the weights a token's forward pass multiplies by:
- a text token of a text-only request runs the base LLM (language FFNs only; no router, no vision FFN);
- an image token runs the vision tower and projector (shared by the image's tokens; `projector` includes the
  `vocabulary_mixture`'s logit scale when the model has one), and in each EVF layer
  the router plus `top_k` experts of the same size as the language FFN.
Embedding tables count fully (one row is read, but they are usually tied to the LM head).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass
class ParameterCounts:
    total: int
    trainable: int
    vision_tower: int
    projector: int
    language_model: int
    vision_ffns: int
    routers: int
    active_text_token: int
    active_image_token: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen = {id(p): p for p in module.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())


def parameter_counts(model) -> ParameterCounts:
    """Counts the parameters of an `EveForConditionalGeneration`."""
    evfs = model.evf_layers
    vision_ffns = sum(count(ffn) for evf in evfs.values() for ffn in evf.vision_ffns)
    extras = sum(count(evf) - count(evf.language_ffn) - count(evf.vision_ffns) for evf in evfs.values())
    per_expert = sum(count(evf.language_ffn) for evf in evfs.values())
    top_k = model.config.evf_config.top_k if evfs else 1
    lm = count(model.language_model)
    text = lm - vision_ffns - extras
    mixture = model.vocabulary_mixture
    projector = count(model.projector) + (0 if mixture is None else count(mixture))
    image = count(model.vision_tower) + projector + text + extras + (top_k - 1) * per_expert
    return ParameterCounts(
        total=count(model),
        trainable=count(model, trainable_only=True),
        vision_tower=count(model.vision_tower),
        projector=projector,
        language_model=lm,
        vision_ffns=vision_ffns,
        routers=extras,
        active_text_token=text,
        active_image_token=image,
    )
