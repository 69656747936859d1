"""Where a command runs a saved model: the `--device` and `--dtype` options of `eve chat`, `eve serve`,
`eve eval *` and `eve quickstart`, and the `from_pretrained` arguments they become.

- `--device`: `cpu`, `cuda`, `cuda:N`, `mps`, ... (loaded there with `device_map`), or `auto`
  (`device_map="auto"`: accelerate spreads the layers over the GPUs, then the CPU, never splitting a decoder
  layer). Default: `cuda` when a GPU is visible, else `cpu`.
- `--dtype`: `float32` (default), `bfloat16` or `float16`; EVF routers stay fp32 in any case.
- `--quantize int8`: dynamic int8 linear layers on the CPU (`eve_vlm/quantize.py`).

Building the parsers does not import torch; choosing a device does.
"""

from __future__ import annotations

import argparse

from eve_vlm.errors import ConfigError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICE_HELP = (
    "cpu, cuda, cuda:N, mps, or auto (device_map='auto': the layers spread over the GPUs, then the CPU); "
    "default cuda when a GPU is visible, else cpu"
)
DTYPE_HELP = "float32 (default), bfloat16 or float16"
QUANTIZE_HELP = (
    "int8: dynamic int8 quantisation of the linear layers for CPU inference (float32, --device cpu); the "
    "text path is then no longer the base LLM's"
)


def add_device_arguments(parser: argparse.ArgumentParser, *, suffix: str = "", quantize: bool = True) -> None:
    """Adds `--device` and `--dtype` (both default None: `default_device()` and float32) and, with `quantize`,
    `--quantize` (see `eve_vlm/quantize.py`); `suffix` is added to the help texts."""
    parser.add_argument("--device", default=None, help=DEVICE_HELP + suffix)
    parser.add_argument("--dtype", default=None, help=DTYPE_HELP + suffix)
    if quantize:
        parser.add_argument("--quantize", default=None, choices=("int8",), help=QUANTIZE_HELP + suffix)


def default_device() -> str:
    """`cuda` when torch sees a GPU, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_map(device: str | None) -> str:
    """The `from_pretrained(device_map=...)` value for `--device`: `auto`, or a checked torch device string.

    Raises:
        ConfigError: Not a device torch knows, or a CUDA device this machine does not have.
    """
    import torch

    if device is None:
        return default_device()
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use {DEVICE_HELP.split(';')[0]}.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu.")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(
                f"--device {device}: torch sees {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})."
            )
    return str(parsed)


def torch_dtype(dtype: str | None):
    """The torch dtype of `--dtype` (None: float32).

    Raises:
        ConfigError: Not one of `DTYPE_NAMES`.
    """
    import torch

    name = dtype or "float32"
    if name not in DTYPE_NAMES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}.")
    return getattr(torch, name)


def placement_like(model) -> dict:
    """`from_pretrained` arguments that load another model (a base LLM to compare with) where `model` is: its
    dtype, and its device, or `device_map="auto"` when `model` is spread over several devices."""
    spread = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
    return {"dtype": model.dtype, "device_map": "auto" if spread else str(model.device)}
