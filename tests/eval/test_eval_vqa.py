"""VQA eval: answer normalisation, scoring on given predictions, eval-file checks, batched generation, CLI.

Also holds the small builders (tiny model + processor, images, eval file) the other eval tests import.
"""

import argparse
import json

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from PIL import Image

from eve_vlm.errors import DataError
from eve_vlm.eval.cli import add_eval_parser
from eve_vlm.eval.vqa import (
    answer_accuracy,
    describe_images,
    evaluate_vqa,
    load_vqa_rows,
    modality_batches,
    normalize_answer,
    paired_difference,
    render_prompt,
    score_predictions,
    standard_error,
    stop_token_ids,
)
from eve_vlm.model import EveProcessor

EVAL_ROWS = [
    {
        "id": "q1",
        "image": "img0.png",
        "question_type": "colour",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is the colour of the shape"},
            {"from": "gpt", "value": "red"},
        ],
    },
    {
        "id": "q2",
        "image": "img1.png",
        "type": "count",
        "conversations": [{"from": "human", "value": "what is in this image"}],
        "answers": ["two", "2", {"answer": "three"}],
    },
    {
        "id": "q3",
        "image": "img2.png",
        "question_type": "yes/no",
        "conversations": [
            {"from": "human", "value": "does the picture contain a circle"},
            {"from": "gpt", "value": "yes"},
        ],
    },
    {
        "id": "t1",
        "conversations": [{"from": "human", "value": "what is one"}, {"from": "gpt", "value": "one"}],
    },
    {
        "id": "q4",
        "image": "img0.png",
        "question_type": "colour",
        "conversations": [
            {"from": "human", "value": "what is the colour of this square"},
            {"from": "gpt", "value": "blue"},
        ],
    },
]


def model_and_processor(evf: bool = True, lora: bool = False, seed: int = 0):
    """A tiny Eve model (optionally with LoRA and EVF layers 0, 2) and its processor, wired together."""
    model = tiny_model(seed=seed)
    cfg = model.config
    processor = EveProcessor.from_parts(
        tokenizer=tiny_tokenizer(),
        vision_config=cfg.vision_config,
        image_size=cfg.image_size,
        num_image_tokens=cfg.num_image_tokens,
    )
    model.config.image_token_id = processor.image_token_id
    if lora:
        model.add_lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.5
    if evf:
        model.add_elastic_vision_ffns("alternate")
    return model.eval(), processor


def write_eval_set(folder, rows=None, name="eval.jsonl"):
    """Three small PNGs and a JSONL eval file in `folder`; returns the file path."""
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (36, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows or EVAL_ROWS)))
    return path


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="eve")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Red", "red"),
        ("  The red one.  ", "red 1"),
        ("Two dogs!", "2 dogs"),
        ("an apple", "apple"),
        ("none", "0"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("yes.", "yes"),
        ("2.", "2"),  # the period after a digit goes too (vqaEval.py periodStrip)
        ("3. ", "3"),
        ("dont", "don't"),
        ("don't", "don't"),
        ("black-and-white", "black and white"),
        ("A\tcat\n", "cat"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_answer_accuracy_exact_and_soft():
    assert answer_accuracy("Red.", ["red"]) == (1.0, 1.0)
    assert answer_accuracy("blue", ["red"]) == (0.0, 0.0)
    refs = ["2", "two", "3", "three", "3"]  # normalised: 2, 2, 3, 3, 3 (majority 3)
    assert answer_accuracy("two", refs) == (pytest.approx(2 / 3), 0.0)
    assert answer_accuracy("Three", refs) == (1.0, 1.0)
    assert answer_accuracy("4", refs) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_ten_annotator_soft_accuracy_averages_the_leave_one_out_subsets(matches, expected):
    """VQAv2/TextVQA: each of the 10 subsets of 9 annotators scores min(1, matches / 3); the mean is 0.9 for
    three matching annotators, not 1.0."""
    refs = ["cat"] * matches + ["dog"] * (10 - matches)
    assert answer_accuracy("cat", refs)[0] == pytest.approx(expected)


def test_score_predictions_on_given_predictions():
    predictions = [
        {"prediction": "Red", "answers": ["red"], "question_type": "colour", "image": "a.png"},
        {"prediction": "green", "answers": ["blue"], "question_type": "colour", "image": "a.png"},
        {"prediction": "2", "answers": ["two", "2", "three"], "question_type": "count", "image": "b.png"},
        {"prediction": "yes", "answers": ["yes"], "image": None},
    ]
    m = score_predictions(predictions)
    assert m["questions"] == 4
    assert m["accuracy"] == pytest.approx(100 * (1 + 0 + 2 / 3 + 1) / 4)
    assert m["exact_match"] == pytest.approx(100 * 3 / 4)
    assert m["by_type"]["colour"] == {
        "questions": 2,
        "accuracy": 50.0,
        "accuracy_stderr": 50.0,
        "exact_match": 50.0,
    }
    assert m["by_type"]["count"]["accuracy"] == pytest.approx(100 * 2 / 3)
    assert m["by_type"]["untyped"]["questions"] == 1
    assert m["by_modality"]["image"]["questions"] == 3 and m["by_modality"]["text"]["accuracy"] == 100.0


def test_load_vqa_rows_reads_answers_types_and_images(tmp_path):
    rows = load_vqa_rows(write_eval_set(tmp_path))
    assert [r.id for r in rows] == ["q1", "q2", "q3", "t1", "q4"]
    assert rows[0].answers == ["red"] and rows[0].question_type == "colour"
    assert rows[1].answers == ["two", "2", "three"] and rows[1].question_type == "count"
    assert rows[1].question.startswith("<image>\n")  # marker placed as in training
    assert rows[1].row.conversations[-1] == {"from": "gpt", "value": "two"}
    assert rows[2].image == str(tmp_path / "img2.png") and rows[3].image is None
    assert len(load_vqa_rows(tmp_path / "eval.jsonl", limit=2)) == 2


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "malformed JSON"),
        (
            json.dumps({"id": "x", "conversations": [{"from": "human", "value": "what"}]}),
            "no reference answer",
        ),
        (
            json.dumps(
                {"id": "x", "image": "missing.png", **{k: EVAL_ROWS[0][k] for k in ("conversations",)}}
            ),
            "not found",
        ),
        (json.dumps({"id": "x", "conversations": EVAL_ROWS[3]["conversations"], "answers": []}), "answers"),
    ],
)
def test_malformed_eval_file_names_file_and_line(tmp_path, bad_line, reason):
    path = write_eval_set(tmp_path)
    lines = path.read_text().splitlines()
    lines.insert(2, bad_line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"eval\.jsonl, line 3.*{reason}"):
        load_vqa_rows(path)


