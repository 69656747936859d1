"""The `eve` command in-process: demo, inspect, and errors reported as one clear line."""

import json

from conftest import tiny_model

from eve_vlm.cli import main


def test_demo_then_inspect(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "text-only logits equal the base LM's bit for bit: True" in out
    assert main(["inspect", str(tmp_path / "demo"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["evf"]["layers"] == [0, 2]
    params = info["parameters"]
    assert params["total"] == params["vision_tower"] + params["projector"] + params["language_model"]
    assert params["active_text_token"] < params["active_image_token"] < params["total"]


def test_inspect_mismatched_checkpoint_is_a_clear_error(tmp_path, capsys):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["evf"] = {"layers": [1]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: Checkpoint" in err and "missing weight" in err
