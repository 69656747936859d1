"""MME, perception and cognition (LLaVA-1.5's `llava_mme.jsonl`, `convert_answer_to_mme.py` and the official
`eval_tool/calculation.py`).

Files under `--data-root`: `MME/llava_mme.jsonl` (questions; `question_id` = `<subtask>/[images/]<file>`) and the
official `MME/MME_Benchmark_release_version/<subtask>/`, holding the images and, per image, `<stem>.txt` with
one `question\\tYes|No` line per question (in `questions_answers_YN/` for subtasks with an `images/` folder).
Prompt: MME's question with " Please answer yes or no." replaced by
`\\nAnswer the question using a single word or phrase.`; at most 128 new tokens.
Parser (`calculation.py`): lower-cased; "yes"/"no" as is; else "yes" if the first 4 characters contain "yes",
"no" if they contain "no", else "other" (wrong).
Metric per subtask: `acc` (questions right) + `acc+` (images with both questions right), each x100 (max 200).
Headline: perception = sum over the 10 perception subtasks (max 2000), as LLaVA-1.5, MobileVLM and Eve report;
cognition (4 subtasks) beside it.
"""

from __future__ import annotations

import os
from collections import defaultdict

from eve_vlm.errors import DataError
from eve_vlm.eval.bench.base import SHORT_ANSWER, Question, VLMBenchmark, field_of, read_jsonl, require_dir

__all__ = ["COGNITION", "MME", "PERCEPTION", "mme_scores", "parse_mme_answer"]

QUESTIONS = "llava_mme.jsonl"
RELEASE = "MME_Benchmark_release_version"
MME_SUFFIX = "Please answer yes or no."
PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def load_mme(root: str) -> list[Question]:
    folder = require_dir(os.path.join(root, "MME"), f"MME's {QUESTIONS} and {RELEASE}/")
    path = os.path.join(folder, QUESTIONS)
    return [
        Question(
            question_id=field_of(r, "question_id", path, k),
            prompt=field_of(r, "text", path, k),
            image_path=os.path.join(folder, RELEASE, field_of(r, "image", path, k)),
        )
        for k, r in enumerate(read_jsonl(path, "LLaVA's MME question file"), start=1)
    ]


def parse_mme_answer(text: str) -> str:
    """ "yes", "no" or "other", as `calculation.py` reads an answer."""
    pred = text.lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _core(question: str) -> str:
    return question.replace(SHORT_ANSWER, "").replace(MME_SUFFIX, "").strip()


def read_mme_truth(release: str) -> dict[tuple[str, str, str], str]:
    """`{(subtask, image stem, question): "yes"|"no"}` from the official release folder.

    Raises:
        DataError: naming the file of a line that is not `question<TAB>Yes|No`.
    """
    truth = {}
    for task in sorted(os.listdir(release)):
        task_dir = os.path.join(release, task)
        if not os.path.isdir(task_dir):
            continue
        qa_dir = os.path.join(task_dir, "questions_answers_YN")
        if not os.path.isdir(qa_dir):
            qa_dir = task_dir
        for name in sorted(os.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            path = os.path.join(qa_dir, name)
            with open(path, encoding="utf-8") as f:
                for line, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    parts = raw.rstrip("\n").split("\t")
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        raise DataError(
                            f"{path}, line {line}: expected 'question<TAB>Yes' or 'question<TAB>No'."
                        )
                    truth[(task, name[:-4], _core(parts[0]))] = parts[1].strip().lower()
    return truth


def mme_scores(truth: dict[tuple[str, str, str], str], answers: dict[str, dict]) -> dict:
    """Per-subtask acc, acc+ and score, and the perception and cognition sums.

    Raises:
        DataError: An answer matches no question of the release folder.
    """
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for row in answers.values():
        qid = str(row["question_id"])
        task, stem = qid.split("/")[0], os.path.splitext(qid.split("/")[-1])[0]
        key = (task, stem, _core(row["prompt"]))
        if key not in truth:
            raise DataError(
                f"Answer {qid} ({_core(row['prompt'])!r}) matches no question in {RELEASE}/{task}/."
            )
        images[task][stem].append(parse_mme_answer(row["text"]) == truth[key])
    tasks = {}
    for task, per_image in images.items():
        results = [ok for oks in per_image.values() for ok in oks]
        acc = 100.0 * sum(results) / len(results)
        acc_plus = 100.0 * sum(all(oks) for oks in per_image.values()) / len(per_image)
        tasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(results)}
    perception = sum(tasks[t]["score"] for t in PERCEPTION if t in tasks)
    cognition = sum(tasks[t]["score"] for t in COGNITION if t in tasks)
    return {
        "headline": perception,
        "perception": perception,
        "cognition": cognition,
        "subtasks": tasks,
        "questions": sum(t["questions"] for t in tasks.values()),
    }


def score_mme(root: str, answers: dict[str, dict]) -> dict:
    release = require_dir(
        os.path.join(root, "MME", RELEASE), "the official MME release (one folder per subtask)"
    )
    return mme_scores(read_mme_truth(release), answers)


MME = VLMBenchmark(name="mme", column="MME", folder="MME", load=load_mme, score=score_mme)
