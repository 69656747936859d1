"""The paper's benchmark suite: every benchmark's fixture in its on-disk format with a hand-computed score,
resumable generation, `eve eval bench` end to end and `eve eval score` errors."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from test_eval_vqa import model_and_processor

from eve_vlm.cli import main
from eve_vlm.errors import DataError
from eve_vlm.eval.bench import paper_suite
from eve_vlm.eval.bench.generate import generate_benchmark_answers
from eve_vlm.eval.bench.run import score_bench


def png(path=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


SHORT = "\nAnswer the question using a single word or phrase."


def make_data_root(root):
    """Every benchmark's files in LLaVA's eval layout; returns {bench: {question_id: answer}} (hand-scored)."""
    answers = {}
    # GQA: "Yes." -> "yes" right; "red car" wrong; q3 not balanced (left out) -> 50.0
    jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl",
          [{"question_id": q, "image": "n1.jpg", "text": f"what is {q}{SHORT}", "category": "default"}
           for q in ("q1", "q2", "q3")])  # fmt: skip
    png(root / "gqa/data/images/n1.jpg")
    truth = {"q1": ("yes", True), "q2": ("red", True), "q3": ("blue", False)}
    (root / "gqa/testdev_balanced_questions.json").write_text(
        json.dumps({q: {"imageId": "n1", "answer": a, "isBalanced": b} for q, (a, b) in truth.items()})
    )
    answers["gqa"] = {"q1": "Yes.", "q2": "red car", "q3": "blue"}
    # ScienceQA: "B" right; "A." unparseable -> wrong; text-only "The answer is A." right; "C" past 2 choices wrong
    problems = {
        "1": {"question": "q", "choices": ["x", "y", "z"], "answer": 1, "hint": "", "image": "image.png"},
        "2": {"question": "q", "choices": ["x", "y"], "answer": 0, "hint": "h", "image": "image.png"},
        "3": {"question": "q", "choices": ["x", "y"], "answer": 0, "hint": "", "image": None},
        "4": {"question": "q", "choices": ["x", "y"], "answer": 1, "hint": "", "image": "image.png"},
    }
    (root / "scienceqa").mkdir()
    (root / "scienceqa/problems.json").write_text(json.dumps(problems))
    rows = []
    for pid, p in problems.items():
        value = "what is it\nA. x\nB. y"
        row = {"id": pid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "A"}]}
        if p["image"]:
            row["image"] = f"{pid}/image.png"
            row["conversations"][0]["value"] = "<image>\n" + value
            png(root / f"scienceqa/images/test/{pid}/image.png")
        rows.append(row)
    (root / "scienceqa/llava_test_CQM-A.json").write_text(json.dumps(rows))
    answers["sqa_img"] = {"1": "B", "2": "A.", "3": "The answer is A.", "4": "C"}
    # TextVQA: 3 of 10 annotators -> 0.9 (leave-one-out), 10 of 10 -> 1.0 => 95.0
    jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl",
          [{"question_id": i, "image": f"{i}.jpg", "text": f"{q}\nReference OCR token: a, b{SHORT}"}
           for i, q in (("img1", "What brand is it?"), ("img2", "What does the sign say?"))])  # fmt: skip
    png(root / "textvqa/train_images/img1.jpg")
    png(root / "textvqa/train_images/img2.jpg")
    annotations = [
        {"question": "What brand is it?", "image_id": "img1", "question_id": 1,
         "answers": ["coca cola"] * 3 + ["pepsi"] * 7},
        {"question": "What does the sign say?", "image_id": "img2", "question_id": 2, "answers": ["stop"] * 10},
    ]  # fmt: skip
    (root / "textvqa/TextVQA_0.5.1_val.json").write_text(json.dumps({"data": annotations}))
    answers["textvqa"] = {"img1": "Coca Cola.", "img2": "STOP"}
    # POPE: adversarial F1 1.0; popular ("I think so" parses yes: FP) F1 2/3; random ("not sure" -> no: FN) F1 0
    labels = {"adversarial": [(1, "yes"), (2, "no")], "popular": [(3, "no"), (4, "yes")],
              "random": [(5, "yes"), (6, "no")]}  # fmt: skip
    rows = []
    for split, pairs in labels.items():
        jsonl(
            root / f"pope/coco/coco_pope_{split}.json",
            [
                {"question_id": q, "image": "c.jpg", "text": "Is there a dog?", "label": lab}
                for q, lab in pairs
            ],
        )
        rows += [{"question_id": q, "image": "c.jpg", "text": f"Is there a dog?{SHORT}", "category": split}
                 for q, _ in pairs]  # fmt: skip
    jsonl(root / "pope/llava_pope_test.jsonl", rows)
    png(root / "pope/val2014/c.jpg")
    answers["pope"] = {"1": "Yes, there is a dog.", "2": "There is no dog.", "3": "I think so", "4": "Yes",
                       "5": "not sure", "6": "No"}  # fmt: skip
    # MME: existence acc 75 + acc+ 50; artwork ("Maybe" -> other) 50 + 0; code_reasoning 200 (cognition)
    release = root / "MME/MME_Benchmark_release_version"
    mme = [
        ("existence", "a", None),
        ("existence", "b", None),
        ("artwork", "c", "images"),
        ("code_reasoning", "d", None),
    ]
    rows = []
    for task, stem, sub in mme:
        image = f"{task}/{sub + '/' if sub else ''}{stem}.png"
        png(release / image)
        qa = release / task / ("questions_answers_YN" if sub else "") / f"{stem}.txt"
        qa.parent.mkdir(parents=True, exist_ok=True)
        qa.write_text("Is it red? Please answer yes or no.\tYes\nIs it blue? Please answer yes or no.\tNo\n")
        rows += [{"question_id": image, "image": image, "text": f"Is it {c}?{SHORT}", "category": task}
                 for c in ("red", "blue")]  # fmt: skip
    jsonl(root / "MME/llava_mme.jsonl", rows)
    pairs = {"a": ("Yes", "no, it is not"), "b": ("yes", "Yes"), "c": ("Maybe", "No"), "d": ("Yes", "No")}
    answers["mme"] = {}
    for _, stem, _ in mme:
        image = next(r["question_id"] for r in rows if f"/{stem}.png" in r["question_id"])
        answers["mme"][image] = pairs[stem]
    # MMBench: question 1 right in rotation 0 but wrong in its rotation -> wrong; question 2 right by option text
    b64 = base64.b64encode(png()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit"
    lines = [
        f"1\tWhat animal?\tnan\tcat\tdog\t\t\tA\tc\t{b64}\ts\tl\t\tdev",
        f"1000001\tWhat animal?\tnan\tdog\tcat\t\t\tB\tc\t{b64}\ts\tl\t\tdev",
        f"2\tWhich one?\tA hint\tbird\tfish\tdog\tcat\tC\tc\t{b64}\ts\tl\t\tdev",
    ]
    (root / "mmbench").mkdir()
    (root / "mmbench/mmbench_dev_en_20231003.tsv").write_text("\n".join([header, *lines]) + "\n")
    answers["mmbench"] = {"1": "A", "1000001": "A", "2": "It is a dog"}
    # Language sets (two subjects / items each)
    for subject in ("anatomy", "virology"):
        for split in ("dev", "test"):
            path = root / f"mmlu/{split}/{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("what is one,one,two,three,red,A\nwhat is two,one,two,three,red,B\n")
        for split in ("dev", "val"):
            path = root / f"ceval/{split}/{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("id,question,A,B,C,D,answer\n0,what is one,one,two,three,red,A\n")
    jsonl(root / "piqa/dev.jsonl", [{"id": "p", "goal": "what is red", "sol1": "red", "sol2": "two"}] * 2)
    (root / "piqa/dev-labels.lst").write_text("0\n1\n")
    return answers


EXPECTED = {"gqa": 50.0, "sqa_img": 100 / 3, "textvqa": 95.0, "pope": (100 + 200 / 3 + 0) / 3, "mme": 175.0,
            "mmbench": 50.0}  # fmt: skip


def write_answers(path, bench, answers, root):
    questions = {str(q.question_id): q for q in paper_suite().get(bench).load(str(root))}
    rows = []
    for qid, text in answers.items():
        texts = text if isinstance(text, tuple) else (text,)
        same = [q for q in questions.values() if str(q.question_id) == qid]
        prompts = [q.prompt for q in paper_suite().get(bench).load(str(root)) if str(q.question_id) == qid]
        for t, prompt in zip(texts, prompts, strict=True):
            rows.append({"question_id": same[0].question_id, "prompt": prompt, "text": t, "answer_id": "x",
                         "model_id": "llava", "metadata": {}})  # fmt: skip
    jsonl(path, rows)


@pytest.mark.parametrize("bench", list(EXPECTED))
def test_each_scorer_reproduces_the_hand_computed_score(tmp_path, bench):
    root = tmp_path / "eval"
    answers = make_data_root(root)
    write_answers(tmp_path / "answers.jsonl", bench, answers[bench], root)
    result = score_bench(paper_suite(), bench, str(tmp_path / "answers.jsonl"), str(root))
    assert result["headline"] == pytest.approx(EXPECTED[bench])
    if bench == "sqa_img":
        assert result["accuracy"] == pytest.approx(50.0) and result["failed_parses"] == 1
    if bench == "pope":
        assert [s["f1"] for s in result["splits"].values()] == pytest.approx([100, 200 / 3, 0])
    if bench == "mme":
        assert result["subtasks"]["existence"] == pytest.approx({"acc": 75, "acc_plus": 50, "score": 125,
                                                                 "questions": 4})  # fmt: skip
        assert result["cognition"] == pytest.approx(200.0)
    if bench == "mmbench":
        assert result["vanilla_accuracy"] == pytest.approx(100.0) and result["questions"] == 2


def saved_model(tmp_path):
    model, processor = model_and_processor(evf=True)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    model.language_model.save_pretrained(tmp_path / "base")
    return model, processor


def test_eve_eval_bench_runs_end_to_end_and_writes_the_table(tmp_path):
    make_data_root(tmp_path / "eval")
    saved_model(tmp_path)
    argv = ["eval", "bench", "--suite", "paper", "--data-root", str(tmp_path / "eval"), "--model",
            str(tmp_path / "model"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "out"),
            "--batch-size", "2", "--max-new-tokens", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    row = metrics["models"]["model"]
    assert set(row) == {"gqa", "sqa_img", "textvqa", "pope", "mme", "mmbench", "mmlu", "ceval", "piqa"}
    assert metrics["delta"]["model"] == pytest.approx(
        {k: 0.0 for k in ("mmlu", "ceval", "piqa")}
    )  # text path
    assert metrics["paper"]["Eve-1.8B"]["mme"] == 1466.0
    report = (tmp_path / "out/report.md").read_text()
    assert "| base LLM |" in report and "Eve-1.8B (paper" in report
    rows = [json.loads(x) for x in (tmp_path / "out/answers/mme.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(
        rows[0]
    )


def test_an_interrupted_run_resumes_without_regenerating_finished_answers(tmp_path, monkeypatch):
    root = tmp_path / "eval"
    make_data_root(root)
    model, processor = model_and_processor(evf=True)
    questions = paper_suite().get("pope").load(str(root))
    path = str(tmp_path / "pope.jsonl")
    original, calls = model.generate, []

    def interrupted(**kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_benchmark_answers(
            model, processor, questions, path, model_id="m", batch_size=2, progress=False
        )
    assert len((tmp_path / "pope.jsonl").read_text().splitlines()) == 4
    calls.clear()

    def counting(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", counting)
    n = generate_benchmark_answers(
        model, processor, questions, path, model_id="m", batch_size=2, progress=False
    )
    assert n == 2 and calls == [2]  # only the two unanswered questions
    ids = [json.loads(x)["question_id"] for x in (tmp_path / "pope.jsonl").read_text().splitlines()]
    assert sorted(ids) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--bench", "nope"], "Unknown benchmark 'nope'"),
        (["--bench", "gqa", "--data-root-missing"], "gqa"),
        (["--bench", "pope", "--malformed"], "coco_pope_random.json, line 1: malformed JSON"),
    ],
)
def test_score_errors_name_the_file_and_exit_2(tmp_path, capsys, argv, expected):
    root = tmp_path / "eval"
    make_data_root(root)
    (tmp_path / "a.jsonl").write_text("")
    if "--data-root-missing" in argv:
        argv = argv[:-1]
        root = tmp_path / "empty"
        root.mkdir()
    if "--malformed" in argv:
        argv = argv[:-1]
        (root / "pope/coco/coco_pope_random.json").write_text("{not json\n")
    code = main(
        ["eval", "score", *argv, "--predictions", str(tmp_path / "a.jsonl"), "--data-root", str(root)]
    )
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


def test_language_sets_read_the_hugging_face_parquet_layouts_as_their_csv_and_jsonl_releases(tmp_path):
    """cais/mmlu, ceval/ceval-exam and baber/piqa parquet files give the same items as the CSV/JSONL
    releases of the same questions."""
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow comes with the eval extra")
    import pyarrow as pa

    from eve_vlm.eval.bench.language_sets import load_ceval, load_mmlu, load_piqa

    csv_root = tmp_path / "csv"
    csv_root.mkdir()
    make_data_root(csv_root)
    root = tmp_path / "parquet"
    rows = [
        ("what is one", ["one", "two", "three", "red"], 0),
        ("what is two", ["one", "two", "three", "red"], 1),
    ]
    for subject in ("anatomy", "virology"):
        for split in ("dev", "test"):
            path = root / f"mmlu/{subject}/{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table = {
                "question": [r[0] for r in rows],
                "subject": [subject] * 2,
                "choices": [r[1] for r in rows],
            }
            pq.write_table(pa.table({**table, "answer": [r[2] for r in rows]}), path)
        for split in ("dev", "val"):
            path = root / f"ceval/{subject}/{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            columns = {"id": [0], "question": ["what is one"], "A": ["one"], "B": ["two"], "C": ["three"]}
            pq.write_table(pa.table({**columns, "D": ["red"], "answer": ["A"], "explanation": [""]}), path)
    (root / "mmlu/all").mkdir()  # the `all` config is skipped
    (root / "piqa").mkdir(parents=True)
    piqa = {"goal": ["what is red"] * 2, "sol1": ["red"] * 2, "sol2": ["two"] * 2, "label": [0, 1]}
    pq.write_table(pa.table(piqa), root / "piqa/piqa_validation.parquet")

    for load in (load_mmlu, load_ceval, load_piqa):
        assert load(str(root), 5) == load(str(csv_root), 5)
    assert len(load_mmlu(str(root), 5)["anatomy"]) == 2

    bad = root / "mmlu/anatomy/test-00000-of-00001.parquet"
    pq.write_table(pa.table({"question": ["q"], "choices": [["a", "b"]], "answer": [0]}), bad)
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet, row 0: expected four choices"):
        load_mmlu(str(root), 5)
