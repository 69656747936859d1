"""`benchmarks/stage3_variants.py`: its variants, held-out split, scoring truth, summary and refusals."""

import json

from conftest import load_benchmark, run_benchmark

from eve_vlm.quickstart import (
    RECORD,
    control_overrides,
    recipe_record,
    recipes_dir,
    stage_overrides,
    vqa_settings,
)
from eve_vlm.train.recipe import load_recipe


def caption_row(number: int, caption: str) -> dict:
    return {
        "id": f"easy-vqa-caption-{number}",
        "image": f"images/train/{number}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in a few words."},
            {"from": "gpt", "value": caption},
        ],
    }


def test_a_variant_is_a_name_and_its_overrides():
    bench = load_benchmark("stage3_variants")
    assert bench.parse_variant("recipe=") == ("recipe", [])
    assert bench.parse_variant("w=training.warmup_ratio=0.25; evf.detach_router_input=true") == (
        "w",
        ["training.warmup_ratio=0.25", "evf.detach_router_input=true"],
    )


def test_the_held_out_images_are_the_last_by_file_number_and_the_truth_is_their_caption(tmp_path):
    bench = load_benchmark("stage3_variants")
    rows = [
        caption_row(n, f"A red {shape}.") for n, shape in ((10, "circle"), (9, "triangle"), (2, "rectangle"))
    ]
    rows.append(caption_row(100, "A circle."))
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(rows))
    train, held_out = bench.split_captions(path, 2)
    assert [r["image"] for r in train] == ["images/train/2.png", "images/train/9.png"]  # 10 sorts after 9
    assert [r["image"] for r in held_out] == ["images/train/10.png", "images/train/100.png"]
    assert [bench.truth(r) for r in held_out] == [("red", "circle"), (None, "circle")]
    assert bench.words("A gray-black Circle!", ("black", "gray")) == ["gray", "black"]


def test_the_summary_pairs_each_variant_with_the_first_from_the_same_stage2():
    bench = load_benchmark("stage3_variants")
    lines = [
        {"quickstart": q, "model": m, "colour_pct": c, "shape_pct": 100.0, "both_pct": c}
        for q, m, c in (
            ("a", "stage2", 80.0),
            ("a", "recipe", 90.0),
            ("a", "new", 93.0),
            ("b", "recipe", 70.0),
            ("b", "new", 71.0),
        )
    ]
    recipe, new = bench.summary(lines, ["recipe", "new"])
    assert recipe == {
        "variant": "recipe",
        "stage2s": 2,
        "colour_pct_mean": 80.0,
        "shape_pct_mean": 100.0,
        "both_pct_mean": 80.0,
    }
    assert new["both_minus_recipe"] == 2.0 and new["se_across_stage2s"] == 1.0  # differences 3 and 1


