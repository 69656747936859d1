"""The base LLM inside an Eve language model, as a view that shares its weights.

A text-only request must get the base LLM's output. The Eve language model computes it by switching LoRA off
and letting each Elastic Vision FFN run its language FFN; at inference that costs a Python call per LoRA and
EVF layer on every decoding step (about 4% of a SmolLM2-135M text-only generation on a 2-core CPU). The view
runs the base LLM's own modules instead: the same module tree with every LoRA layer replaced by its base layer
and every `ElasticVisionFFN` by its language FFN. Only the modules on the way to a replaced one are shallow
copies (their own child dict, everything else shared: parameters, buffers, hooks, config); every other module
is the original object, so the view holds no weight of its own and sees every in-place change of a weight.
A copied `Evf<Layer>` decoder layer takes its family's class back, since its FFN is the language FFN again.

The view is what the language model was when it was built: `BaseView.current` checks that every child the
copies hold is still what the original holds (a module replaced afterwards, as `--quantize int8` does, makes
it stale), and the Eve model drops it whenever it adds or merges LoRA or adds EVF layers. No view is built
for a tree with instance-level forwards (accelerate's `device_map` hooks) or compiled modules, whose calls
would reach the original modules: those models keep the switched path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from eve_vlm.model.decoder_layer import EvfDecoderLayer
from eve_vlm.model.evf import ElasticVisionFFN

__all__ = ["BaseView", "base_view"]


@dataclass
class BaseView:
    """A view of a language model without its LoRA and EVF layers (`module`, None where none can be built).

    Attributes:
        module: The view's root, or None.
        slots: `(child dict of an original module, name, child)` for every child a copy or a replaced layer
            held when the view was built.
    """

    module: nn.Module | None
    slots: list[tuple[dict, str, nn.Module | None]] = field(default_factory=list)

    def current(self) -> bool:
        """Whether every original module still holds the children the view was built from."""
        return all(modules.get(name) is child for modules, name, child in self.slots)


class _NoView(Exception):
    """A module whose call would not run the view's children (an instance-level forward, a compiled call)."""


def base_view(language_model: nn.Module) -> BaseView:
    """The view of `language_model` without LoRA and EVF layers (see the module docstring)."""
    slots: list[tuple[dict, str, nn.Module | None]] = []

    def view(module: nn.Module) -> nn.Module:
        if "forward" in module.__dict__ or module.__dict__.get("_compiled_call_impl") is not None:
            raise _NoView
        if isinstance(module, BaseTunerLayer):
            slots.append((module._modules, "base_layer", module.base_layer))
            return view(module.base_layer)
        if isinstance(module, ElasticVisionFFN):
            slots.append((module._modules, "language_ffn", module.language_ffn))
            return view(module.language_ffn)
        children = {name: None if child is None else view(child) for name, child in module._modules.items()}
        if all(children[name] is child for name, child in module._modules.items()):
            return module
        slots.extend((module._modules, name, child) for name, child in module._modules.items())
        clone = copy.copy(module)
        clone.__dict__["_modules"] = children
        if isinstance(clone, EvfDecoderLayer):
            clone.__class__ = type(module).__bases__[1]  # `evf_layer_class`: (EvfDecoderLayer, family class)
        return clone

    try:
        return BaseView(view(language_model), slots)
    except _NoView:
        return BaseView(None)
