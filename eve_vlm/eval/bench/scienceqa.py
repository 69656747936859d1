"""ScienceQA-IMG (test split; LLaVA-1.5's `model_vqa_science.py --single-pred-prompt` and `eval_science_qa.py`).

Files under `--data-root`: `scienceqa/llava_test_CQM-A.json` (all 4,241 test problems), `scienceqa/problems.json`
(ground truth) and `scienceqa/images/test/<id>/image.png`.
Prompt: the stored human turn without `<image>` (`[Context: hint\\n]question\\nA. ...`), then
`\\nAnswer with the option's letter from the given choices directly.`; at most 1024 new tokens.
Parser (`eval_science_qa.py`): a bare letter `A`-`E`; else `X. text`; else exactly one "The answer is X.";
else FAILED, counted wrong (so "A." is wrong). A letter past the choices is wrong.
Headline: IMG-Accuracy, over problems with an image (`problems.json[id].image` not null); all-problem accuracy
is reported beside it.
"""

from __future__ import annotations

import os
import re

from eve_vlm.errors import DataError
from eve_vlm.eval.bench.base import (
    LETTER_ANSWER,
    Question,
    VLMBenchmark,
    field_of,
    read_json,
    require_dir,
)

__all__ = ["SQA_IMG", "parse_sqa_answer", "sqa_accuracy"]

QUESTIONS = "llava_test_CQM-A.json"
OPTIONS = "ABCDE"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def load_sqa(root: str) -> list[Question]:
    folder = require_dir(
        os.path.join(root, "scienceqa"), f"ScienceQA's {QUESTIONS}, problems.json, images/test/"
    )
    path = os.path.join(folder, QUESTIONS)
    rows = read_json(path, "LLaVA's ScienceQA test file (a JSON list of problems)")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of problems (LLaVA's llava_test_CQM-A.json).")
    out = []
    for k, r in enumerate(rows, start=1):
        turns = field_of(r, "conversations", path, k)
        text = turns[0]["value"].replace("<image>", "").strip()
        image = r.get("image")
        out.append(
            Question(
                question_id=str(field_of(r, "id", path, k)),
                prompt=f"{text}\n{LETTER_ANSWER}",
                image_path=None if image is None else os.path.join(folder, "images", "test", image),
                max_new_tokens=1024,
            )
        )
    return out


def parse_sqa_answer(text: str) -> str:
    """The answer letter as `eval_science_qa.py` reads it, or "FAILED"."""
    if text in tuple(OPTIONS):
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def sqa_accuracy(problems: dict, answers: dict[str, dict], pids: list[str]) -> dict:
    """All-problem and IMG accuracy (%) over the problems `pids`; a missing or unparseable answer is wrong."""
    right = {"all": 0, "img": 0}
    total = {"all": 0, "img": 0}
    failed = 0
    for pid in pids:
        problem = problems[pid]
        row = answers.get(pid)
        letter = parse_sqa_answer(row["text"]) if row is not None else "FAILED"
        failed += letter == "FAILED"
        index = (
            OPTIONS.index(letter)
            if letter in OPTIONS and OPTIONS.index(letter) < len(problem["choices"])
            else -1
        )
        ok = index == problem["answer"]
        for group in ("all", "img") if problem.get("image") else ("all",):
            total[group] += 1
            right[group] += ok
    img = 100.0 * right["img"] / total["img"] if total["img"] else 0.0
    return {
        "headline": img,
        "img_accuracy": img,
        "accuracy": 100.0 * right["all"] / total["all"] if total["all"] else 0.0,
        "questions": total["all"],
        "img_questions": total["img"],
        "failed_parses": failed,
        "missing": sum(1 for p in pids if p not in answers),
    }


def score_sqa(root: str, answers: dict[str, dict]) -> dict:
    folder = require_dir(os.path.join(root, "scienceqa"), "ScienceQA's problems.json")
    path = os.path.join(folder, "problems.json")
    problems = read_json(path, "ScienceQA's problems.json (lupantech/ScienceQA data/scienceqa)")
    pids = [str(q.question_id) for q in load_sqa(root)]
    unknown = [p for p in pids if p not in problems]
    if unknown:
        raise DataError(f"{path}: no problem {unknown[0]!r} (and {len(unknown) - 1} more) of {QUESTIONS}.")
    return sqa_accuracy(problems, answers, pids)


SQA_IMG = VLMBenchmark(name="sqa_img", column="SQA-IMG", folder="scienceqa", load=load_sqa, score=score_sqa)
