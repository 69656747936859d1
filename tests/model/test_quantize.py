"""`--quantize int8`: which layers become dynamic int8 ones, what stays as loaded, and what it refuses."""

import pytest
import torch
from conftest import image_batch, text_batch, tiny_model
from torch import nn

from eve_vlm.errors import ConfigError
from eve_vlm.quantize import check_quantize, quantize_int8


def stage3():
    model = tiny_model()
    model.add_lora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    model.add_elastic_vision_ffns("alternate", allocation="img_gbpr")
    return model.eval()


def test_int8_replaces_the_linear_layers_and_keeps_routers_embeddings_and_head():
    model = stage3()
    ids, pixels = image_batch(model.config)
    text = text_batch()
    with torch.no_grad():
        image_ref, text_ref = model(input_ids=ids, pixel_values=pixels).logits, model(input_ids=text).logits
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    ffn_out = ("down_proj", "fc2", "down_proj.base_layer")
    kept = [n for n in linears if "lora_" in n or n == "language_model.lm_head" or n.endswith(ffn_out)]
    assert any(n.endswith("down_proj.base_layer") for n in kept)  # LoRA on the FFN: its base stays
    replaced = quantize_int8(model)
    assert replaced == len(linears) - len(kept) > 0
    assert [n for n, m in model.named_modules() if type(m) is nn.Linear] == kept
    routers = [evf.router for evf in model.evf_layers.values()]
    assert routers and all(r.weight.dtype == torch.float32 and isinstance(r, nn.Linear) for r in routers)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic) for m in model.modules()) == replaced
    with torch.no_grad():
        image_out, text_out = model(input_ids=ids, pixel_values=pixels).logits, model(input_ids=text).logits
    torch.testing.assert_close(image_out, image_ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(text_out, text_ref, atol=0.05, rtol=0.05)
    assert not torch.equal(text_out, text_ref)  # a quantised text path is not the base LLM's
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize(
    ("dtype", "device", "message"),
    [(torch.bfloat16, "cpu", "leave --dtype at float32"), (torch.float32, "cuda:0", "use --device cpu")],
)
def test_int8_needs_float32_on_the_cpu(dtype, device, message):
    with pytest.raises(ConfigError, match=message):
        check_quantize("int8", dtype, device)
    check_quantize(None, dtype, device)
