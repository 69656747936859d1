"""The base view: a text-only inference call runs the base LLM's own modules (no LoRA wrapper, no EVF), sharing
the Eve model's weights, and falls back to the switched path wherever a view would not be the model."""

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from conftest import image_batch, text_batch, tiny_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModelForCausalLM

from eve_vlm.model.base_view import base_view
from eve_vlm.model.decoder_layer import EvfDecoderLayer
from eve_vlm.model.evf import ElasticVisionFFN
from eve_vlm.model.lora import lora_layers


def stage3(family="llama"):
    """A tiny stage-3 model (LoRA that matters, EVF in every second layer) and its base LM."""
    model = tiny_model(family)
    base = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    base.load_state_dict(model.language_model.state_dict())
    model.add_lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    torch.manual_seed(3)
    for layer in lora_layers(model.language_model):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    model.add_elastic_vision_ffns("alternate", allocation="img_gbpr")
    return model.eval(), base


def count_calls(modules):
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in modules]
    return calls, handles


def test_a_text_only_inference_call_runs_the_base_modules_and_gives_the_base_logits(family):
    model, base = stage3(family)
    keys = list(model.state_dict())
    lora = lora_layers(model.language_model)
    calls, handles = count_calls([*lora, *model.evf_layers.values()])
    ids = text_batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert calls == []  # neither a LoRA wrapper nor an EVF ran
        assert torch.equal(logits, base(input_ids=ids).logits)
        image_ids, pixels = image_batch(model.config)
        model(input_ids=image_ids, pixel_values=pixels)
        assert len(calls) > 0  # an image request still runs them
    for handle in handles:
        handle.remove()
    view = model.__dict__["_base_view"].module
    assert not any(isinstance(m, (BaseTunerLayer, ElasticVisionFFN, EvfDecoderLayer)) for m in view.modules())
    originals = {p.data_ptr() for p in model.language_model.parameters()}
    assert {p.data_ptr() for p in view.parameters()} <= originals
    assert list(model.state_dict()) == keys  # the view is not part of the model
    generated = model.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, base.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False))


def test_training_and_recorded_calls_keep_the_switched_path():
    model, base = stage3()
    ids = text_batch()
    lora = lora_layers(model.language_model)
    calls, handles = count_calls(lora)
    out = model(input_ids=ids)  # gradients enabled
    torch.testing.assert_close(out.logits, base(input_ids=ids).logits, rtol=0, atol=0)
    assert len(calls) > 0
    with_gradients = len(calls)
    with torch.no_grad():
        model(input_ids=ids, output_routing=True)
    assert len(calls) > with_gradients
    assert "_base_view" not in model.__dict__
    for handle in handles:
        handle.remove()


def test_a_weight_changed_in_place_is_seen_and_a_replaced_module_rebuilds_the_view():
    model, base = stage3()
    ids = text_batch()
    with torch.no_grad():
        model(input_ids=ids)
        first = model.__dict__["_base_view"]
        head = model.language_model.lm_head.weight
        head.mul_(2.0)
        base.lm_head.weight.mul_(2.0)  # tied: the embedding too, in both
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        assert model.__dict__["_base_view"] is first
        layer = model.language_model.model.layers[1]
        replacement = nn.Linear(
            layer.self_attn.o_proj.in_features, layer.self_attn.o_proj.out_features, bias=False
        )
        replacement.weight.copy_(layer.self_attn.o_proj.weight * 0.5)
        layer.self_attn.o_proj = replacement
        base.model.layers[1].self_attn.o_proj.weight.mul_(0.5)
        assert not first.current()
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        assert model.__dict__["_base_view"] is not first
        model.merge_lora()  # structure changes drop the view
        assert "_base_view" not in model.__dict__


def test_no_view_is_built_over_hooked_or_compiled_modules():
    model, base = stage3()
    add_hook_to_module(model.language_model.model.layers[2].self_attn, ModelHook())
    assert base_view(model.language_model).module is None
    ids = text_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    other, _ = stage3()
    other.language_model.model.layers[0].mlp.compile()
    assert base_view(other.language_model).module is None


def test_expert_outputs_under_autocast_come_back_in_the_input_dtype():
    """Unweighted expert outputs (straight-through at inference) are bf16 under autocast; the EVF returns the
    dtype of its fp32 input, as it did when every output was multiplied by an fp32 weight."""
    model = tiny_model()
    model.add_elastic_vision_ffns("alternate", allocation="img_gbpr", combine="straight_through")
    model.eval()
    ids, pixels = image_batch(model.config)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        generated = model.generate(
            input_ids=ids[:1], pixel_values=pixels[:1], max_new_tokens=3, do_sample=False
        )
        logits = model(input_ids=ids, pixel_values=pixels).logits
    assert generated.shape[1] == ids.shape[1] + 3 and torch.isfinite(logits.float()).all()
