"""POPE on COCO, adversarial / popular / random (LLaVA-1.5's `llava_pope_test` and `eval_pope.py`).

Files under `--data-root`: `pope/llava_pope_test.jsonl` (questions with `category`), the labels
`pope/coco/coco_pope_{adversarial,popular,random}.json` (JSON lines, AoiDragon/POPE commit e3e3926) and
`pope/val2014/<image>`.
Prompt: `{question}\\nAnswer the question using a single word or phrase.`; at most 128 new tokens.
Parser (`eval_pope.py`): keep the text before the first `.`, drop commas, split on spaces; "no" if the words
contain `No`, `not` or `no`, else "yes" (free text without a negation counts as yes).
Metric per split: accuracy, precision, recall, F1 (positive = yes), yes-ratio of the predictions. Labels are
matched by `question_id` (the official script zips them by order, which gives the same result when the files
are aligned and a wrong one when they are not). Headline: F1 averaged over the three splits, x100 (LLaVA-1.5's
"POPE 85.9").
"""

from __future__ import annotations

import os

from eve_vlm.errors import DataError
from eve_vlm.eval.bench.base import Question, VLMBenchmark, field_of, read_jsonl, require_dir

__all__ = ["POPE", "SPLITS", "parse_pope_answer", "pope_metrics"]

QUESTIONS = "llava_pope_test.jsonl"
SPLITS = ("adversarial", "popular", "random")


def load_pope(root: str) -> list[Question]:
    folder = require_dir(os.path.join(root, "pope"), f"POPE's {QUESTIONS}, coco/ and val2014/")
    path = os.path.join(folder, QUESTIONS)
    return [
        Question(
            question_id=field_of(r, "question_id", path, k),
            prompt=field_of(r, "text", path, k),
            image_path=os.path.join(folder, "val2014", field_of(r, "image", path, k)),
        )
        for k, r in enumerate(read_jsonl(path, "LLaVA's POPE question file"), start=1)
    ]


def parse_pope_answer(text: str) -> str:
    """ "yes" or "no" as `eval_pope.py` reads a free-text answer."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def pope_metrics(labels: list[dict], answers: dict[str, dict]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio (%) of one split's labelled questions that have answers."""
    tp = fp = tn = fn = 0
    for label in labels:
        row = answers.get(str(label["question_id"]))
        if row is None:
            continue
        pred, gold = parse_pope_answer(row["text"]), label["label"]
        tp += pred == "yes" and gold == "yes"
        fp += pred == "yes" and gold == "no"
        tn += pred == "no" and gold == "no"
        fn += pred == "no" and gold == "yes"
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "questions": n,
        "accuracy": 100.0 * (tp + tn) / n if n else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n if n else 0.0,
    }


def score_pope(root: str, answers: dict[str, dict]) -> dict:
    folder = require_dir(os.path.join(root, "pope", "coco"), "coco_pope_{adversarial,popular,random}.json")
    splits = {}
    for split in SPLITS:
        path = os.path.join(folder, f"coco_pope_{split}.json")
        labels = read_jsonl(path, f"POPE's {split} labels (JSON lines, AoiDragon/POPE e3e3926)")
        for k, label in enumerate(labels, start=1):
            if field_of(label, "label", path, k) not in ("yes", "no"):
                raise DataError(f"{path}, line {k}: 'label' must be 'yes' or 'no'.")
            field_of(label, "question_id", path, k)
        splits[split] = pope_metrics(labels, answers)
    scored = [s for s in splits.values() if s["questions"]]
    f1 = sum(s["f1"] for s in scored) / len(scored) if scored else 0.0
    return {"headline": f1, "f1": f1, "splits": splits, "questions": sum(s["questions"] for s in scored)}


POPE = VLMBenchmark(name="pope", column="POPE", folder="pope", load=load_pope, score=score_pope)