def test_batched_generation_matches_one_by_one_and_never_mixes_modalities(tmp_path):
    model, processor = model_and_processor(evf=True, lora=True)
    rows = load_vqa_rows(write_eval_set(tmp_path))
    seen = []
    generate = model.generate

    def spy(**kwargs):
        seen.append((kwargs["input_ids"] == processor.image_token_id).any(dim=1).tolist())
        return generate(**kwargs)

    model.generate = spy
    batched = evaluate_vqa(model, processor, rows, batch_size=3, max_new_tokens=4, progress=False)
    single = evaluate_vqa(model, processor, rows, batch_size=1, max_new_tokens=4, progress=False)
    assert all(all(flags) or not any(flags) for flags in seen)
    assert [len(f) for f in seen[:3]] == [3, 1, 1]  # 4 image rows in 3 + 1, then the text row
    by_id = {p["id"]: p["prediction"] for p in single["predictions"]}
    assert {p["id"]: p["prediction"] for p in batched["predictions"]} == by_id
    assert processor.tokenizer.padding_side == "right"  # restored
    assert batched["questions"] == 5 and set(batched["by_type"]) == {"colour", "count", "untyped", "yes/no"}


def test_describe_first_asks_each_question_after_the_models_own_description(tmp_path):
    model, processor = model_and_processor(evf=True, lora=True)
    rows = load_vqa_rows(write_eval_set(tmp_path))
    prompt = "describe the shape"
    batch_sizes = []
    generate = model.generate

    def spy(**kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    model.generate = spy
    result = evaluate_vqa(
        model,
        processor,
        rows,
        batch_size=8,
        max_new_tokens=4,
        describe_first=prompt,
        describe_tokens=5,
        progress=False,
    )
    model.generate = generate
    assert batch_sizes[0] == 3  # img0 (asked twice), img1 and img2, each described once
    assert result["describe_first"] == prompt
    descriptions = describe_images(
        model, processor, [r.image for r in rows if r.image], prompt, batch_size=1, max_new_tokens=5
    )
    plain = evaluate_vqa(model, processor, rows, batch_size=1, max_new_tokens=4, progress=False)
    assert "describe_first" not in plain
    plain_by_id = {p["id"]: p["prediction"] for p in plain["predictions"]}
    by_id = {r.id: r for r in rows}
    for p in result["predictions"]:
        row = by_id[p["id"]]
        if row.image is None:  # no image to describe: asked as usual
            assert p["description"] is None and p["prediction"] == plain_by_id[row.id]
            continue
        assert p["description"] == descriptions[row.image]
        text = render_prompt(processor, row.question, None, (prompt, p["description"]))
        expected = processor.chat_prompt(
            row.question.replace("<image>", "").strip(),
            history=[
                {"role": "user", "content": f"<image>\n{prompt}"},
                {"role": "assistant", "content": p["description"]},
            ],
        )
        assert text == expected and text.count("<image>") == 1
        assert text.index(prompt) < text.index(row.question.replace("<image>", "").strip())
        with Image.open(row.image) as im:
            inputs = processor([text], images=[im.convert("RGB")])
        stop = stop_token_ids(processor.tokenizer)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=stop, pad_token_id=0)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert p["prediction"] == answer.strip()


