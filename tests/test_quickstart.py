"""A smoke of the real-weights pipeline: `eve quickstart --smoke` (a few steps per stage, tiny evaluations)
on SmolLM2 + DINOv2-S + easy-VQA. Needs `eve prepare` (CI runs it); skips with the reason otherwise."""

import json

import pytest

from eve_vlm.assets import require_assets
from eve_vlm.errors import AssetError
from eve_vlm.quickstart import run_quickstart


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
