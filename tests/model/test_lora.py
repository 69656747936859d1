"""Unmerged LoRA on the LM: off for batches without images (elastic guarantee), on with images, saved and
loaded as ordinary weights, mergeable into a dense model."""

import copy

import torch
from conftest import image_batch, text_batch, tiny_model
from transformers import AutoModelForCausalLM

from eve_vlm.model import EveForConditionalGeneration
from eve_vlm.model.lora import lora_layers


def lora_model(family="llama"):
    model = tiny_model(family)
    base = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    base.load_state_dict(model.language_model.state_dict())
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    torch.manual_seed(3)
    for layer in lora_layers(model.language_model):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)  # B starts at 0: make LoRA matter
    return model.eval(), base


def test_text_only_is_base_and_images_use_lora(family):
    model, base = lora_model(family)
    assert len(lora_layers(model.language_model)) == 3 * 4
    ids = text_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        image_ids, pixels = image_batch(model.config)
        with_lora = model(input_ids=image_ids, pixel_values=pixels).logits
        plain = tiny_model(family)
        without = plain(input_ids=image_ids, pixel_values=pixels).logits
    assert not torch.allclose(with_lora, without, atol=1e-3)


def test_text_only_step_keeps_lora_trainability():
    model, _ = lora_model()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model(input_ids=text_batch(), labels=text_batch())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert any("lora_A" in n and flag for n, flag in flags.items())


def test_decoding_after_an_image_prompt_keeps_lora_on():
    model, _ = lora_model()
    ids, pixels = image_batch(model.config, batch=1)
    cached = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    uncached = model.generate(
        input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)


def test_lora_save_load_and_merge(tmp_path):
    model, base = lora_model()
    model.save_pretrained(tmp_path)
    loaded = EveForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.lora["r"] == 4
    ids, pixels = image_batch(model.config)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits, expected)
        merged = copy.deepcopy(loaded)
        assert merged.merge_lora() == 12 and merged.config.lora is None
        assert not lora_layers(merged.language_model)
        torch.testing.assert_close(
            merged(input_ids=ids, pixel_values=pixels).logits, expected, rtol=1e-4, atol=1e-4
        )
        texts = text_batch()
        assert not torch.allclose(merged(input_ids=texts).logits, base(input_ids=texts).logits, atol=1e-3)
