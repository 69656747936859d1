"""Loading a saved Eve model for serving and chat: the model in eval mode at a chosen dtype, its processor,
and the CPU thread count."""

from __future__ import annotations

import torch

from eve_vlm.errors import ConfigError
from eve_vlm.model import EveForConditionalGeneration, EveProcessor
from eve_vlm.model.folder import check_eve_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_threads(threads: int | None) -> None:
    """`torch.set_num_threads` (None keeps torch's default, one per core)."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}.")
    torch.set_num_threads(threads)


def load_model(model_dir: str, dtype: str = "float32") -> tuple[EveForConditionalGeneration, EveProcessor]:
    """The model (eval mode) and processor saved in `model_dir`.

    Raises:
        ConfigError: Unknown dtype. `check_eve_folder`'s errors for a folder that is not an Eve model.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    check_eve_folder(model_dir)
    model = EveForConditionalGeneration.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
    return model, EveProcessor.from_pretrained(model_dir)