def test_a_missing_quickstart_a_bad_variant_or_holdout_is_refused_with_exit_2(tmp_path):
    proc = run_benchmark(
        "stage3_variants", "--quickstart", str(tmp_path / "qs"), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "qs" / "stage2") in proc.stderr and "eve quickstart" in proc.stderr
    for bad, named in (
        ("--variant=no equals", "NAME=OVERRIDE"),
        ("--variant=a b=x", "NAME=OVERRIDE"),
        ("--variant=stage2=x=1", "not stage2"),
    ):
        proc = run_benchmark("stage3_variants", bad, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and named in proc.stderr
    proc = run_benchmark("stage3_variants", "--variant", "a=", "--variant", "a=x=1")
    assert proc.returncode == 2 and "once" in proc.stderr
    for name in ("stage2", "stage3"):
        (tmp_path / "qs" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "qs" / name / "quickstart_record.json").write_text("{}")
    proc = run_benchmark(
        "stage3_variants",
        "--quickstart",
        str(tmp_path / "qs"),
        "--holdout",
        "0",
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--holdout 0" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_test_line_pairs_the_variant_with_each_quickstart_model_on_the_same_questions():
    bench = load_benchmark("stage3_variants")

    def vqa(right):
        preds = [{"id": i, "accuracy": float(a)} for i, a in enumerate(right)]
        return {"accuracy": 25.0 * sum(right), "predictions": preds, "by_type": {"color": {"accuracy": 50.0}}}

    records = {"stage2": vqa([1, 1, 0, 0]), "stage3": vqa([1, 1, 1, 0]), "control": vqa([0, 0, 0, 0])}
    line = bench.line_on_test("qs", "v", vqa([1, 1, 1, 1]), records)
    assert line["accuracy"] == 100.0 and line["by_type"] == {"color": 50.0}
    assert [line[f"minus_{m}"]["difference"] for m in ("stage2", "stage3", "control")] == [50.0, 25.0, 100.0]
    assert line["minus_control"]["se"] == 0.0 and line["minus_stage3"]["questions"] == 4


def test_the_test_summary_gives_each_variants_mean_difference_across_stage2s():
    bench = load_benchmark("stage3_variants")

    def line(q, m, d2, d3):
        diff = {"stage2": d2, "stage3": d3, "control": 0.0}
        return {"quickstart": q, "model": m, **{f"minus_{k}": {"difference": v} for k, v in diff.items()}}

    (row,) = bench.summary_on_test([line("a", "v", 1.0, 0.5), line("b", "v", 3.0, -0.5)], ["v"])
    assert row["stage2s"] == 2
    assert row["minus_stage2"] == {"mean": 2.0, "se_across_stage2s": 1.0}
    assert row["minus_stage3"] == {"mean": 0.0, "se_across_stage2s": 0.5}


def test_on_the_test_a_stale_or_otherwise_asked_quickstart_is_refused_before_training(tmp_path):
    stage3 = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, tmp_path, False))
    control = load_recipe(recipes_dir() / "stage2.yaml", control_overrides(tmp_path, False, stage3))
    stale = recipe_record(stage3) | {"evf": {**recipe_record(stage3)["evf"], "router_init": "none"}}

    def write(stage3_recipe, settings):
        for name, recipe in (("stage2", {}), ("stage3", stage3_recipe), ("control", recipe_record(control))):
            (tmp_path / name).mkdir(exist_ok=True)
            vqa = {"accuracy": 0.0, "predictions": [], "by_type": {}}
            record = {"key": {"recipe": recipe, "eval": settings}, "metrics": {"vqa": vqa}}
            (tmp_path / name / RECORD).write_text(json.dumps(record))

    args = ("--test", "--quickstart", str(tmp_path), "--out", str(tmp_path / "o"), "--variant", "v=")
    write(recipe_record(stage3), vqa_settings(4) | {"vqa_batch": 32})
    proc = run_benchmark("stage3_variants", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "stage2" / RECORD) in proc.stderr and "asked otherwise" in proc.stderr
    write(stale, vqa_settings(4))
    proc = run_benchmark("stage3_variants", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'stage3'} was trained from another stage-3 recipe" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing trained


def test_a_model_left_by_another_recipe_is_refused_not_scored_under_the_variants_name(tmp_path, capsys):
    import pytest

    from eve_vlm.train.stages import DONE_MARKER

    bench = load_benchmark("stage3_variants")
    model_dir = tmp_path / "out" / "qs" / "b16"
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"")
    overrides = ["training.per_device_train_batch_size=16"]
    recipe = load_recipe(
        recipes_dir() / "stage3.yaml",
        [
            *stage_overrides(3, tmp_path / "qs", False),
            "training.seed=1",
            *overrides,
            f"training.output_dir={model_dir}",
        ],
    )
    done = {"recipe": recipe_record(recipe), "seconds": 1.0}
    (model_dir / DONE_MARKER).write_text(json.dumps(done))
    # Trained from this variant's recipe: scored again, not retrained.
    assert bench.train_variant(tmp_path / "qs", 1, overrides, model_dir) is None
    # Trained from another one (here: the held-out mode's data, or an older stage-3 recipe): refused.
    done["recipe"]["training"]["max_steps"] = 48
    (model_dir / DONE_MARKER).write_text(json.dumps(done))
    with pytest.raises(SystemExit) as stop:
        bench.train_variant(tmp_path / "qs", 1, overrides, model_dir)
    assert stop.value.code == 2
    assert f"{model_dir} holds a model trained from another recipe" in capsys.readouterr().err
