"""easy-VQA -> LLaVA JSON: caption inference from questions, row format, and the real package's counts."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
from PIL import Image

from eve_vlm.data.builtin.easy_vqa import (
    build_easy_vqa,
    caption_for,
    image_facts,
    question_facts,
    question_type,
    vqa_row,
)
from eve_vlm.data.llava import DataSource, load_rows


@pytest.mark.parametrize(
    "question, answer, facts, ruled_out",
    [
        ("what is the blue shape?", "rectangle", {"shape": "rectangle", "color": "blue"}, set()),
        ("what color is the triangle?", "red", {"shape": "triangle", "color": "red"}, set()),
        ("what shape is in the image?", "circle", {"shape": "circle"}, set()),
        ("is there a teal shape?", "yes", {"color": "teal"}, set()),
        ("is there not a teal shape?", "no", {"color": "teal"}, set()),
        ("is no circle present?", "no", {"shape": "circle"}, set()),
        ("is there a circle?", "no", {}, {"circle"}),
        ("does the image not contain a gray shape?", "yes", {}, {"gray"}),
    ],
)
def test_question_facts(question, answer, facts, ruled_out):
    assert question_facts(question, answer) == (facts, ruled_out)


def test_image_facts_infers_the_last_shape_left():
    pairs = [("is there a circle?", "no"), ("is there not a triangle in the image?", "yes")]
    assert image_facts(pairs) == {"shape": "rectangle"}
    pairs.append(("what color is the shape?", "green"))
    assert caption_for(image_facts(pairs)) == "A green rectangle."


def test_image_facts_rejects_contradictions():
    with pytest.raises(ValueError, match="contradicting"):
        image_facts([("what shape is present?", "circle"), ("is there a triangle?", "yes")])


def test_caption_says_only_what_is_known():
    assert caption_for({"shape": "triangle", "color": "blue"}) == "A blue triangle."
    assert caption_for({"color": "blue"}) == "A blue shape."
    assert caption_for({"shape": "circle"}) == "A circle."
    assert caption_for({}) is None


def test_vqa_row_format():
    row = vqa_row("q1", "images/test/3.png", "is there a red shape?", "no", with_answers=True)
    assert row["conversations"][0]["value"] == "<image>\nIs there a red shape? Answer with one word."
    assert row["conversations"][1] == {"from": "gpt", "value": "no"}
    assert row["answers"] == ["no"] and row["question_type"] == "yes-no"
    assert question_type("teal") == "color" and question_type("circle") == "shape"
    assert "answers" not in vqa_row("q2", "a.png", "what shape is present?", "circle", with_answers=False)


def fake_easy_vqa(folder):
    """Two train images and one test image with easy-VQA's API."""
    paths = {}
    for split, ids in (("train", (0, 1)), ("test", (0,))):
        for i in ids:
            path = folder / f"{split}{i}.png"
            Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
            paths.setdefault(split, {})[i] = str(path)
    train = (
        ["what is the red shape?", "is there a blue shape?", "is there a circle?"],
        ["circle", "no", "no"],
        [0, 0, 1],
    )
    test = (["what color is the circle?"], ["red"], [0])
    return SimpleNamespace(
        get_train_questions=lambda: train,
        get_test_questions=lambda: test,
        get_train_image_paths=lambda: paths["train"],
        get_test_image_paths=lambda: paths["test"],
    )


def test_build_on_fake_source_writes_loadable_llava_json(tmp_path):
    out = tmp_path / "out"
    counts = build_easy_vqa(out, fake_easy_vqa(tmp_path))
    assert counts == {
        "train_images": 2,
        "train_questions": 3,
        "captions": 1,  # image 1 only rules out a circle: nothing to say
        "test_images": 1,
        "test_questions": 1,
        "test_shape": 0,
        "test_color": 1,
        "test_yes-no": 0,
    }
    captions = json.loads((out / "captions.json").read_text())
    assert captions[0]["image"] == "images/train/0.png"
    assert captions[0]["conversations"][1]["value"] == "A red circle."
    for name in ("captions", "train", "test"):
        rows = load_rows([DataSource(str(out / f"{name}.json"))]).rows
        assert all(r.image and r.image.endswith(".png") for r in rows)
    first = (out / "train.json").read_bytes()
    build_easy_vqa(out, fake_easy_vqa(tmp_path))
    assert (out / "train.json").read_bytes() == first


@pytest.mark.skipif(
    importlib.util.find_spec("easy_vqa") is None,
    reason="easy-vqa is not installed (pip install easy-vqa==1.0)",
)
def test_real_easy_vqa_counts(tmp_path):
    counts = build_easy_vqa(tmp_path)
    assert (counts["train_images"], counts["train_questions"]) == (4000, 38575)
    assert (counts["test_images"], counts["test_questions"]) == (1000, 9673)
    assert counts["captions"] == 3971
    assert counts["test_shape"] + counts["test_color"] + counts["test_yes-no"] == 9673
    assert len(list((tmp_path / "images" / "train").iterdir())) == 4000
    test = json.loads((tmp_path / "test.json").read_text())
    assert {r["question_type"] for r in test} == {"shape", "color", "yes-no"}
    assert all(r["answers"] == [r["conversations"][1]["value"]] for r in test)
    train_images = {r["image"] for r in json.loads((tmp_path / "train.json").read_text())}
    assert not train_images & {r["image"] for r in test}  # eval images are never trained on
