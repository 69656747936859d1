"""Unmerged LoRA on the LM: off for batches without images (elastic guarantee), on with images, saved and
loaded as ordinary weights, mergeable into a dense model."""

import copy

import pytest
import torch
from conftest import image_batch, text_batch, tiny_model
from transformers import AutoModelForCausalLM

from eve_vlm.errors import ConfigError
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


def mixed_batch(config, text_len=10):
    """A left-padded batch: row 0 text-only, row 1 an image prompt; plus each row alone."""
    image_ids, pixels = image_batch(config, batch=1)
    text_ids = text_batch(batch=1, length=text_len)
    width = image_ids.shape[1]
    pad = width - text_len
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), text_ids], dim=1), image_ids])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask, pixels, text_ids, image_ids


def with_evf(model):
    model.add_elastic_vision_ffns("alternate")
    torch.manual_seed(5)
    for evf in model.evf_layers.values():
        torch.nn.init.normal_(evf.router.weight, std=1.0)
        for p in evf.vision_ffns.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_text_row_in_a_mixed_batch_is_the_base_llms(family):
    """Regression: LoRA was switched per batch, so a text-only row sharing a batch with an image row ran with
    the adapters on. It must get the base LLM's output; the image row keeps LoRA."""
    model, base = lora_model(family)
    ids, mask, pixels, text_ids, image_ids = mixed_batch(model.config)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        text_alone = base(input_ids=text_ids).logits
        image_alone = model(input_ids=image_ids, pixel_values=pixels).logits
    pad = ids.shape[1] - text_ids.shape[1]
    torch.testing.assert_close(mixed[0, pad:], text_alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], image_alone[0], rtol=1e-5, atol=1e-5)
    # The adapters are back on, and the same for every layer, after the mixed batch.
    assert all(not layer.disable_adapters for layer in lora_layers(model.language_model))


def test_mixed_batch_generation_with_lora_and_evf():
    """Greedy decoding of a mixed batch on a LoRA + EVF model: the text row's tokens are the base LLM's,
    the image row's equal the image request alone."""
    model, base = lora_model()
    model = with_evf(model)
    ids, mask, pixels, text_ids, image_ids = mixed_batch(model.config)
    out = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8, do_sample=False
    )
    solo_text = base.generate(input_ids=text_ids, max_new_tokens=8, do_sample=False)
    solo_image = model.generate(input_ids=image_ids, pixel_values=pixels, max_new_tokens=8, do_sample=False)
    width = ids.shape[1]
    assert out[0, width:].tolist() == solo_text[0, text_ids.shape[1] :].tolist()
    assert out[1, width:].tolist() == solo_image[0, width:].tolist()
    # LoRA matters for the text path here: with it on, the text row's answer would differ.
    with torch.no_grad():
        lora_on = model.language_model(input_ids=text_ids).logits
        plain = base(input_ids=text_ids).logits
    assert not torch.allclose(lora_on, plain, atol=1e-3)


@pytest.mark.parametrize("grad", [True, False])
def test_nested_adapters_disabled_keeps_the_outer_state(grad):
    from eve_vlm.model.lora import adapters_disabled

    model, _ = lora_model()
    layers = lora_layers(model.language_model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.set_grad_enabled(grad):
        with adapters_disabled(layers):
            with adapters_disabled(layers[:2]):
                pass
            assert all(layer.disable_adapters for layer in layers)
        assert not any(layer.disable_adapters for layer in layers)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_the_cached_lora_layers_follow_structure_changes_and_copies():
    """The model finds its LoRA layers once per structure: adding EVF layers, merging and copying keep the
    text path the base LLM's and the image path with LoRA."""
    model, base = lora_model()
    ids, (image_ids, pixels) = text_batch(), image_batch(model.config)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)  # the cache is built
        copied = copy.deepcopy(model)
        assert torch.equal(copied(input_ids=ids).logits, base(input_ids=ids).logits)
        assert all(not layer.disable_adapters for layer in lora_layers(model.language_model))
        with_lora = model(input_ids=image_ids, pixel_values=pixels).logits
        model.add_elastic_vision_ffns("alternate", combine="hard")
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        torch.testing.assert_close(model(input_ids=image_ids, pixel_values=pixels).logits, with_lora)
        copied.merge_lora()
        assert not lora_layers(copied.language_model)
        assert not torch.equal(copied(input_ids=ids).logits, base(input_ids=ids).logits)  # LoRA merged in


def test_dora_is_refused():
    model = tiny_model()
    with pytest.raises(ConfigError, match="DoRA"):
        model.add_lora(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    assert model.config.lora is None and not lora_layers(model.language_model)


def checkpointed_and_not(model, trainable, **batch):
    """Loss and gradients of one training step with and without activation checkpointing."""
    results = []
    for checkpointing in (False, True):
        copy_ = copy.deepcopy(model).train()
        for name, p in copy_.named_parameters():
            p.requires_grad_(any(part in name for part in trainable))
        if checkpointing:
            copy_.activation_checkpointing_enable()
        loss = copy_(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in copy_.named_parameters() if p.grad is not None}))
    return results


@pytest.mark.parametrize("evf", [False, True])
def test_activation_checkpointing_recomputes_under_the_forwards_lora_switch(evf):
    """A text-only batch runs with LoRA off, a mixed batch with LoRA per row; the recomputation in backward
    runs after the forward returned and must switch LoRA the same way (torch stops on a recomputation that
    differs, or gradients would be wrong). The text path trains here (the last layer's down_proj), as when a
    recipe trains part of the LLM next to LoRA."""
    model, _ = lora_model()
    if evf:
        with_evf(model)
    trainable = ["lora_", "layers.3.mlp.down_proj", "router", "vision_ffns"]
    ids, mask, pixels, text_ids, _ = mixed_batch(model.config)
    batches = [{"input_ids": text_ids}, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}]
    for batch in batches:
        (loss, grads), (loss_ckpt, grads_ckpt) = checkpointed_and_not(model, trainable, **batch)
        assert torch.equal(loss, loss_ckpt)
        assert grads.keys() == grads_ckpt.keys() and any("lora_" in name for name in grads) == (
            "pixel_values" in batch
        )
        for name in grads:
            torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6)


def test_reentrant_checkpointing_is_refused():
    model, _ = lora_model()
    with pytest.raises(ConfigError, match="use_reentrant"):
        model.activation_checkpointing_enable({"use_reentrant": True})


def test_training_batches_are_single_modality():
    """`eve train` keeps image rows and text-only rows in separate micro-batches (LLaVA's modality grouping)."""
    from eve_vlm.data.collator import ModalityLengthGroupedSampler

    is_image = [i % 3 == 0 for i in range(23)]
    sampler = ModalityLengthGroupedSampler(list(range(23)), is_image, batch_size=4, seed=1)
    order = list(sampler)
    for start in range(0, len(order), 4):
        assert len({is_image[i] for i in order[start : start + 4]}) == 1


def test_a_graph_kept_for_a_second_backward_is_recomputed_under_the_same_switch():
    model, _ = lora_model()
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or "layers.3.mlp.down_proj" in name)
    model.activation_checkpointing_enable()
    ids = text_batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    first = model.language_model.model.layers[3].mlp.down_proj.weight.grad.clone()
    loss.backward()  # recomputes every layer again
    torch.testing.assert_close(model.language_model.model.layers[3].mlp.down_proj.weight.grad, 2 * first)
