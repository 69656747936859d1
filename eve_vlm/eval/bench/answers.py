"""LLaVA answers files: one JSON object per line with `question_id`, `prompt`, `text`, `answer_id`,
`model_id`, `metadata` (`llava/eval/model_vqa_loader.py`), read for scoring and for resuming a run."""

from __future__ import annotations

import json
import os

from eve_vlm.errors import DataError

__all__ = ["answers_row", "read_answers", "read_finished"]


def answers_row(question, text: str, model_id: str, answer_id: str) -> dict:
    """The answers-file row of one generated answer (MMBench's extra fields merged in)."""
    return {
        "question_id": question.question_id,
        "prompt": question.prompt,
        "text": text,
        "answer_id": answer_id,
        "model_id": model_id,
        "metadata": {},
        **question.metadata,
    }


def read_answers(path: str) -> dict[str, dict]:
    """`{str(question_id): row}` of an answers file (`.jsonl`). MME gives both questions of an image the same
    id; a row whose id is taken by a row with another prompt is kept under `"{id}#{n}"` (its row still holds
    the id), a row repeating an id and prompt replaces the earlier one.

    Raises:
        DataError: naming the file and line, when the file is missing or a line is malformed or lacks
            `question_id` / `text`.
    """
    if not os.path.isfile(path):
        raise DataError(
            f"Predictions file {path} does not exist; give an answers file written by eve eval bench."
        )
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, line {line}: malformed JSON ({e.msg} at column {e.colno}); each line must be one "
                    "answers row (question_id, prompt, text, ...)."
                ) from e
            if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
                raise DataError(
                    f"{path}, line {line}: an answers row needs 'question_id' and a string 'text'."
                )
            key, n = str(row["question_id"]), 1
            while key in out and out[key].get("prompt") != row.get("prompt"):
                key, n = f"{row['question_id']}#{n}", n + 1
            out[key] = row
    return out


def read_finished(path: str) -> set[tuple[str, str]]:
    """`(question id, prompt)` pairs already answered in `path` (an interrupted run's file; none if it does not exist).

    A last line cut short by the interruption is dropped from the file, so appending continues cleanly.
    """
    if not os.path.isfile(path):
        return set()
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    done, kept = set(), []
    for raw in lines:
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            break  # the interrupted write; everything after it is dropped too
        if not raw.endswith("\n"):
            break
        done.add((str(row["question_id"]), row.get("prompt", "")))
        kept.append(raw)
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
    return done
