"""Vision-tower folders in the layouts users download: a full CLIPModel / SiglipModel checkpoint, SigLIP at a size
that is not a multiple of the patch, a bare Dinov2Model. Each is a tiny random tower saved as the real one is
(config.json with `vision_config` for dual encoders, model.safetensors, preprocessor_config.json)."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_text_config, tiny_tokenizer
from PIL import Image
from tower_folders import LAYOUTS, MEAN, STD, TEXT, VISION, save_tower, write_recipe
from transformers import AutoModelForCausalLM, AutoProcessor, Siglip2Config, SiglipConfig, SiglipVisionModel

from eve_vlm.cli import main
from eve_vlm.errors import ConfigError
from eve_vlm.model.tower import load_vision_tower, read_tower_config
from eve_vlm.train import stages
from eve_vlm.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_text_config("llama")).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def picture(size=(40, 52), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_vision_sub_model_is_loaded_with_its_weights(tmp_path, layout, caplog):
    saved = save_tower(tmp_path, layout)
    _, vision_of, cls, side, _, _ = LAYOUTS[layout]
    with caplog.at_level(logging.WARNING):
        tower = load_vision_tower(tmp_path, log=lambda _: None)
    assert not [r for r in caplog.records if "not sharded" in r.getMessage()]  # no tensor-parallel noise
    assert type(tower) is cls  # the vision model only: no text tower is built
    assert not any(name.startswith("text_") for name, _ in tower.named_parameters())
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        ref = vision_of(saved)(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(ours) == len(ref) and all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stage1_builds_from_the_folder_with_its_processor(tmp_path, lm_folder, layout):
    saved = save_tower(tmp_path / "tower", layout)
    _, vision_of, _, side, grid, _ = LAYOUTS[layout]
    model, processor = stages.build_from_parts(
        load_recipe(write_recipe(tmp_path, lm_folder, tmp_path / "tower"))
    )
    assert model.config.image_size == side and model.config.num_image_tokens == grid * grid
    image_processor = processor.image_processor
    assert list(image_processor.image_mean) == MEAN and list(image_processor.image_std) == STD
    batch = processor("<image> what is the colour", images=[picture()])
    assert batch["pixel_values"].shape == (1, 3, side, side)
    assert (batch["input_ids"] == processor.image_token_id).sum() == grid * grid
    with torch.no_grad():
        features = model.vision_tower(batch["pixel_values"])  # (1, grid * grid, Dv)
        ref = vision_of(saved)(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[
            -2
        ]
        assert torch.equal(features, ref[:, ref.shape[1] - grid * grid :])
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_pad_to_square_borders_with_the_mean_colour_and_is_saved(tmp_path, lm_folder):
    save_tower(tmp_path / "tower", "clip_full")
    recipe = load_recipe(write_recipe(tmp_path, lm_folder, tmp_path / "tower", image_aspect_ratio="pad"))
    _, processor = stages.build_from_parts(recipe)
    white = Image.new("RGB", (64, 32), (255, 255, 255))  # wide: padded above and below
    values = processor("<image>", images=[white])["pixel_values"][0]  # (3, 32, 32)
    std = torch.tensor(STD)[:, None]
    assert values[:, :4].abs().max() <= 1 / 255 / min(STD)  # the border is the mean colour: ~0 normalised
    assert values[:, -4:].abs().max() <= 1 / 255 / min(STD)
    white_normalised = (1 - torch.tensor(MEAN)[:, None]) / std
    assert torch.allclose(values[:, 16], white_normalised.expand(3, 32), atol=1e-4)
    plain = load_recipe(write_recipe(tmp_path, lm_folder, tmp_path / "tower"))
    resized = stages.build_from_parts(plain)[1]("<image>", images=[white])["pixel_values"][0]
    assert torch.allclose(resized, white_normalised[:, :, None].expand(3, 32, 32), atol=1e-4)  # cropped
    processor.save_pretrained(tmp_path / "saved")
    loaded = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert loaded.image_aspect_ratio == "pad"
    assert torch.equal(loaded("<image>", images=[white])["pixel_values"][0], values)


def test_a_folder_with_no_vision_model_fails_before_any_model_is_built(
    tmp_path, lm_folder, monkeypatch, capsys
):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(stages.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr(stages, "load_vision_tower", no_model)
    assert main(["train", str(write_recipe(tmp_path, lm_folder, lm_folder))]) == 2
    err = capsys.readouterr().err
    assert f"{lm_folder} holds a llama model (LlamaForCausalLM), not a vision tower" in err
    assert "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["train", str(write_recipe(tmp_path, lm_folder, tmp_path / "empty"))]) == 2
    assert f"{tmp_path / 'empty'} holds no config.json" in capsys.readouterr().err


def test_a_naflex_siglip2_folder_is_refused_naming_what_it_holds(tmp_path):
    Siglip2Config(vision_config={**VISION, "num_patches": 16}, text_config=TEXT).save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError, match="holds a siglip2 model .* not a vision tower with a fixed image size"
    ):
        read_tower_config(tmp_path)


def test_a_folder_without_preprocessor_config_falls_back_to_the_family_statistics(tmp_path, lm_folder):
    torch.manual_seed(0)
    SiglipVisionModel(SiglipConfig(vision_config={**VISION, "image_size": 32}).vision_config).save_pretrained(
        tmp_path / "tower"
    )
    _, processor = stages.build_from_parts(load_recipe(write_recipe(tmp_path, lm_folder, tmp_path / "tower")))
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert processor("<image>", images=[picture()])["pixel_values"].shape == (1, 3, 32, 32)


def test_the_clip336_qwen_example_recipe_loads():
    recipe = load_recipe(ROOT / "recipes/examples/clip336-qwen2.5-stage1.yaml")
    assert recipe.stage == 1 and recipe.model.vision_tower.endswith("clip-vit-large-patch14-336")
    assert recipe.model.image_aspect_ratio == "pad" and recipe.model.image_size is None  # the tower's 336
