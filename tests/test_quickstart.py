"""A smoke of the real-weights pipeline: `eve quickstart --smoke` (a few steps per stage, tiny evaluations)
on SmolLM2 + DINOv2-S + easy-VQA. Needs `eve prepare` (CI runs it); skips with the reason otherwise."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eve_vlm.assets import require_assets
from eve_vlm.errors import AssetError
from eve_vlm.model import EveForConditionalGeneration, EveProcessor
from eve_vlm.quickstart import run_quickstart
from eve_vlm.serve.chat import answer, build_prompt, load_image


@pytest.fixture(scope="module")
def assets():
    try:
        return require_assets()
    except AssetError as err:
        pytest.skip(f"real assets not prepared ({err}); CI runs `eve prepare` first")


def test_quickstart_smoke(assets, tmp_path):
    report = run_quickstart(str(tmp_path / "qs"), smoke=True, with_baseline=True)
    text = report.read_text()
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
