"""TextVQA val with OCR tokens (LLaVA-1.5's `llava_textvqa_val_v051_ocr` and `eval_textvqa.py`).

Files under `--data-root`: `textvqa/llava_textvqa_val_v051_ocr.jsonl` (questions; `question_id` holds the
image id), `textvqa/TextVQA_0.5.1_val.json` (the 10 answers per question) and `textvqa/train_images/<image>`.
Prompt: `{Question}\\nReference OCR token: {tokens}\\nAnswer the question using a single word or phrase.`;
at most 128 new tokens.
Metric (`m4c_evaluator.py`): an answer is matched to its annotation by `(image_id, first prompt line lower-cased)`;
VQA answer normalisation on prediction and references; soft accuracy averaged over the 10 leave-one-out subsets
of the annotators (`min(1, matches among the other 9 / 3)`; 0.3/0.6/0.9/1.0 for 1/2/3/4+ matches), x100.
"""

from __future__ import annotations

import os

from eve_vlm.errors import DataError
from eve_vlm.eval.bench.base import Question, VLMBenchmark, field_of, read_json, read_jsonl, require_dir
from eve_vlm.eval.vqa import answer_accuracy

__all__ = ["TEXTVQA", "textvqa_accuracy"]

QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"
ANNOTATIONS = "TextVQA_0.5.1_val.json"


def load_textvqa(root: str) -> list[Question]:
    folder = require_dir(
        os.path.join(root, "textvqa"), f"TextVQA's {QUESTIONS}, {ANNOTATIONS}, train_images/"
    )
    path = os.path.join(folder, QUESTIONS)
    return [
        Question(
            question_id=field_of(r, "question_id", path, k),
            prompt=field_of(r, "text", path, k),
            image_path=os.path.join(folder, "train_images", field_of(r, "image", path, k)),
        )
        for k, r in enumerate(read_jsonl(path, "LLaVA's TextVQA question file"), start=1)
    ]


def textvqa_accuracy(annotations: list[dict], answers: dict[str, dict]) -> dict:
    """TextVQA soft accuracy (%) over the answers rows, each matched to its annotation.

    Raises:
        DataError: An answer matches no annotation.
    """
    by_key = {(str(a["image_id"]), a["question"].lower()): a["answers"] for a in annotations}
    scores = []
    for qid, row in answers.items():
        key = (qid, row["prompt"].split("\n")[0].lower())
        if key not in by_key:
            raise DataError(
                f"Answer {qid} ({row['prompt'].splitlines()[0]!r}) matches no question of {ANNOTATIONS}; "
                "are the predictions for TextVQA val?"
            )
        scores.append(answer_accuracy(row["text"], by_key[key])[0])
    accuracy = 100.0 * sum(scores) / len(scores) if scores else 0.0
    return {"headline": accuracy, "accuracy": accuracy, "questions": len(scores)}


def score_textvqa(root: str, answers: dict[str, dict]) -> dict:
    folder = require_dir(os.path.join(root, "textvqa"), f"TextVQA's {ANNOTATIONS}")
    path = os.path.join(folder, ANNOTATIONS)
    data = read_json(path, "TextVQA's val annotations ({'data': [...]})")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(
            f"{path}: expected {{'data': [{{question, image_id, answers, ...}}]}} (TextVQA 0.5.1)."
        )
    for k, a in enumerate(data["data"]):
        for key in ("question", "image_id", "answers"):
            field_of(a, key, path, k)
    out = textvqa_accuracy(data["data"], answers)
    asked = {str(q.question_id) for q in load_textvqa(root)}
    out["missing"] = len(asked - set(answers))
    return out


TEXTVQA = VLMBenchmark(
    name="textvqa", column="TextVQA", folder="textvqa", load=load_textvqa, score=score_textvqa
)
