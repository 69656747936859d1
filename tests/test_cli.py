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


def _saved_llm(folder):
    from conftest import tiny_text_config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_text_config()).save_pretrained(folder)
    return folder


def test_every_model_command_refuses_a_folder_that_is_not_an_eve_model(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def no_allocation(*args, **kwargs):  # the check must come before any model is built
        raise AssertionError("a model was loaded")

    llm = _saved_llm(tmp_path / "llm")
    capsys.readouterr()  # the save's progress bar
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", no_allocation)
    commands = [
        ["inspect", "{}"],
        ["export", "{}", str(tmp_path / "out")],
        ["chat", "--model", "{}", "hello"],
        ["eval", "vqa", "--model", "{}", "--data", str(tmp_path / "none.json")],
    ]
    cases = [(llm, "holds a llama model, not an Eve model"), (tmp_path / "missing", "does not exist")]
    for folder, message in cases:
        for argv in commands:
            assert main([a.format(folder) for a in argv]) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("error: ") and str(folder) in err and message in err, (argv, err)
            assert "Traceback" not in err


def test_a_truncated_weights_file_is_named(tmp_path, capsys):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "truncated" in err
    (tmp_path / "model.safetensors").unlink()
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
