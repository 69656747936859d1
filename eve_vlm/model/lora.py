"""LoRA on the language model (stage 2), kept unmerged so the base weights stay intact.

Adapters are injected in place with peft (`inject_adapter_in_model`), so the LM stays the transformers model it
was and the Eve model saves and loads them as ordinary weights (`EveConfig.lora` records the peft options).
For the elastic guarantee the Eve model runs text-only sequences with the adapters off: a batch without any
image with every adapter switched off (`adapters_disabled`), a batch mixing text-only and image sequences with
the adapters applied per row (`adapters_per_row`, peft's mixed-batch forward with `"__base__"` for the text
rows). Both compute exactly the base layer for the text rows. `merge_lora` folds them into dense weights for
users who want one dense model (`eve export --merge`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from eve_vlm.errors import ConfigError


def add_lora(language_model: nn.Module, options: dict) -> LoraConfig:
    """Injects LoRA adapters into `language_model` in place.

    Args:
        options: `peft.LoraConfig` fields, e.g. `{"r": 16, "lora_alpha": 32, "target_modules": [...]}`.

    Raises:
        ConfigError: A bad option, or DoRA (`use_dora`): the per-sequence text path (`adapters_per_row`) needs
            peft's mixed-batch forward, which DoRA layers do not have.
    """
    if options.get("use_dora"):
        raise ConfigError(
            "DoRA (use_dora) is not supported: a batch mixing text-only and image sequences switches the "
            "adapters per sequence with peft's mixed-batch forward, which DoRA lacks. Use plain LoRA."
        )
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
def adapters_disabled(layers: list[BaseTunerLayer], flags_only: bool = False):
    """Runs the layers without their adapters, then puts each layer back as it was (on or off) and restores
    each adapter weight's `requires_grad` (peft's `enable_adapters` would otherwise make every active adapter
    trainable again). Nested uses are safe: an inner one leaves the layers off for the outer one.

    With gradients disabled (inference), or with `flags_only` (the recomputation of a checkpointed layer, which
    only has to compute what its forward computed), only the switch that peft's forward reads
    (`disable_adapters`) is set and put back: the `requires_grad` bookkeeping of `enable_adapters` costs about 30
    times more (8 ms per forward for the 105 LoRA layers of a SmolLM2-135M stage-2 model).
    """
    if flags_only or not torch.is_grad_enabled():
        # `object.__setattr__`: the flag is a plain bool, and `nn.Module.__setattr__`'s checks for parameters,
        # buffers and submodules cost ~10 us per layer, twice per layer and forward.
        was_disabled = [layer.disable_adapters for layer in layers]
        for layer in layers:
            object.__setattr__(layer, "_disable_adapters", True)
        try:
            yield
        finally:
            for layer, disabled in zip(layers, was_disabled, strict=True):
                object.__setattr__(layer, "_disable_adapters", disabled)
        return
    params = [
        p for layer in layers for name in layer.adapter_layer_names for p in getattr(layer, name).parameters()
    ]
    flags = [p.requires_grad for p in params]
    was_enabled = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, enabled in zip(layers, was_enabled, strict=True):
            layer.enable_adapters(enabled)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


@contextmanager
def adapters_per_row(layers: list[BaseTunerLayer], active: torch.Tensor):
    """Runs the layers with their adapter on the rows where `active` (B,) is True and off (exactly the base
    layer) on the others, through peft's mixed-batch forward (`adapter_names`, `"__base__"` = base layer).

    Each layer must be called on inputs whose first dimension is the B rows; one that is not (a layer inside
    a module that regroups tokens) raises `ConfigError` rather than applying the adapter to the wrong rows.
    """
    flags = [bool(a) for a in active.tolist()]
    handles = []

    def pass_adapter_names(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if x.shape[0] != len(flags):
            raise ConfigError(
                f"LoRA layer {type(module).__name__} got inputs with {x.shape[0]} rows in a batch of "
                f"{len(flags)} sequences, so its adapter cannot be switched per sequence; run text-only and "
                "image sequences in separate batches."
            )
        names = module.active_adapters
        if len(names) != 1:
            raise ConfigError(f"Per-sequence LoRA needs exactly one active adapter, found {names}.")
        return args, {**kwargs, "adapter_names": [names[0] if f else BASE_ADAPTER for f in flags]}

    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(pass_adapter_names, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


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
