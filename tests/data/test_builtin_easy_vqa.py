"""easy-VQA -> LLaVA JSON: caption inference from questions, row format, and the real package's counts."""

import importlib.util
import json
from collections import Counter
from types import SimpleNamespace

import pytest
from PIL import Image

from eve_vlm.data.builtin.easy_vqa import (
    DIALOGUE_TURNS,
    balanced_yes_no,
    build_easy_vqa,
    caption_for,
    dialogue_questions,
    image_facts,
    question_facts,
    question_type,
    vqa_row,
    yes_no_form,
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
        "dialogues": 2,  # one conversation per train image (fewer than DIALOGUE_TURNS questions each)
        "dialogues_balanced": 1,  # the two "no" answers have no "yes" of their form to balance them: dropped
        "dialogues_open": 1,  # image 1 was asked yes/no questions only
        "dialogues_described": 2,
        "dialogues_balanced_described": 1,
        "dialogues_open_described": 1,
        "test_images": 1,
        "test_questions": 1,
        "test_shape": 0,
        "test_color": 1,
        "test_yes-no": 0,
    }
    captions = json.loads((out / "captions.json").read_text())
    assert captions[0]["image"] == "images/train/0.png"
    assert captions[0]["conversations"][1]["value"] == "A red circle."
    dialogues = json.loads((out / "train_dialogues.json").read_text())
    assert [len(d["conversations"]) for d in dialogues] == [4, 2]  # image 0: two turns; image 1: one
    assert dialogues[0]["conversations"][0]["value"].startswith("<image>\n")
    assert "<image>" not in dialogues[0]["conversations"][2]["value"]
    assert {t["value"] for t in dialogues[0]["conversations"][1::2]} == {"circle", "no"}
    dialogues = json.loads((out / "train_dialogues_balanced.json").read_text())
    assert dialogues[0]["conversations"] == [
        {"from": "human", "value": "<image>\nWhat is the red shape? Answer with one word."},
        {"from": "gpt", "value": "circle"},
    ]
    dialogues = json.loads((out / "train_dialogues_open.json").read_text())
    assert [d["conversations"][1::2] for d in dialogues] == [[{"from": "gpt", "value": "circle"}]]
    assert dialogues[0]["image"] == "images/train/0.png"
    described = json.loads((out / "train_dialogues_described.json").read_text())
    plain = json.loads((out / "train_dialogues.json").read_text())
    assert described[0]["conversations"][:3] == [
        {"from": "human", "value": "<image>\nDescribe the image in a few words."},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": plain[0]["conversations"][0]["value"].removeprefix("<image>\n")},
    ]
    assert described[0]["conversations"][3:] == plain[0]["conversations"][1:]
    assert sum("<image>" in t["value"] for t in described[0]["conversations"]) == 1
    assert described[1] == plain[1]  # image 1's caption is unknown: no caption turn
    open_described = json.loads((out / "train_dialogues_open_described.json").read_text())
    assert open_described[0]["conversations"][1] == {"from": "gpt", "value": "A red circle."}
    for name in (
        "captions",
        "train",
        "train_dialogues",
        "train_dialogues_balanced",
        "train_dialogues_open",
        "train_dialogues_described",
        "train_dialogues_balanced_described",
        "train_dialogues_open_described",
        "test",
    ):
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
    import easy_vqa

    counts = build_easy_vqa(tmp_path)
    assert (counts["train_images"], counts["train_questions"]) == (4000, 38575)
    assert (counts["test_images"], counts["test_questions"]) == (1000, 9673)
    assert counts["captions"] == 3971
    dialogues = json.loads((tmp_path / "train_dialogues.json").read_text())
    assert sum(len(d["conversations"]) for d in dialogues) == 2 * 38575  # every question once
    dialogues = json.loads((tmp_path / "train_dialogues_balanced.json").read_text())
    assert len(dialogues) == counts["dialogues_balanced"]
    questions, answers, _ = easy_vqa.get_train_questions()
    kept = balanced_yes_no(questions, answers)
    assert sum(len(d["conversations"]) for d in dialogues) == 2 * len(kept)  # each kept question once
    assert max(len(d["conversations"]) for d in dialogues) == 2 * DIALOGUE_TURNS
    replies = Counter(t["value"] for d in dialogues for t in d["conversations"][1::2])
    assert replies["yes"] == replies["no"] and replies["circle"] > 1000
    assert counts["test_shape"] + counts["test_color"] + counts["test_yes-no"] == 9673
    dialogues = json.loads((tmp_path / "train_dialogues_open.json").read_text())
    replies = Counter(t["value"] for d in dialogues for t in d["conversations"][1::2])
    assert not replies["yes"] and not replies["no"] and len(dialogues) == counts["dialogues_open"]
    assert sum(replies.values()) == sum(a not in ("yes", "no") for a in answers)  # each open question once
    assert max(len(d["conversations"]) for d in dialogues) == 2 * DIALOGUE_TURNS
    assert len(list((tmp_path / "images" / "train").iterdir())) == 4000
    test = json.loads((tmp_path / "test.json").read_text())
    assert {r["question_type"] for r in test} == {"shape", "color", "yes-no"}
    assert all(r["answers"] == [r["conversations"][1]["value"]] for r in test)
    train_images = {r["image"] for r in json.loads((tmp_path / "train.json").read_text())}
    assert not train_images & {r["image"] for r in test}  # eval images are never trained on


def test_yes_no_balance_per_form():
    questions = ["is there a red shape?"] * 5 + ["is there not a red shape?"] * 3 + ["what color is it?"]
    answers = ["no", "no", "yes", "no", "no", "yes", "yes", "no", "red"]
    assert yes_no_form("is no circle present?") == (True, "shape")
    assert yes_no_form("is there a red shape?") == (False, "color")
    kept = balanced_yes_no(questions, answers, seed=1)
    assert 2 in kept and 7 in kept and 8 in kept  # minority answers and non-yes/no questions all stay
    assert len(kept) == 5 and kept == sorted(kept)
    assert sum(answers[k] == "yes" for k in kept) == sum(answers[k] == "no" for k in kept) == 2
    assert balanced_yes_no(questions, answers, seed=1) == kept


def test_dialogue_questions_keep_all_balanced_or_open():
    questions = ["is there a red shape?", "what color is it?", "is there not a red shape?", "what shape?"]
    answers = ["no", "red", "yes", "circle"]
    assert dialogue_questions(questions, answers, "all") == [0, 1, 2, 3]
    assert dialogue_questions(questions, answers, "open") == [1, 3]  # no yes/no question
    assert dialogue_questions(questions, answers, "balanced") == [1, 3]  # one of each form: no pair to keep
    with pytest.raises(ValueError, match="open"):
        dialogue_questions(questions, answers, "yes-no")