@pytest.mark.parametrize(
    "question",
    [
        "<image>\nWhat colour is the shape?\nAnswer with one word.",
        "What colour is the shape?\n<image>\nAnswer with one word.",
        "What colour is the shape?\nAnswer with one word.\n<image>",
        "What colour is <image> the shape?\nAnswer with one word.",
        "What colour is<image> the shape?\nAnswer with one word.",
    ],
)
def test_describe_first_prompt_moves_the_image_to_the_first_turn_wherever_the_question_has_it(question):
    _, processor = model_and_processor(evf=False)
    text = render_prompt(processor, question, None, ("describe it", "A red circle."))
    expected = processor.chat_prompt(
        "What colour is the shape?\nAnswer with one word.",
        history=[
            {"role": "user", "content": "<image>\ndescribe it"},
            {"role": "assistant", "content": "A red circle."},
        ],
    )
    assert text == expected
    assert text.count("<image>") == 1 and text.index("<image>") < text.index("describe it")


def test_modality_batches_group_questions_of_similar_length():
    rows = [
        argparse.Namespace(question="q" * n, image=image)
        for n, image in ((9, "a.png"), (2, None), (1, "b.png"), (8, "c.png"), (2, "d.png"), (1, None))
    ]
    batches = [[(len(r.question), r.image is not None) for r in b] for b in modality_batches(rows, 2)]
    assert batches == [[(1, True), (2, True)], [(8, True), (9, True)], [(1, False), (2, False)]]


def test_eve_eval_vqa_cli(tmp_path):
    model, processor = model_and_processor(evf=True)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    data = write_eval_set(tmp_path)
    out = tmp_path / "out"
    run_cli(
        ["eval", "vqa", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out)]
        + ["--batch-size", "2", "--limit", "4", "--max-new-tokens", "3", "--quiet"]
    )
    metrics = json.loads((out / "vqa_metrics.json").read_text())
    predictions = [json.loads(x) for x in (out / "vqa_predictions.jsonl").read_text().splitlines()]
    assert metrics["questions"] == 4 and len(predictions) == 4
    assert {"id", "prediction", "answers", "accuracy"} <= set(predictions[0])
    assert metrics["accuracy"] == pytest.approx(100 * sum(p["accuracy"] for p in predictions) / 4)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--describe-first", "  "], "--describe-first is empty"),
        (["--describe-tokens", "0"], "--describe-tokens 0"),
    ],
)
def test_eve_eval_vqa_refuses_an_empty_describe_prompt_or_no_tokens_before_loading(
    tmp_path, capsys, option, message
):
    from eve_vlm.cli import main

    data = write_eval_set(tmp_path)
    missing = tmp_path / "no-model"  # never loaded: the options are checked first
    argv = [
        "eval",
        "vqa",
        "--model",
        str(missing),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        *option,
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_standard_error_and_paired_difference():
    assert standard_error([1.0]) == 0.0
    assert standard_error([1.0, 1.0, 1.0]) == 0.0
    # sample sd of (1, 0, 1, 0) = sqrt(1/3); over sqrt(4)
    assert standard_error([1.0, 0.0, 1.0, 0.0]) == pytest.approx(100 * (1 / 3) ** 0.5 / 2)
    a = [{"id": i, "accuracy": acc} for i, acc in enumerate([1.0, 1.0, 0.0, 1.0])]
    b = [{"id": i, "accuracy": acc} for i, acc in reversed(list(enumerate([1.0, 0.0, 0.0, 0.0])))]
    d = paired_difference(a, b)
    assert d["questions"] == 4 and d["difference"] == pytest.approx(50.0)
    assert d["stderr"] == pytest.approx(standard_error([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="same, distinct question ids"):
        paired_difference(a, b[:3])
    repeated = [{"id": i, "accuracy": 1.0} for i in (0, 0, 1)]  # same id set and length, mis-paired
    with pytest.raises(ValueError, match="same, distinct question ids"):
        paired_difference(repeated, [{"id": i, "accuracy": 0.0} for i in (0, 1, 1)])
