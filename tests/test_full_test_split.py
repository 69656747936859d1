"""`benchmarks/full_test_split.py`: its pairing, its agreement count with a quickstart record, its refusals."""

import json

from conftest import load_benchmark, run_benchmark


def predictions(answers: dict[str, str]) -> list[dict]:
    return [
        {"id": qid, "prediction": answer, "answers": ["yes"], "accuracy": float(answer == "yes")}
        for qid, answer in answers.items()
    ]


def test_pairs_are_the_later_model_minus_the_earlier_on_the_same_questions():
    bench = load_benchmark("full_test_split")
    results = {
        "stage2": {"predictions": predictions({"a": "yes", "b": "no", "c": "no", "d": "yes"})},
        "stage3": {"predictions": predictions({"a": "yes", "b": "yes", "c": "yes", "d": "yes"})},
    }
    line = bench.pair_line("stage3", "stage2", results)
    assert line["pair"] == "stage3-stage2" and line["questions"] == 4
    assert line["difference"] == 50.0 and line["se"] > 0


def test_agreement_counts_the_records_questions_answered_alike(tmp_path):
    bench = load_benchmark("full_test_split")
    assert bench.agreement(predictions({"a": "yes"}), tmp_path) is None  # no record: nothing to compare
    record = {"metrics": {"vqa": {"predictions": predictions({"a": "yes", "b": "no", "c": "red"})}}}
    (tmp_path / "quickstart_record.json").write_text(json.dumps(record))
    here = predictions(
        {"a": "yes", "b": "yes", "c": "red", "d": "no"}
    )  # a superset of the record's questions
    assert bench.agreement(here, tmp_path) == {"questions": 3, "same_answer": 2}


def test_a_folder_that_is_not_a_model_a_repeated_name_or_no_question_is_refused_with_exit_2(tmp_path):
    proc = run_benchmark("full_test_split", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nowhere") in proc.stderr and "config.json" in proc.stderr
    for parent in ("a", "b"):
        (tmp_path / parent / "stage3").mkdir(parents=True)
        (tmp_path / parent / "stage3" / "config.json").write_text("{}")
    proc = run_benchmark("full_test_split", str(tmp_path / "a" / "stage3"), str(tmp_path / "b" / "stage3"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "share a name" in proc.stderr
    proc = run_benchmark("full_test_split", str(tmp_path / "a" / "stage3"), "--questions", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--questions 0" in proc.stderr
