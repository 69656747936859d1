"""Vision-tower folders in the layouts users download: a full CLIPModel / SiglipModel checkpoint, SigLIP at a size
that is not a multiple of the patch, a bare Dinov2Model. Each is a tiny random tower saved as the real one is
(config.json with `vision_config` for dual encoders, model.safetensors, preprocessor_config.json)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_text_config, tiny_tokenizer
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Siglip2Config,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

from eve_vlm.cli import main
from eve_vlm.errors import ConfigError
from eve_vlm.model.tower import load_vision_tower, read_tower_config
from eve_vlm.train import stages
from eve_vlm.train.recipe import load_recipe

VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]  # unlike any family's, so the folder's values are seen

# Preprocessor configs as the real checkpoints ship them (old-style CLIP ints; SigLIP's square resize; DINOv2's
# shortest edge then crop), scaled to the tiny towers.
CLIP_PREPROCESSOR = {
    "crop_size": 32,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": MEAN,
    "image_std": STD,
    "resample": 3,
    "size": 32,
}


def siglip_preprocessor(side):
    return {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": MEAN,
        "image_processor_type": "SiglipImageProcessor",
        "image_std": STD,
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": side, "width": side},
    }


DINOV2_PREPROCESSOR = {
    "crop_size": {"height": 32, "width": 32},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": MEAN,
    "image_processor_type": "BitImageProcessor",
    "image_std": STD,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 36},
}

# layout -> (saved model, its vision model, class loaded, image side, patch grid side, preprocessor config)
LAYOUTS = {
    "clip_full": (
        lambda: CLIPModel(CLIPConfig(vision_config={**VISION, "image_size": 32}, text_config=TEXT)),
        lambda m: m.vision_model,
        CLIPVisionModel,
        32,
        4,
        CLIP_PREPROCESSOR,
    ),
    "siglip_full": (
        lambda: SiglipModel(SiglipConfig(vision_config={**VISION, "image_size": 32}, text_config=TEXT)),
        lambda m: m.vision_model,
        SiglipVisionModel,
        32,
        4,
        siglip_preprocessor(32),
    ),
    # As SigLIP-so400m at 384 px with 14-px patches: 30 px, 8-px patches -> 3 x 3 patches, 6 px unseen.
    "siglip_non_multiple": (
        lambda: SiglipModel(SiglipConfig(vision_config={**VISION, "image_size": 30}, text_config=TEXT)),
        lambda m: m.vision_model,
        SiglipVisionModel,
        30,
        3,
        siglip_preprocessor(30),
    ),
    "dinov2": (
        lambda: Dinov2Model(Dinov2Config(**VISION, image_size=32)),
        lambda m: m,
        Dinov2Model,
        32,
        4,
        DINOV2_PREPROCESSOR,
    ),
}


def save_tower(folder, layout, seed=0):
    """Saves a tiny tower of `layout` and returns the in-memory model it was saved from."""
    make, _, _, _, _, preprocessor = LAYOUTS[layout]
    torch.manual_seed(seed)
    model = make().eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_text_config("llama")).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_recipe(tmp_path, lm, tower, **model):
    data = {
        "stage": 1,
        "model": {"language_model": str(lm), "vision_tower": str(tower), **model},
        "data": {"sources": [{"path": str(tmp_path / "none.json")}], "template": "plain"},
        "trainable": [{"pattern": "^projector\\."}],
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1},
    }
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def picture(size=(40, 52), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_vision_sub_model_is_loaded_with_its_weights(tmp_path, layout):
    saved = save_tower(tmp_path, layout)
    _, vision_of, cls, side, _, _ = LAYOUTS[layout]
    tower = load_vision_tower(tmp_path, log=lambda _: None)
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
