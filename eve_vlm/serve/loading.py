"""Loading a saved Eve model for serving, chat and evaluation: the model in eval mode on a chosen device at a
chosen dtype (see `eve_vlm/device.py`), its processor, and the CPU thread count."""

from __future__ import annotations

import torch

from eve_vlm.device import device_map, torch_dtype
from eve_vlm.errors import ConfigError
from eve_vlm.model import EveForConditionalGeneration, EveProcessor
from eve_vlm.model.folder import check_eve_folder
from eve_vlm.quantize import check_quantize, quantize_int8


def set_threads(threads: int | None) -> None:
    """`torch.set_num_threads` (None keeps torch's default, one per core)."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}.")
    torch.set_num_threads(threads)


def load_model(
    model_dir: str, dtype: str | None = None, device: str | None = None, quantize: str | None = None
) -> tuple[EveForConditionalGeneration, EveProcessor]:
    """The model (eval mode) and processor saved in `model_dir`.

    Args:
        dtype: `float32` (None), `bfloat16` or `float16`; the EVF routers stay fp32.
        device: A torch device (`cpu`, `cuda:1`, ...) to load on, `auto` to spread the model over the GPUs
            (`device_map="auto"`), or None for `cuda` when a GPU is visible, else `cpu`.
        quantize: None, or `int8` (`eve_vlm.quantize.quantize_int8`: CPU, float32).

    Raises:
        ConfigError: Unknown dtype, or a device this machine lacks. `check_eve_folder`'s errors for a folder
            that is not an Eve model.
    """
    torch_type, where = torch_dtype(dtype), device_map(device)
    check_quantize(quantize, torch_type, where)
    check_eve_folder(model_dir)
    model = EveForConditionalGeneration.from_pretrained(model_dir, dtype=torch_type, device_map=where)
    if quantize is not None:
        quantize_int8(model)
    return model.eval(), EveProcessor.from_pretrained(model_dir)
