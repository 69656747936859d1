"""GQA testdev-balanced (LLaVA-1.5's split and prompt; metric of the official `eval.py`).

Files under `--data-root`: `gqa/llava_gqa_testdev_balanced.jsonl` (questions, prompt baked into `text`),
`gqa/data/images/<image>`, and the ground truth `gqa/testdev_balanced_questions.json` (the official
`questions1.2` file; `gqa/data/testdev_balanced_questions.json` is also accepted).
Prompt: `{question}\\nAnswer the question using a single word or phrase.`; at most 128 new tokens.
Metric (`scripts/convert_gqa_for_eval.py` + `eval.py`): prediction `text.rstrip('.').lower()` equal to the
answer; accuracy over the balanced questions with a prediction, x100. No VQA normalisation.
"""

from __future__ import annotations

import os

from eve_vlm.errors import DataError
from eve_vlm.eval.bench.base import Question, VLMBenchmark, field_of, read_json, read_jsonl, require_dir

__all__ = ["GQA", "gqa_accuracy"]

QUESTIONS = "llava_gqa_testdev_balanced.jsonl"
TRUTH = ("testdev_balanced_questions.json", os.path.join("data", "testdev_balanced_questions.json"))


def load_gqa(root: str) -> list[Question]:
    folder = require_dir(os.path.join(root, "gqa"), f"GQA's {QUESTIONS} and data/images/")
    path = os.path.join(folder, QUESTIONS)
    rows = read_jsonl(path, "LLaVA's GQA question file")
    return [
        Question(
            question_id=field_of(r, "question_id", path, k),
            prompt=field_of(r, "text", path, k),
            image_path=os.path.join(folder, "data", "images", field_of(r, "image", path, k)),
        )
        for k, r in enumerate(rows, start=1)
    ]


def gqa_accuracy(truth: dict, answers: dict[str, dict]) -> dict:
    """Official GQA accuracy (%) over the balanced questions that have a prediction."""
    right = total = 0
    for qid, row in answers.items():
        gt = truth.get(qid)
        if gt is None or not gt.get("isBalanced", True):
            continue
        total += 1
        right += row["text"].rstrip(".").lower() == str(gt["answer"])
    return {
        "headline": 100.0 * right / total if total else 0.0,
        "accuracy": 100.0 * right / total if total else 0.0,
        "questions": total,
        "missing": sum(1 for q, g in truth.items() if g.get("isBalanced", True) and q not in answers),
    }


def score_gqa(root: str, answers: dict[str, dict]) -> dict:
    folder = require_dir(
        os.path.join(root, "gqa"), f"GQA's {QUESTIONS} and the testdev_balanced_questions.json"
    )
    paths = [os.path.join(folder, t) for t in TRUTH]
    path = next((p for p in paths if os.path.isfile(p)), paths[0])
    truth = read_json(path, "GQA's official testdev_balanced_questions.json (questions1.2)")
    if not isinstance(truth, dict):
        raise DataError(f"{path}: expected an object keyed by question id (GQA's questions1.2 format).")
    asked = {str(q.question_id) for q in load_gqa(root)}
    return gqa_accuracy({q: g for q, g in truth.items() if q in asked}, answers)


GQA = VLMBenchmark(name="gqa", column="GQA", folder="gqa", load=load_gqa, score=score_gqa)
