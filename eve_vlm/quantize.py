"""`--quantize int8`: dynamic int8 quantisation of a loaded Eve model's linear layers for CPU inference.

torch's own dynamic quantisation (`torch.ao.quantization.quantize_dynamic`): each `nn.Linear` of the decoder
layers, the projector and the vision tower (the base layers under LoRA included) gets int8 weights, one scale
per output channel, and quantises its input per call. What stays as loaded: the embeddings and the `lm_head`
(often tied to them; quantising them costs the most accuracy), the FFNs' output projections (`down_proj`,
`fc2`: their inputs carry the largest activation outliers, and one scale per input tensor loses them - on
SmolLM2-135M the held-out perplexity goes from 44.9 to 174 with them quantised, to 52.8 without), norms, LoRA's
small adapter matrices (peft reads their weight's dtype), and the EVF routers, whose class is a subclass of
`nn.Linear` and so is not matched, keeping routing decisions in fp32.

Dynamic quantised kernels run on CPU only, on fp32 activations: the model must be on the CPU in float32. A
quantised text path is no longer the base LLM's: `eve eval language` reports its delta against the base LLM in
float32 (see the README's "Inference speed" for what it costs).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from eve_vlm.errors import ConfigError

QUANTIZE_NAMES = ("int8",)
KEPT_LINEAR_NAMES = (
    "down_proj",
    "fc2",
)  # FFN output projections (decoder families; CLIP/SigLIP/DINOv2 towers)


def check_quantize(quantize: str | None, dtype: torch.dtype, device: str) -> None:
    """Raises `ConfigError` unless `quantize` is None, or `int8` with float32 weights on the CPU."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_NAMES:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE_NAMES)}, got {quantize!r}.")
    if device != "cpu":
        raise ConfigError(
            f"--quantize {quantize} runs on the CPU only (torch's dynamic int8 kernels); use --device cpu."
        )
    if dtype != torch.float32:
        raise ConfigError(f"--quantize {quantize} quantises float32 weights; leave --dtype at float32.")


def kept_as_loaded(name: str) -> bool:
    """Whether the linear layer `name` stays unquantised: a LoRA adapter matrix, or an FFN output projection
    (also when LoRA wraps it: `...down_proj.base_layer`)."""
    parts = name.split(".")
    if parts[-1] == "base_layer":
        parts = parts[:-1]
    return "lora_" in name or parts[-1] in KEPT_LINEAR_NAMES


def quantize_int8(model: nn.Module) -> int:
    """Replaces, in place, the `nn.Linear` layers (exact class) of the model's decoder layers, projector and
    vision tower by dynamic int8 ones; returns how many were replaced."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    decoder = model.language_model.get_decoder()
    parts = [decoder.layers, model.projector, model.vision_tower]
    qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        # torch marks its eager-mode quantisation deprecated in favour of torchao (which transformers imports
        # at start-up whenever it is installed); the kernels are the ones torch ships and tests.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        replaced = 0
        for part in parts:
            names = {
                name
                for name, module in part.named_modules()
                if type(module) is nn.Linear and not kept_as_loaded(name)
            }
            quantize_dynamic(part, dict.fromkeys(names, qconfig), dtype=torch.qint8, inplace=True)
            replaced += len(names)
    return replaced
