"""Tiny vision towers saved in the folder layouts users download (a full CLIPModel / SiglipModel checkpoint,
SigLIP at a size that is not a multiple of the patch, a bare Dinov2Model), each with the preprocessor config the
real checkpoint ships, and a stage-1 recipe that builds an Eve model from such a folder and an LLM folder."""

import json

import torch
import yaml
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
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
