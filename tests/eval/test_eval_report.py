"""Report: tables for several named models, stable metrics.json, relative plot links, and `eve eval all`."""

import json
from pathlib import Path

from test_eval_vqa import model_and_processor, run_cli, write_eval_set

from eve_vlm.assets import weights_sha256
from eve_vlm.eval.report import SCHEMA, write_report
from eve_vlm.eval.vqa import score_predictions


def fake_metrics(accuracy_hits: int) -> dict:
    predictions = [
        {"prediction": "red" if k < accuracy_hits else "blue", "answers": ["red"], "question_type": "colour"}
        for k in range(4)
    ]
    vqa = {**score_predictions(predictions), "predictions": predictions}
    language = {
        "base": "base LLM",
        "text": {
            "tokens": 100,
            "model_perplexity": 12.5,
            "base_perplexity": 12.5,
            "delta_perplexity": 0.0,
            "model_nll": 2.5,
            "base_nll": 2.5,
            "delta_nll": 0.0,
        },
        "mc": {
            "piqa": {
                "items": 10,
                "model_acc": 60.0,
                "base_acc": 60.0,
                "delta_acc": 0.0,
                "model_acc_norm": 50.0,
                "base_acc_norm": 50.0,
                "delta_acc_norm": 0.0,
            }
        },
    }
    return {"vqa": vqa, "language": language, "routing": None}


def test_report_renders_one_row_per_model(tmp_path):
    plot = tmp_path / "plots" / "stage3_routing_layers.png"
    plot.parent.mkdir()
    plot.write_bytes(b"png")
    metrics = {
        "stage1": fake_metrics(1),
        "stage2": fake_metrics(3),
        "base": {"language": fake_metrics(0)["language"]},
    }
    report = write_report(metrics, tmp_path / "out", {"stage2": [str(plot)]})
    text = Path(report).read_text()
    assert "| stage1 | 4 | 25.00 | 25.00 | 25.00 | 25.00 |" in text  # accuracy, SE, exact, colour
    assert "| stage2 | 4 | 75.00 | 25.00 | 75.00 | 75.00 |" in text
    assert "| base | text (100 tokens) | perplexity | 12.500 | 12.500 | +0.000 |" in text
    assert "| stage2 | piqa (10 items) | acc | 60.00 | 60.00 | +0.00 |" in text
    assert "## Routing" not in text  # no routing metrics given; the plot is still linked, relatively
    assert "![stage3_routing_layers](../plots/stage3_routing_layers.png)" in text
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["schema"] == SCHEMA and set(saved["models"]) == {"stage1", "stage2", "base"}
    assert set(saved["models"]["base"]) == {"vqa", "language", "routing"}
    assert "predictions" not in saved["models"]["stage1"]["vqa"]


def test_report_names_the_describe_first_protocol_and_the_models_asked_so(tmp_path):
    described = fake_metrics(3)
    described["vqa"]["describe_first"] = "Describe the image."
    text = Path(write_report({"one_turn": fake_metrics(1), "described": described}, tmp_path)).read_text()
    assert (
        'Describe first (`described`): each question is asked after the model\'s own reply to "Describe the image."'
        in text
    )
    note = next(line for line in text.splitlines() if line.startswith("Accuracy in %"))
    assert "`described`" in note and "`one_turn`" not in note
    plain = Path(write_report({"one_turn": fake_metrics(1)}, tmp_path / "plain")).read_text()
    assert "Describe first" not in plain


def test_single_model_metrics_are_named_model(tmp_path):
    write_report(fake_metrics(2), tmp_path)
    assert list(json.loads((tmp_path / "metrics.json").read_text())["models"]) == ["model"]


def test_eve_eval_all_cli_writes_report_metrics_and_plots(tmp_path):
    model, processor = model_and_processor(evf=True, lora=True)
    model_and_processor(evf=False)[0].language_model.save_pretrained(tmp_path / "base")  # same seed: its base
    base = {"path": str(tmp_path / "base"), "sha256": weights_sha256(tmp_path / "base")}
    model.config.base_language_model = base  # as stage 1 records it
    model.save_pretrained(tmp_path / "stage3")
    processor.save_pretrained(tmp_path / "stage3")
    data = write_eval_set(tmp_path)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "what colour", "choices": ["red", "blue"], "label": 0}) + "\n")
    (tmp_path / "text.txt").write_text("what is the colour of the shape in this image " * 4)
    out = tmp_path / "report"
    run_cli(
        ["eval", "all", "--model", str(tmp_path / "stage3"), "--vqa", str(data), "--images", str(tmp_path)]
        + ["--text", str(tmp_path / "text.txt"), "--mc", str(mc), "--out", str(out), "--quiet"]
        + ["--max-new-tokens", "3", "--policies", "gbpr", "img_gbpr", "modality"]
    )
    text = (out / "report.md").read_text()
    for heading in ("## VQA", "## Language ability vs the base LLM", "## Routing", "### `stage3` per layer"):
        assert heading in text
    assert "](routing_layers.png)" in text and "](routing_policies.png)" in text
    assert (out / "routing_policies.png").stat().st_size > 1024
    saved = json.loads((out / "metrics.json").read_text())["models"]["stage3"]
    assert saved["vqa"]["questions"] == 5
    assert str(tmp_path / "base") in saved["language"]["base"]
    assert (
        saved["language"]["text"]["delta_perplexity"] == 0.0
        and saved["language"]["mc"]["mc"]["delta_acc"] == 0.0
    )
    assert list(saved["routing"]["policies"]) == ["gbpr", "img_gbpr", "modality"]
    assert (out / "vqa_predictions.jsonl").exists()
