"""`benchmarks/stage3_seeds.py` refuses a quickstart folder it cannot count as one seed of the current recipes."""

import json
import subprocess
from dataclasses import asdict
from pathlib import Path

from conftest import run_benchmark

from eve_vlm.data.builtin.easy_vqa import CAPTION_PROMPT
from eve_vlm.quickstart import (
    DESCRIBE_TOKENS,
    RECORD,
    VQA_BF16,
    control_overrides,
    recipe_record,
    recipes_dir,
    stage_overrides,
    vqa_settings,
)
from eve_vlm.train.recipe import load_recipe


def run_script(folder: Path) -> subprocess.CompletedProcess:
    return run_benchmark("stage3_seeds", "--quickstart", str(folder), "--out", str(folder / "seeds"))


def test_a_missing_or_stale_quickstart_is_named_with_exit_2(tmp_path):
    proc = run_script(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "stage2" / RECORD) in proc.stderr and "eve quickstart" in proc.stderr
    stage3 = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, tmp_path, False))
    control = load_recipe(recipes_dir() / "stage2.yaml", control_overrides(tmp_path, False, stage3))
    old_control = recipe_record(control)
    stage2 = load_recipe(recipes_dir() / "stage2.yaml", stage_overrides(2, tmp_path, False))
    old_control["data"]["sources"] = [asdict(s) for s in stage2.data.sources]  # the control of older recipes
    for name, recipe in (
        ("stage2", {}),
        ("stage3", recipe_record(stage3)),
        ("control", old_control),
    ):
        (tmp_path / name).mkdir()
        record = {"key": {"recipe": recipe}, "metrics": {"vqa": {"accuracy": 80.0, "predictions": []}}}
        (tmp_path / name / RECORD).write_text(json.dumps(record))
    proc = run_script(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(
        f"control in {tmp_path} were trained from other recipes"
    )  # stage 3 is current
    assert not (tmp_path / "seeds").exists()  # nothing trained


def test_records_evaluated_in_other_batches_are_not_mixed_with_new_seeds(tmp_path):
    stage3 = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, tmp_path, False))
    control = load_recipe(recipes_dir() / "stage2.yaml", control_overrides(tmp_path, False, stage3))
    evaluated = {"vqa": 2000, "describe_first": CAPTION_PROMPT, "describe_tokens": DESCRIBE_TOKENS}
    evaluated |= {"vqa_batch": 32, "vqa_bf16": VQA_BF16}  # the quickstart's batches before 64
    for name, recipe in (
        ("stage2", {}),
        ("stage3", recipe_record(stage3)),
        ("control", recipe_record(control)),
    ):
        (tmp_path / name).mkdir()
        record = {"key": {"recipe": recipe, "eval": evaluated}, "metrics": {"vqa": {"predictions": []}}}
        (tmp_path / name / RECORD).write_text(json.dumps(record))
    proc = run_script(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"stage2, control, stage3 in {tmp_path} were evaluated otherwise")
    assert not (tmp_path / "seeds").exists()


def quickstart_records(folder: Path) -> None:
    """Records of a finished quickstart, as the current recipes and evaluation make them, on 4 questions."""
    stage3 = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, folder, False))
    control = load_recipe(recipes_dir() / "stage2.yaml", control_overrides(folder, False, stage3))
    right = {"stage2": [1, 1, 0, 0], "stage3": [1, 1, 1, 0], "control": [1, 0, 1, 1]}
    for name, recipe in (
        ("stage2", {}),
        ("stage3", recipe_record(stage3)),
        ("control", recipe_record(control)),
    ):
        predictions = [{"id": i, "accuracy": float(a)} for i, a in enumerate(right[name])]
        vqa = {"accuracy": 25.0 * sum(right[name]), "predictions": predictions, "by_type": {}}
        record = {"key": {"recipe": recipe, "eval": vqa_settings(4)}, "metrics": {"vqa": vqa}}
        (folder / name).mkdir()
        (folder / name / RECORD).write_text(json.dumps(record))


