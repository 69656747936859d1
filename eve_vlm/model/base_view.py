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
        child_dicts: The child dicts (`_modules`) of the originals of the copies and of the replaced layers.
        children: Their `(name, child)` items when the view was built.
    """

    module: nn.Module | None
    child_dicts: list[dict] = field(default_factory=list)
    children: list[tuple] = field(default_factory=list)

    def current(self) -> bool:
        """Whether every original module still holds the children the view was built from (one tuple
        comparison per copied or replaced module: modules compare by identity)."""
        return [tuple(d.items()) for d in self.child_dicts] == self.children


class _NoView(Exception):
    """A module whose call would not run the view's children (an instance-level forward, a compiled call)."""


def base_view(language_model: nn.Module) -> BaseView:
    """The view of `language_model` without LoRA and EVF layers (see the module docstring)."""
    child_dicts: list[dict] = []

    def view(module: nn.Module) -> nn.Module:
        if "forward" in module.__dict__ or module.__dict__.get("_compiled_call_impl") is not None:
            raise _NoView
        if isinstance(module, BaseTunerLayer):
            child_dicts.append(module._modules)
            return view(module.base_layer)
        if isinstance(module, ElasticVisionFFN):
            child_dicts.append(module._modules)
            return view(module.language_ffn)
        children = {name: None if child is None else view(child) for name, child in module._modules.items()}
        if all(children[name] is child for name, child in module._modules.items()):
            return module
        child_dicts.append(module._modules)
        clone = copy.copy(module)
        clone.__dict__["_modules"] = children
        if isinstance(clone, EvfDecoderLayer):
            clone.__class__ = type(module).__bases__[1]  # `evf_layer_class`: (EvfDecoderLayer, family class)
        return clone

    try:
        root = view(language_model)
        return BaseView(root, child_dicts, [tuple(d.items()) for d in child_dicts])
    except _NoView:
        return BaseView(None)
