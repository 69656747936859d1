"""EveProcessor: <image> expansion, image preprocessing, count checks, save/load, and the model end to end."""

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from PIL import Image
from transformers import AutoProcessor

from eve_vlm.errors import ImageTokenMismatchError
from eve_vlm.model import EveProcessor


def make_processor(model):
    cfg = model.config
    return EveProcessor.from_parts(
        tokenizer=tiny_tokenizer(),
        vision_config=cfg.vision_config,
        image_size=cfg.image_size,
        num_image_tokens=cfg.num_image_tokens,
    )


def picture(seed=0, size=(40, 52)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def test_expands_each_image_marker_and_runs_the_model():
    model = tiny_model(projector="ldp")
    processor = make_processor(model)
    model.config.image_token_id = processor.image_token_id
    assert processor.image_token_id not in tiny_tokenizer().get_vocab().values()  # a new special token
    batch = processor(
        ["<image> what is the colour", "describe <image> and <image>"],
        images=[picture(0), picture(1), picture(2)],
    )
    n = model.config.num_image_tokens
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [n, 2 * n]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["attention_mask"].sum(1).tolist() == [4 + n, 2 + 2 * n]
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def no_pad_tokenizer(with_pad_in_vocab: bool):
    """A word-level tokenizer that declares no pad token (as Llama 3.x and Mistral ship)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "<|im_end|>", "<unk>", "what", "is", "the", "colour"]
    words += ["<|finetune_right_pad_id|>"] if with_pad_in_vocab else []
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    assert tok.pad_token is None
    return tok


@pytest.mark.parametrize("with_pad_in_vocab", [True, False])
def test_a_tokenizer_without_pad_token_gets_one_and_batches_pad(tmp_path, with_pad_in_vocab):
    model = tiny_model()
    processor = EveProcessor.from_parts(
        tokenizer=no_pad_tokenizer(with_pad_in_vocab),
        vision_config=model.config.vision_config,
        image_size=model.config.image_size,
        num_image_tokens=model.config.num_image_tokens,
    )
    expected = "<|finetune_right_pad_id|>" if with_pad_in_vocab else "<|im_end|>"
    assert processor.tokenizer.pad_token == expected
    batch = processor(["what is the colour", "what"])
    assert batch["attention_mask"].sum(1).tolist() == [4, 1]
    assert batch["input_ids"][1, 1:].tolist() == [processor.tokenizer.convert_tokens_to_ids(expected)] * 3
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).tokenizer.pad_token == expected


def test_marker_count_mismatch_raises():
    processor = make_processor(tiny_model())
    with pytest.raises(ImageTokenMismatchError, match="2 '<image>' marker"):
        processor("<image> <image> what", images=[picture()])
    with pytest.raises(ImageTokenMismatchError, match="0 '<image>' marker"):
        processor("what", images=[picture()])


def test_normalisation_follows_the_tower():
    for tower, mean in (("clip", 0.48145466), ("siglip", 0.5), ("dinov2", 0.485)):
        processor = make_processor(tiny_model(tower=tower))
        assert processor.image_processor.image_mean[0] == pytest.approx(mean)
    flat = Image.new("RGB", (32, 32), (255, 255, 255))
    values = make_processor(tiny_model(tower="siglip"))("<image>", images=[flat])["pixel_values"]
    assert torch.allclose(values, torch.ones_like(values))  # (1 - 0.5) / 0.5


def test_save_and_load_with_auto_processor(tmp_path):
    model = tiny_model()
    processor = make_processor(model)
    processor.save_pretrained(tmp_path)
    model.config.image_token_id = processor.image_token_id
    model.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, EveProcessor)
    assert loaded.num_image_tokens == processor.num_image_tokens
    assert loaded.image_token_id == processor.image_token_id
    text = "<image> what is in this image"
    a, b = processor(text, images=[picture()]), loaded(text, images=[picture()])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_system_prompt_is_saved_and_used_for_image_turns_only(tmp_path):
    model = tiny_model()
    processor = make_processor(model)
    processor.system_prompt = "Be brief."
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.system_prompt == "Be brief."
    template = loaded.tokenizer.apply_chat_template
    with_image = loaded.chat_prompt("<image>\nwhat colour")
    assert with_image == template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nwhat colour"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    text_only = loaded.chat_prompt("what colour")
    assert "Be brief." not in text_only  # a text-only turn renders as for the base LLM
    assert text_only == template(
        [{"role": "user", "content": "what colour"}], tokenize=False, add_generation_prompt=True
    )
    assert "Other." in loaded.chat_prompt("<image>\nwhat colour", system="Other.")
    assert make_processor(model).system_prompt is None


def test_chat_prompt_renders_a_question_after_its_history_with_the_image_turns_system_prompt():
    processor = make_processor(tiny_model())
    processor.system_prompt = "Be brief."
    history = [
        {"role": "user", "content": "<image>\ndescribe it"},
        {"role": "assistant", "content": "a red circle"},
    ]
    rendered = processor.chat_prompt("what colour", history=history)
    assert rendered == processor.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "what colour"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    text_history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    assert "Be brief." not in processor.chat_prompt("what colour", history=text_history)
    assert history[0] == {"role": "user", "content": "<image>\ndescribe it"}  # not modified


def byte_level_tokenizer():
    """A byte-level BPE (as GPT-2, Qwen, Llama-3, SmolLM2) whose merges cross "<image>"'s characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["write <image> or <img> in html", "what is the image"] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tok.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    return tok


@pytest.mark.parametrize("reload", [False, True])
def test_a_literal_image_marker_in_text_tokenises_as_the_base_llm(tmp_path, reload):
    """Review item 22: the text path reads a typed "<image>" as the base LLM's tokenizer does; it never
    becomes the placeholder, and no image is asked for."""
    model = tiny_model()
    base = byte_level_tokenizer()
    processor = EveProcessor.from_parts(
        tokenizer=byte_level_tokenizer(),
        vision_config=model.config.vision_config,
        image_size=model.config.image_size,
        num_image_tokens=model.config.num_image_tokens,
    )
    if reload:
        processor.save_pretrained(tmp_path)
        processor = AutoProcessor.from_pretrained(tmp_path)
    texts = ["<|im_start|>write <image> in html<|im_end|>", "the <image>"]
    ids = [processor(text, return_tensors=None, padding=False)["input_ids"][0] for text in texts]
    expected = base(texts, add_special_tokens=False)["input_ids"]
    assert ids == expected
    assert all(processor.image_token_id not in row for row in expected)
    assert processor.text_tokenizer.decode(ids[0]) == texts[0]
    assert processor.text_tokenizer.pad_token == processor.tokenizer.pad_token
    padded = processor(texts)
    assert padded["attention_mask"].sum(1).tolist() == [len(e) for e in expected]
    # With an image the marker is the placeholder, as before.
    with_image = processor(["the <image>"], images=[picture()])["input_ids"][0]
    assert (with_image == processor.image_token_id).sum() == model.config.num_image_tokens
