"""A smoke of the real-weights pipeline: `eve quickstart --smoke` (a few steps per stage, tiny evaluations)
on SmolLM2 + DINOv2-S + easy-VQA. Needs `eve prepare` (CI runs it); skips with the reason otherwise."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eve_vlm.assets import require_assets
from eve_vlm.errors import AssetError
from eve_vlm.model import EveForConditionalGeneration, EveProcessor
from eve_vlm.quickstart import RECORD, load_record, run_quickstart, save_record
from eve_vlm.serve.chat import answer, build_prompt, load_image
from eve_vlm.train.stages import DONE_MARKER


@pytest.fixture(scope="module")
def assets():
    try:
        return require_assets()
    except AssetError as err:
        pytest.skip(f"real assets not prepared ({err}); CI runs `eve prepare` first")


def test_quickstart_smoke(assets, tmp_path):
    run_quickstart(str(tmp_path / "qs"), smoke=True)
    said = []  # a second run with the baseline reuses stages 1-3 and only adds the baseline
    report = run_quickstart(str(tmp_path / "qs"), smoke=True, with_baseline=True, log=said.append)
    for name in ("stage1", "stage2", "stage3"):
        assert any(line.startswith(f"== {name}: reusing") for line in said), name
    assert "== baseline: training ==" in said and "== stage1: training ==" not in said
    text = report.read_text()
    assert "Reused from an earlier run in this folder" in text
    for name in ("stage1", "stage2", "stage3", "baseline"):
        assert f"`{name}`" in text
    metrics = json.loads((tmp_path / "qs" / "metrics.json").read_text())["models"]
    for name in ("stage1", "stage2", "stage3"):  # the elastic guarantee on real weights
        language = metrics[name]["language"]
        assert language["text"]["delta_perplexity"] == 0.0
        assert language["mc"]["wordnet_mc"]["delta_acc"] == 0.0
    assert metrics["baseline"]["language"]["text"]["delta_perplexity"] != 0.0
    assert metrics["stage3"]["routing"]
    assert list(tmp_path.joinpath("qs").glob("*.png"))
    assert "## Wall time" in text
    # `eve chat` on the result: a text-only question gets the base SmolLM2's answer (under the same prompt);
    # an image question runs with the system prompt stage 2 was tuned with, saved with the model.
    stage3 = tmp_path / "qs" / "stage3"
    model = EveForConditionalGeneration.from_pretrained(stage3).eval()
    processor = EveProcessor.from_pretrained(stage3)
    assert processor.system_prompt == ""
    base = AutoModelForCausalLM.from_pretrained(assets["llm"]).eval()
    question = "What is the capital of France?"
    ids = processor.tokenizer(build_prompt(processor, question, False), return_tensors="pt").input_ids
    with torch.no_grad():
        expected = base.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    said = answer(model, processor, question, max_new_tokens=8)
    assert said == processor.decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip()
    image = load_image(str(next((assets["easy_vqa_test"].parent / "images" / "test").glob("*.png"))))
    assert isinstance(answer(model, processor, "What color is the shape?", image, max_new_tokens=3), str)


def test_a_stage_record_is_reused_only_for_the_same_recipe_and_a_finished_model(tmp_path):
    key = {"recipe": {"stage": 2, "training": {"max_steps": 5}}, "eval": {"vqa": 16}}
    save_record(tmp_path, {"key": key, "metrics": {"vqa": {"accuracy": 1.0}}, "plots": [], "timings": {}})
    assert load_record(tmp_path, key) is None  # no finished model beside it
    (tmp_path / DONE_MARKER).write_text("{}")
    assert load_record(tmp_path, key)["metrics"] == {"vqa": {"accuracy": 1.0}}
    other = {**key, "eval": {"vqa": 500}}
    assert load_record(tmp_path, other) is None
    (tmp_path / RECORD).write_text("{not json")
    assert load_record(tmp_path, key) is None


def test_wall_time_section_names_the_machine_versions_and_every_step():
    import transformers

    from eve_vlm.quickstart import timing_section

    text = timing_section({"stage1 train": 90.0, "total": 150.0}, smoke=True, reused=["stage1"])
    assert f"torch {torch.__version__} ({torch.get_num_threads()} threads)" in text
    assert f"transformers {transformers.__version__}" in text and "smoke run" in text
    assert "| stage1 train | 90 | 1.5 |" in text and "| total | 150 | 2.5 |" in text
    assert "with the times measured then: stage1." in text
