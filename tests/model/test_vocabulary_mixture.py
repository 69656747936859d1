"""`VocabularyMixture` and the caption-word loss: image tokens as mixtures of the LM's word embeddings."""

import math

import pytest
import torch
from conftest import VOCAB, image_batch, text_batch, tiny_eve_config, tiny_model, tiny_text_config
from transformers import AutoModelForCausalLM

from eve_vlm.errors import ConfigError
from eve_vlm.model import EveConfig, EveForConditionalGeneration
from eve_vlm.model.vocabulary_mixture import VocabularyMixture, caption_word_loss, image_rows


def test_a_query_on_a_words_direction_with_a_sharp_scale_becomes_that_word():
    torch.manual_seed(0)
    table = torch.randn(50, 16)
    mixture = VocabularyMixture(init_scale=100.0)
    queries = 3.0 * table[[7, 21]].unsqueeze(0)  # (1, 2, D): the directions of words 7 and 21
    weights = mixture.mixture_weights(queries, table)
    assert weights.shape == (1, 2, 50)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2))
    assert weights.argmax(-1).tolist() == [[7, 21]]
    tokens, returned = mixture(queries, table)
    torch.testing.assert_close(returned, weights)
    torch.testing.assert_close(tokens, table[[7, 21]].unsqueeze(0), atol=1e-3, rtol=0)


def test_the_logit_scale_is_capped_at_100():
    table = torch.randn(10, 8)
    queries = torch.randn(1, 3, 8)
    capped = VocabularyMixture(init_scale=1e4).mixture_weights(queries, table)
    at_cap = VocabularyMixture(init_scale=100.0).mixture_weights(queries, table)
    torch.testing.assert_close(capped, at_cap)


def test_caption_word_loss_takes_each_targets_best_token_and_skips_ignored_and_rows_without_targets():
    # 3 images over a vocabulary of 5: images 0 and 1 in row 0, image 2 in row 1; row 1 has no target.
    weights = torch.tensor(
        [
            [[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.6, 0.1, 0.1, 0.1]],
            [[0.2, 0.2, 0.2, 0.2, 0.2], [0.5, 0.1, 0.1, 0.2, 0.1]],
            [[0.9, 0.025, 0.025, 0.025, 0.025], [0.9, 0.025, 0.025, 0.025, 0.025]],
        ]
    )
    labels = torch.tensor([[-100, 0, 1, 1, 4], [-100, -100, 4, -100, -100]])
    rows = torch.tensor([0, 0, 1])
    loss = caption_word_loss(weights, rows, labels, ignore_ids=[4])
    # image 0: targets 0, 1, 1 -> best weights 0.7, 0.6, 0.6; image 1: 0.5, 0.2, 0.2; image 2: none (4 ignored)
    image0 = -(math.log(0.7) + 2 * math.log(0.6)) / 3
    image1 = -(math.log(0.5) + 2 * math.log(0.2)) / 3
    assert loss.item() == pytest.approx((image0 + image1) / 2, rel=1e-6)


def test_caption_word_loss_pushes_down_the_words_only_other_rows_target():
    # row 0 targets word 0, row 1 word 1 (word 2 is both rows'): each image is penalised for the other's word.
    weights = torch.tensor(
        [
            [[0.8, 0.1, 0.1, 0.0], [0.1, 0.3, 0.5, 0.1]],
            [[0.1, 0.6, 0.2, 0.1], [0.05, 0.05, 0.8, 0.1]],
        ]
    )
    labels = torch.tensor([[0, 2], [1, 2]])
    loss = caption_word_loss(weights, torch.tensor([0, 1]), labels, ignore_ids=[])
    image0 = -(math.log(0.8) + math.log(0.5)) / 2 - math.log(1 - 0.3)
    image1 = -(math.log(0.6) + math.log(0.8)) / 2 - math.log(1 - 0.1)
    assert loss.item() == pytest.approx((image0 + image1) / 2, rel=1e-6)


def test_caption_word_loss_leaves_out_labels_outside_the_vocabulary():
    weights = torch.tensor([[[0.5, 0.25, 0.25]]])
    with_outside = caption_word_loss(weights, torch.tensor([0]), torch.tensor([[0, 7]]), ignore_ids=[])
    assert with_outside.item() == pytest.approx(-math.log(0.5), rel=1e-6)  # label 7 >= V = 3 is not a target


def test_the_mixture_weights_are_computed_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    table, queries = torch.randn(200, 16), torch.randn(1, 4, 16)
    mixture = VocabularyMixture(init_scale=100.0)
    plain = mixture.mixture_weights(queries, table)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = mixture.mixture_weights(queries, table)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain)