def test_previous_seeds_are_counted_only_beside_the_same_quickstart(tmp_path):
    quickstart_records(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess:
        folders = ("--quickstart", str(tmp_path), "--out", str(tmp_path / "seeds"), "--vqa-limit", "4")
        return run_benchmark("stage3_seeds", *folders, *args)

    proc = run("--seeds")  # no seed to train: the quickstart's own, summarised
    assert proc.returncode == 0, proc.stderr
    seed1, alone = (json.loads(text) for text in proc.stdout.splitlines())
    assert alone["seeds"] == [1] and alone["stage3"] == {"mean": 75.0, "se_across_seeds": None}
    assert (seed1["seed"], seed1["stage3"], seed1["control"], seed1["stage2"]) == (1, 75.0, 75.0, 50.0)
    assert seed1["stage3-stage2"]["difference"] == 25.0 and seed1["stage3-control"]["difference"] == 0.0
    seed2 = {"seed": 2, "stage2": 50.0, "stage3": 100.0, "control": 25.0}
    for key, d in (("stage3-control", 75.0), ("stage3-stage2", 50.0), ("control-stage2", -25.0)):
        seed2[key] = {"difference": d, "se": 1.0, "questions": 4}
    previous = tmp_path / "previous.jsonl"
    previous.write_text("\n".join(json.dumps(line) for line in (seed2, seed1, {"seeds": [2, 1]})) + "\n")
    proc = run("--previous", str(previous), "--seeds")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(text) for text in proc.stdout.splitlines()]
    assert [line.get("seed") for line in lines[:2]] == [1, 2] and lines[-1]["seeds"] == [1, 2]
    assert lines[-1]["stage3"] == {"mean": 87.5, "se_across_seeds": 12.5}
    assert lines[-1]["stage3-control"] == {"mean": 37.5, "se_across_seeds": 37.5}
    # An earlier output of another stage 3, a seed given twice, or the quickstart's own seed to train again,
    # is refused before anything trains.
    for lines, seeds, said in (
        (
            ({**seed1, "stage3": 50.0}, seed2),
            ["7"],
            "its line for seed 1 differs from this quickstart's (stage3: 50.0",
        ),
        ((seed1, seed2, seed2), ["7"], "seeds [2] appear more than once"),
        ((seed1, {**seed2, "stage2": 40.0}), ["7"], "seeds [2] were scored against another stage 2"),
        ((seed1, seed2), ["1"], "--seeds 1: the quickstart's own seed is counted already"),
    ):
        previous.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        proc = run("--previous", str(previous), "--seeds", *seeds)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert said in proc.stderr and not (tmp_path / "seeds").exists()


def test_a_quickstart_run_with_seed_is_read_with_its_seed(tmp_path):
    stage3 = load_recipe(
        recipes_dir() / "stage3.yaml", [*stage_overrides(3, tmp_path, False), "training.seed=2"]
    )
    control = load_recipe(
        recipes_dir() / "stage2.yaml", [*control_overrides(tmp_path, False, stage3), "training.seed=2"]
    )
    for name, recipe, right in (
        ("stage2", {}, [1, 1, 0, 0]),
        ("stage3", recipe_record(stage3), [1, 1, 1, 0]),
        ("control", recipe_record(control), [1, 0, 0, 0]),
    ):
        predictions = [{"id": i, "accuracy": float(a)} for i, a in enumerate(right)]
        vqa = {"accuracy": 25.0 * sum(right), "predictions": predictions, "by_type": {}}
        (tmp_path / name).mkdir()
        record = {"key": {"recipe": recipe, "eval": vqa_settings(4)}, "metrics": {"vqa": vqa}}
        (tmp_path / name / RECORD).write_text(json.dumps(record))
    folders = ("--quickstart", str(tmp_path), "--out", str(tmp_path / "seeds"), "--vqa-limit", "4")
    proc = run_benchmark("stage3_seeds", *folders, "--seeds")  # read as the recipes' seeds: refused
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "stage3, control in" in proc.stderr and "pass the --quickstart-seed it was run with" in proc.stderr
    proc = run_benchmark("stage3_seeds", *folders, "--quickstart-seed", "2", "--seeds")
    assert proc.returncode == 0, proc.stderr
    own, summary = (json.loads(text) for text in proc.stdout.splitlines())
    assert (own["seed"], own["stage3"], own["control"], own["stage2"]) == (2, 75.0, 25.0, 50.0)
    assert summary["seeds"] == [2]
    proc = run_benchmark("stage3_seeds", *folders, "--quickstart-seed", "2", "--seeds", "2")
    assert proc.returncode == 2 and "--seeds 2: the quickstart's own seed is counted already" in proc.stderr
    proc = run_benchmark("stage3_seeds", *folders, "--quickstart-seed", "3", "--seeds")  # another seed's
    assert proc.returncode == 2 and "at seed 3: run `eve quickstart --out" in proc.stderr
    assert "pass the --quickstart-seed it was run with (none for the recipes' seeds)" in proc.stderr
    assert not (tmp_path / "seeds").exists()
