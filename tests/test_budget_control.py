"""`benchmarks/budget_control.py`: the control with stage 3's parameter budget trains exactly the FFNs of stage
3's EVF layers in place (and the projector), on stage 3's data, steps, batch, seed and learning rate."""

import re

from conftest import load_benchmark, run_benchmark

from eve_vlm.quickstart import RECORD, recipes_dir, stage_overrides
from eve_vlm.train.recipe import load_recipe


def test_it_trains_the_ffns_of_the_evf_layers_in_place_on_stage3s_training(tmp_path):
    budget_overrides = load_benchmark("budget_control").budget_overrides
    stage3 = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, tmp_path, False))
    recipe = load_recipe(
        recipes_dir() / "stage2.yaml", budget_overrides(tmp_path, stage3, 30, tmp_path / "b")
    )
    t, b = stage3.training, recipe.training
    assert recipe.data.sources == stage3.data.sources and recipe.model.init_from == str(tmp_path / "stage2")
    assert (b.max_steps, b.per_device_train_batch_size, b.seed, b.learning_rate) == (
        t.max_steps,
        t.per_device_train_batch_size,
        t.seed,
        t.learning_rate,
    )
    assert b.output_dir == str(tmp_path / "b")
    lower = load_recipe(recipes_dir() / "stage2.yaml", budget_overrides(tmp_path, stage3, 30, tmp_path, 5e-5))
    assert lower.training.learning_rate == 5e-5
    rules = [re.compile(rule.pattern) for rule in recipe.trainable]
    names = [
        f"language_model.model.layers.{i}.mlp.{proj}_proj.{part}.weight"
        for i in range(30)
        for proj in ("gate", "up", "down")
        for part in ("base_layer", "lora_A.default", "lora_B.default")
    ]
    names += ["language_model.model.layers.0.self_attn.q_proj.base_layer.weight", "projector.mlp.0.weight"]
    trained = [name for name in names if any(rule.search(name) for rule in rules)]
    evf = [
        f"language_model.model.layers.{i}.mlp.{p}_proj.base_layer.weight"
        for i in range(0, 30, 2)
        for p in ("gate", "up", "down")
    ]
    assert sorted(trained) == sorted([*evf, "projector.mlp.0.weight"])  # not the LoRA, not the other layers


def test_a_missing_quickstart_is_named_with_exit_2(tmp_path):
    proc = run_benchmark("budget_control", "--quickstart", str(tmp_path), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "stage2" / RECORD) in proc.stderr and not (tmp_path / "b").exists()


def test_a_used_out_folder_is_refused_before_anything_trains(tmp_path):
    import json

    from eve_vlm.quickstart import control_overrides, recipe_record, vqa_settings

    stage3 = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, tmp_path, False))
    control = load_recipe(recipes_dir() / "stage2.yaml", control_overrides(tmp_path, False, stage3))
    for name, recipe in (
        ("stage2", {}),
        ("stage3", recipe_record(stage3)),
        ("control", recipe_record(control)),
    ):
        (tmp_path / name).mkdir()
        record = {"key": {"recipe": recipe, "eval": vqa_settings(4)}, "metrics": {"vqa": {}}}
        (tmp_path / name / RECORD).write_text(json.dumps(record))
    (tmp_path / "b" / "checkpoint-48").mkdir(parents=True)  # an earlier run's, at another learning rate
    proc = run_benchmark(
        "budget_control", "--quickstart", str(tmp_path), "--out", str(tmp_path / "b"), "--vqa-limit", "4"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--out {tmp_path / 'b'} is not empty" in proc.stderr
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["checkpoint-48"]