def test_caption_word_loss_without_any_target_is_zero_and_keeps_a_gradient_path():
    weights = torch.full((1, 2, 4), 0.25, requires_grad=True)
    loss = caption_word_loss(weights, torch.tensor([0]), torch.full((1, 3), -100), ignore_ids=[])
    loss.backward()
    assert loss.item() == 0.0
    assert weights.grad is not None


def test_image_tokens_are_mixtures_of_the_lms_input_embeddings_and_the_model_saves_and_loads(tmp_path):
    model = tiny_model(projector="ldp", vocabulary_mixture=True)
    with torch.no_grad():
        model.vocabulary_mixture.logit_scale.fill_(1.5)  # not the initial value, so a load must restore it
    input_ids, pixel_values = image_batch(model.config)
    out = model(input_ids=input_ids, pixel_values=pixel_values)
    queries = model.projector(model.vision_tower(pixel_values))
    table = model.get_input_embeddings().weight
    weights = model.vocabulary_mixture.mixture_weights(queries, table)
    torch.testing.assert_close(out.image_hidden_states, weights @ table)
    assert [name for name, _ in model.named_parameters() if "vocabulary" in name] == [
        "vocabulary_mixture.logit_scale"
    ]
    model.save_pretrained(tmp_path)
    loaded = EveForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.vocabulary_mixture is True
    assert loaded.vocabulary_mixture.logit_scale.item() == 1.5
    assert torch.equal(loaded(input_ids=input_ids, pixel_values=pixel_values).logits, out.logits)


def test_without_the_option_the_model_has_no_mixture_and_its_image_tokens_are_the_projectors():
    model = tiny_model(projector="ldp")
    _, pixel_values = image_batch(model.config)
    assert model.vocabulary_mixture is None
    assert torch.equal(
        model.get_image_features(pixel_values), model.projector(model.vision_tower(pixel_values))
    )


def test_text_only_requests_keep_the_base_llms_logits_with_the_mixture_on():
    model = tiny_model(projector="ldp", vocabulary_mixture=True)
    base = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    base.load_state_dict(model.language_model.state_dict())
    ids = text_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_the_mixture_reads_gemma3s_scaled_embeddings_as_the_lm_does():
    text = tiny_text_config("gemma3")
    base = tiny_eve_config()
    config = EveConfig(
        text_config=text,
        vision_config=base.vision_config,
        image_token_id=base.image_token_id,
        vocabulary_mixture=True,
    )
    model = EveForConditionalGeneration(config).eval()
    ids = torch.arange(VOCAB).unsqueeze(0)
    table = model.input_embedding_table()
    torch.testing.assert_close(table.unsqueeze(0), model.get_input_embeddings()(ids))
    assert not torch.allclose(table, model.get_input_embeddings().weight)  # sqrt(32) times the rows


def test_image_rows_follow_the_placeholders_row_by_row():
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0, 1:3] = mask[0, 5:7] = True  # row 0: two images of 2 tokens
    mask[2, 4:6] = True  # row 1: no image; row 2: one; row 3: none
    assert image_rows(mask, 2).tolist() == [0, 0, 2]


def test_the_training_loss_adds_the_weighted_caption_word_loss_and_eval_mode_does_not():
    model = tiny_model(projector="ldp", vocabulary_mixture=True, vocabulary_loss_coef=0.5).train()
    input_ids, pixel_values = image_batch(model.config, batch=2, images_per_row=2)
    labels = input_ids.masked_fill(input_ids == model.config.image_token_id, -100)
    with torch.no_grad():
        total = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        model.config.vocabulary_loss_coef = 0.0
        lm_only = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        model.config.vocabulary_loss_coef = 0.5
        in_eval = model.eval()(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        queries = model.projector(model.vision_tower(pixel_values))
        weights = model.vocabulary_mixture.mixture_weights(queries, model.get_input_embeddings().weight)
        words = caption_word_loss(weights, torch.tensor([0, 0, 1, 1]), labels, ignore_ids=[0, 1, 2])
    assert words.item() > 0
    torch.testing.assert_close(total, lm_only + 0.5 * words)
    torch.testing.assert_close(in_eval, lm_only)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"vocabulary_loss_coef": 1.0}, "needs vocabulary_mixture: true"),
        ({"vocabulary_mixture": True, "vocabulary_loss_coef": -1.0}, "use a weight >= 0"),
    ],
)
def test_a_caption_word_loss_without_the_mixture_or_with_a_negative_weight_is_refused(options, message):
    with pytest.raises(ConfigError, match=rf"vocabulary_loss_coef=.*{message}"):
        tiny_eve_config(**options)
