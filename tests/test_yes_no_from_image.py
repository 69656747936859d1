"""`benchmarks/yes_no_from_image.py`: its evaluation set is balanced per form and answer, captions are only
written where the image's colour and shape are known, and a missing stage 2 is named with exit 2."""

from collections import Counter
from pathlib import Path

import pytest
from conftest import load_benchmark, run_benchmark

from eve_vlm.data.builtin.easy_vqa import yes_no_form


def row(image: str, question: str, answer: str) -> dict:
    kind = "yes-no" if answer in ("yes", "no") else ("color" if answer in ("red", "blue") else "shape")
    human = {"from": "human", "value": f"<image>\n{question} Answer with one word."}
    return {"image": image, "conversations": [human, {"from": "gpt", "value": answer}], "question_type": kind}


def rows() -> list[dict]:
    out = []
    for k in range(40):
        colour, other = ("red", "blue") if k % 2 else ("blue", "red")
        out += [
            row(f"{k}.png", f"Is there a {colour} shape?", "yes"),
            row(f"{k}.png", f"Is there a {other} shape?", "no"),
            row(f"{k}.png", f"Is there not a {colour} shape?", "no"),
            row(f"{k}.png", f"Is there not a {other} shape?", "yes"),
            row(f"{k}.png", "Does the image contain a circle?", "yes" if k % 3 else "no"),
            row(f"{k}.png", "Does the image not contain a circle?", "no" if k % 3 else "yes"),
        ]
        if k % 4:  # the shape is known for three images in four
            out.append(row(f"{k}.png", f"What is the {colour} shape?", "circle" if k % 3 else "triangle"))
    return out


def test_the_evaluation_rows_hold_as_many_of_each_form_and_answer():
    script = load_benchmark("yes_no_from_image")
    chosen = script.evaluation_rows(rows(), 40)
    cells = Counter((yes_no_form(script.question_of(r)), script.answer_of(r)) for r in chosen)
    assert len(cells) == 8 and set(cells.values()) == {5}


def test_captions_only_where_colour_and_shape_are_known():
    script = load_benchmark("yes_no_from_image")
    data = rows()
    facts = script.facts_by_image(data)
    assert facts["1.png"] == {"color": "red", "shape": "circle"} and facts["0.png"] == {"color": "blue"}
    assert data[6]["image"] == "1.png"
    text = script.captioned(data[6], facts["1.png"])["conversations"][0]["value"]
    assert text.startswith("<image>\nThe image shows a red circle.\nIs there a red shape?")
    assert script.captioned(data[0], facts["0.png"]) is None
    out = script.training_rows(data, facts, Path("/data"), 1.0)
    written = [r for r in out if "The image shows" in r["conversations"][0]["value"]]
    assert written and all(facts[r["image"][len("/data/") :]].keys() == {"color", "shape"} for r in written)
    assert all(r["image"].startswith("/data/") for r in out)
    assert not any(
        "The image shows" in r["conversations"][0]["value"]
        for r in script.training_rows(data, facts, Path("/d"), 0.0)
    )


def test_a_missing_stage_2_is_named_with_exit_2(tmp_path):
    proc = run_benchmark(
        "yes_no_from_image", "--stage2", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nothing") in proc.stderr and "eve quickstart" in proc.stderr


def test_forms_keep_one_kind_of_question_and_image_last_moves_the_image_after_it():
    script = load_benchmark("yes_no_from_image")
    data = rows()
    facts = script.facts_by_image(data)
    every = script.training_rows(data, facts, Path("/d"), 0.0)
    shape = script.training_rows(data, facts, Path("/d"), 0.0, forms="shape")
    colour = script.training_rows(data, facts, Path("/d"), 0.0, forms="color")
    assert shape and colour and len(shape) + len(colour) == len(every)
    assert {script.kind_of(r) for r in shape} == {"shape"}
    assert {script.kind_of(r) for r in colour} == {"color"}
    captioned_shape = script.training_rows(data, facts, Path("/d"), 1.0, forms="shape")
    assert len(captioned_shape) == len(shape)
    assert any("The image shows" in r["conversations"][0]["value"] for r in captioned_shape)
    last = script.training_rows(data, facts, Path("/d"), 1.0, image_after_question=True)
    texts = [r["conversations"][0]["value"] for r in last]
    assert all(t.endswith("\n<image>") and t.count("<image>") == 1 for t in texts)
    assert "The image shows a red circle.\nIs there a red shape? Answer with one word.\n<image>" in texts
    assert [r["conversations"][1:] for r in last] == [r["conversations"][1:] for r in every]


def test_image_last_refuses_a_turn_that_does_not_start_with_the_image():
    script = load_benchmark("yes_no_from_image")
    assert script.image_last("<image>\nIs there a circle?") == "Is there a circle?\n<image>"
    with pytest.raises(ValueError, match="starting with"):
        script.image_last("Is there a circle?\n<image>")
