"""LoRA on the language model (stage 2), kept unmerged so the base weights stay intact.

Adapters are injected in place with peft (`inject_adapter_in_model`), so the LM stays the transformers model it
was and the Eve model saves and loads them as ordinary weights (`EveConfig.lora` records the peft options).
For the elastic guarantee the Eve model runs batches without any image with the adapters switched off
(`adapters_disabled`), which computes exactly the base layer. `merge_lora` folds them into dense weights for
users who want one dense model (`eve export --merge`).
"""

from __future__ import annotations

from contextlib import contextmanager

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from eve_vlm.errors import ConfigError


def add_lora(language_model: nn.Module, options: dict) -> LoraConfig:
    """Injects LoRA adapters into `language_model` in place.

    Args:
        options: `peft.LoraConfig` fields, e.g. `{"r": 16, "lora_alpha": 32, "target_modules": [...]}`.
    """
    try:
        config = LoraConfig(**options)
    except TypeError as err:
        raise ConfigError(f"Bad LoRA option: {err}. See peft.LoraConfig for the accepted fields.") from None
    try:
        inject_adapter_in_model(config, language_model)
    except ValueError as err:
        raise ConfigError(f"LoRA could not be added: {err}") from None
    return config


def lora_layers(module: nn.Module) -> list[BaseTunerLayer]:
    """Every peft tuner layer under `module`."""
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(layers: list[BaseTunerLayer]):
    """Runs the layers without their adapters, restoring each adapter weight's `requires_grad` afterwards
    (peft's `enable_adapters` would otherwise make every active adapter trainable again)."""
    params = [
        p for layer in layers for name in layer.adapter_layer_names for p in getattr(layer, name).parameters()
    ]
    flags = [p.requires_grad for p in params]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def merge_lora(module: nn.Module) -> int:
    """Merges every LoRA adapter into its base layer and puts the plain layer back. Returns how many."""
    merged = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, BaseTunerLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(
                module.get_submodule(parent_name) if parent_name else module, attr, child.get_base_layer()
            )
            merged += 1
    return merged
