"""In training with labels, the LM head and the loss run only at the positions whose next token is a target:
the same loss and gradients as over every position, for a fraction of the head's cost."""

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, image_batch, tiny_vision_config
from test_families import FAMILIES
from torch.testing import assert_close
from transformers.loss.loss_utils import ForCausalLMLoss

from eve_vlm.model import EveConfig, EveForConditionalGeneration
from eve_vlm.model.modeling import label_positions


def build(family: str) -> EveForConditionalGeneration:
    torch.manual_seed(0)
    config = EveConfig(
        text_config=FAMILIES[family](),
        vision_config=tiny_vision_config("dinov2"),
        projector_type="mlp2x_gelu",
        image_token_id=IMAGE_TOKEN_ID,
    )
    return EveForConditionalGeneration(config)


def batch(model):
    """Two image rows with targets at different places (an answer each, one row right-padded)."""
    ids, pixels = image_batch(model.config, batch=2, text_len=10)
    labels = torch.full_like(ids, -100)
    start = model.config.num_image_tokens + 1
    labels[0, start + 3 : start + 5] = ids[0, start + 3 : start + 5]
    labels[1, start + 6 : start + 8] = ids[1, start + 6 : start + 8]
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)


def test_label_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    positions, targets = label_positions(labels)
    assert positions.tolist() == [0, 1, 2, 3]  # the tokens before 5, 6 / before 7, 8
    assert targets.tolist() == [[-100, 5, 6, -100], [7, -100, -100, 8]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])  # gemma2: soft-capped logits
def test_training_loss_uses_only_the_labelled_positions(family):
    model = build(family).train()
    inputs = batch(model)
    trainable = [p for n, p in model.named_parameters() if n.startswith("projector.")]

    head_lengths = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_lengths.append(args[0].shape[1])
    )
    out = model(**inputs)
    out.loss.backward()
    grads = [p.grad.clone() for p in trainable]
    model.zero_grad()
    hook.remove()

    # Reference: every position's logits (as transformers' LM computes them), the LM's own loss over them.
    full = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=0, output_routing=False)
    labels = inputs["labels"]
    assert full.logits.shape[1] == labels.shape[1]  # without labels, training mode keeps every position
    reference = ForCausalLMLoss(full.logits, labels, model.config.text_config.vocab_size)
    reference.backward()

    positions, _ = label_positions(labels)
    assert head_lengths == [len(positions)] and len(positions) < labels.shape[1]
    assert out.logits.shape[1] == len(positions)
    assert_close(out.loss, reference)
    assert_close(out.logits, full.logits[:, positions])
    for grad, p in zip(grads, trainable, strict=True):
        assert_close(grad, p.grad)


def test_eval_mode_and_explicit_logits_to_keep_keep_their_meaning():
    model = build("llama")
    inputs = batch(model)
    length = inputs["input_ids"].shape[1]
    assert model.eval()(**inputs).logits.shape[1] == length  # eval with labels: every position, as before
    model.train()
    del inputs["labels"]
    assert model(**inputs).logits.shape[1] == length
    assert model(**inputs, logits_to_keep=1).logits.shape[1] == 1
