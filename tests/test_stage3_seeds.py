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
