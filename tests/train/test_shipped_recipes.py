"""Every shipped recipe trains on tiny models of the families and folder layouts it names: the paper's chain
(Qwen2 + a full CLIPModel folder at 336 px, LDP, LoRA on every linear layer, bf16, checkpointing, EVF with the
paper's options), the CLIP-L/336 + Qwen2.5 example (`image_aspect_ratio: pad`) and the quickstart chain
(SmolLM2 = Llama + a bare DINOv2 folder at 112 px). Each recipe keeps its model, LoRA, EVF, trainable-rule and
precision settings; only paths, data, batch size and step count are replaced (and the `expect` counts, which
hold for the real checkpoints only)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import byte_level_bpe_tokenizer, tiny_text_config, tiny_tokenizer
from PIL import Image
from tower_folders import CLIP_PREPROCESSOR, TEXT, VISION
from transformers import AutoModelForCausalLM, CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

from eve_vlm.model import EveForConditionalGeneration
from eve_vlm.train.recipe import load_recipe
from eve_vlm.train.stages import run_stage

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"

# Folder name in a shipped recipe -> how a tiny stand-in of that checkpoint is saved.
LANGUAGE_MODELS = {
    "Qwen2-1.5B-Instruct": "qwen2",
    "Qwen2.5-1.5B-Instruct": "qwen2",
    "smollm2-135m-instruct": "llama",
}
TOWERS = {"clip-vit-large-patch14-336": ("clip", 336, 14), "dinov2-small-imgfocus": ("dinov2", 224, 14)}
CHAINS = {
    "paper": ["paper/stage1.yaml", "paper/stage2.yaml", "paper/stage3.yaml"],
    "example": ["examples/clip336-qwen2.5-stage1.yaml"],
    "quickstart": ["quickstart/stage1.yaml", "quickstart/stage2.yaml", "quickstart/stage3.yaml"],
}


def test_every_shipped_recipe_is_in_a_chain_and_names_a_known_checkpoint():
    shipped = {str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate"}
    assert shipped == {name for chain in CHAINS.values() for name in chain}
    for name in shipped:
        model = yaml.safe_load((RECIPES / name).read_text())["model"]
        if "language_model" in model:
            assert Path(model["language_model"]).name in LANGUAGE_MODELS, name
            assert Path(model["vision_tower"]).name in TOWERS, name


def save_language_model(folder, family):
    """Qwen2 folders get a byte-level BPE tokenizer, as Qwen2's own (transformers loads any tokenizer of a
    `qwen2` folder as `Qwen2Tokenizer`, which rebuilds byte-level BPE from the file)."""
    torch.manual_seed(0)
    config = tiny_text_config(family, max_position_embeddings=2048, vocab_size=320)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    (byte_level_bpe_tokenizer() if family == "qwen2" else tiny_tokenizer()).save_pretrained(folder)


def save_tower(folder, kind, side, patch):
    torch.manual_seed(0)
    vision = {**VISION, "image_size": side, "patch_size": patch}
    if kind == "clip":  # the full dual-encoder checkpoint, as openai/clip-vit-large-patch14-336 ships
        CLIPModel(CLIPConfig(vision_config=vision, text_config=TEXT)).save_pretrained(folder)
        preprocessor = {**CLIP_PREPROCESSOR, "crop_size": side, "size": side}
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    else:  # a bare vision model without a preprocessor config, as `eve prepare` writes DINOv2-S
        Dinov2Model(Dinov2Config(**vision)).save_pretrained(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    captions, dialogues = [], []
    for i in range(4):
        size = (40 + 8 * i, 32)  # not square: `image_aspect_ratio: pad` pads them
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.png"
        )
        human = {"from": "human", "value": "<image>"}
        captions.append(
            {"id": f"c{i}", "image": f"{i}.png", "conversations": [human, {"from": "gpt", "value": "red"}]}
        )
        ask = {"from": "human", "value": "<image>\nwhat is the colour"}
        dialogues.append(
            {"id": f"d{i}", "image": f"{i}.png", "conversations": [ask, {"from": "gpt", "value": "red"}]}
        )
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "dialogues.json").write_text(json.dumps(dialogues))
    return root


def rewrite(name, data, out, parts):
    """The shipped recipe with tiny parts, tiny data, two steps of batch 2, outputs under `out`."""
    recipe = yaml.safe_load((RECIPES / name).read_text())
    model = recipe["model"]
    if "language_model" in model:
        lm, tower = Path(model["language_model"]).name, Path(model["vision_tower"]).name
        model["language_model"], model["vision_tower"] = str(parts / lm), str(parts / tower)
    else:
        model["init_from"] = str(out / Path(model["init_from"]).name)
    source = {"path": str(data / ("captions.json" if recipe["stage"] == 1 else "dialogues.json"))}
    source["image_folder"] = str(data / "images")
    recipe["data"]["sources"] = [source]
    recipe["data"]["cache_dir"] = str(out / "cache")
    recipe["data"]["num_proc"] = 1
    for rule in recipe["trainable"]:
        rule.pop("expect", None)
    training = recipe["training"]
    training.pop("num_train_epochs", None)
    training.update(
        output_dir=str(out / Path(training["output_dir"]).name),
        max_steps=2,
        per_device_train_batch_size=2,
        dataloader_num_workers=0,
        report_to="none",
        save_steps=100,
    )
    path = out / name.replace("/", "-")
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_the_shipped_recipes_train_tiny_models_of_the_families_they_name(chain, data, tmp_path):
    parts = tmp_path / "parts"
    for name, family in LANGUAGE_MODELS.items():
        save_language_model(parts / name, family)
    for name, (kind, side, patch) in TOWERS.items():
        save_tower(parts / name, kind, side, patch)
    quiet = {"log": lambda line: None}
    for name in CHAINS[chain]:
        recipe = rewrite(name, data, tmp_path, parts)
        summary = run_stage(recipe, **quiet)
        assert summary["steps"] == 2, name
        assert all(count[0] > 0 for count in summary["trainable"].values()), name
        model = EveForConditionalGeneration.from_pretrained(recipe.training.output_dir)
        if recipe.evf is not None:
            assert model.config.evf is not None and model.config.evf["allocation"] == recipe.evf.allocation
        if recipe.lora is not None:
            assert model.config.lora is not None
