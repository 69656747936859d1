"""Recipes: every shipped recipe loads and validates; typos and bad values fail naming the key; overrides."""

from pathlib import Path

import pytest
import yaml

from eve_vlm.errors import ConfigError
from eve_vlm.train.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


def test_recipes_are_shipped():
    assert {p.name for p in SHIPPED} >= {"stage1.yaml", "stage2.yaml", "stage3.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and " train " in first and str(path.relative_to(ROOT)) in first
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.stage == int(path.stem[-1])
    assert (recipe.evf is not None) == (recipe.stage == 3)


def write(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal():
    return {
        "stage": 1,
        "model": {"language_model": "lm", "vision_tower": "vt"},
        "data": {"sources": [{"path": "d.json"}]},
        "trainable": [{"pattern": "^projector\\."}],
    }


@pytest.mark.parametrize(
    ("section", "key"),
    [(None, "stages"), ("model", "projecter_type"), ("training", "learnig_rate"), ("data", "max_len")],
)
def test_typo_fails_naming_the_key(tmp_path, section, key):
    data = minimal()
    (data if section is None else data.setdefault(section, {}))[key] = 1
    with pytest.raises(ConfigError, match=rf"Unknown key\(s\) \['{key}'\]"):
        load_recipe(write(tmp_path, data))


def test_nested_list_typo_names_the_item(tmp_path):
    data = minimal()
    data["trainable"] = [{"pattern": "a"}, {"patern": "b"}]
    with pytest.raises(ConfigError, match=r"trainable\[1\]"):
        load_recipe(write(tmp_path, data))


def test_bad_values(tmp_path):
    data = minimal()
    data["stage"] = 4
    with pytest.raises(ConfigError, match="stage=4"):
        load_recipe(write(tmp_path, data))
    data = minimal()
    data["data"]["template"] = "alpaca"
    with pytest.raises(ConfigError, match="template='alpaca'"):
        load_recipe(write(tmp_path, data))
    data = minimal()
    data["data"]["check_images"] = "verify"
    with pytest.raises(ConfigError, match=r"data\.check_images='verify': use one of none, exists, decode"):
        load_recipe(write(tmp_path, data))
    data = minimal()
    data["data"]["num_proc"] = 0
    with pytest.raises(ConfigError, match=r"data\.num_proc=0"):
        load_recipe(write(tmp_path, data))
    data = minimal()
    data["evf"] = {"placement": "alternate"}
    with pytest.raises(ConfigError, match="stage-3 section"):
        load_recipe(write(tmp_path, data))
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides(tmp_path):
    recipe = load_recipe(
        write(tmp_path, minimal()), ["training.max_steps=7", "training.bf16=true", "data.max_length=64"]
    )
    assert recipe.training.max_steps == 7 and recipe.training.bf16 is True and recipe.data.max_length == 64
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['max_stepz'\]"):
        load_recipe(write(tmp_path, minimal()), ["training.max_stepz=7"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_recipe(write(tmp_path, minimal()), ["training.max_steps"])


def test_scalar_types_are_checked_and_yaml_1_1_floats_read(tmp_path):
    path = write(tmp_path, minimal())
    recipe = load_recipe(path, ["training.learning_rate=3e-3", "training.weight_decay=0"])
    assert recipe.training.learning_rate == 0.003 and isinstance(recipe.training.weight_decay, float)
    for override, message in [
        ("training.learning_rate=fast", "training.learning_rate: expected float, got str 'fast'"),
        ("training.max_steps=ten", "training.max_steps: expected int, got str 'ten'"),
        ("training.max_steps=true", "training.max_steps: expected int, got bool True"),
        ("training.bf16=1", "training.bf16: expected bool, got int 1"),
        ("data.template=3", "data.template: expected str, got int 3"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_recipe(path, [override])


def test_bad_evf_options_fail_at_load(tmp_path):
    data = minimal()
    data["stage"] = 3
    data["evf"] = {"allocation": "gpbr"}
    with pytest.raises(ConfigError, match="'gpbr' is unknown"):
        load_recipe(write(tmp_path, data))
    data["evf"] = {"placement": "odd"}
    with pytest.raises(ConfigError, match="placement='odd'"):
        load_recipe(write(tmp_path, data))


def test_paper_recipe_keeps_the_plain_router_and_the_quickstart_warm_starts_it():
    """The router options are ours: the paper's stage 3 recipe trains the plain N(0, 0.02) router at the base
    learning rate with the balance loss only; the quickstart's fits it on the image mask first."""
    paper = load_recipe(ROOT / "recipes" / "paper" / "stage3.yaml").evf
    assert (paper.router_init, paper.router_lr, paper.modality_loss_coef) == ("random", None, 0.0)
    assert paper.detach_router_input is False and paper.options()["detach_router_input"] is False
    assert paper.capacity_factor == 1.5
    quick = load_recipe(ROOT / "recipes" / "quickstart" / "stage3.yaml").evf
    assert quick.router_init == "modality" and quick.modality_loss_coef > 0
    assert quick.capacity_factor == 2.0  # with 2 experts nothing is dropped in training (see the recipe)
    assert quick.options()["modality_loss_coef"] == 0.1  # the loss is part of the model config
    assert "router_init" not in quick.options()  # training-only keys stay out of the model config
    assert quick.detach_router_input is False  # measured inside the noise (benchmarks/stage3_variants.py)


def test_bf16_weights_need_bf16_compute(tmp_path):
    """`model.dtype: bfloat16` keeps frozen weights bf16 and trains fp32 ones, so it needs bf16 autocast."""
    path = write(tmp_path, minimal())
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 .* set training.bf16: true"):
        load_recipe(path, ["model.dtype=bfloat16"])
    assert load_recipe(path, ["model.dtype=bfloat16", "training.bf16=true"]).training.bf16


def test_attn_implementation_is_a_checked_model_key(tmp_path):
    path = write(tmp_path, minimal())
    assert load_recipe(path, ["model.attn_implementation=eager"]).model.attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation='flash': use one of eager, sdpa"):
        load_recipe(path, ["model.attn_implementation=flash"])
