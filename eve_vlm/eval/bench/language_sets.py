"""MMLU, C-Eval and PIQA from their on-disk layouts, scored for the model and its base LLM by our
multiple-choice scorer (`eve_vlm.eval.language`), which builds lm-eval's log-likelihood requests exactly
(`encode_choice` = lm-eval's `_encode_pair`; a test checks parity with lm-eval).

Why our scorer and not lm-eval tasks: Eve's language numbers are OpenCompass PPL-mode numbers (the
`base_medium` collection). For MMLU and C-Eval the candidates differ only in the answer letter, so picking the
letter with the highest log-likelihood after lm-eval's prompt equals OpenCompass's choice; what differs is the
aggregate: the published number is the unweighted mean of the per-subject accuracies, while lm-eval's group
`acc` is weighted by subject size (both are reported). For PIQA OpenCompass scores the mean token NLL of the whole
string `The following makes sense: \\nQ: {goal}\\nA: {sol}\\n` (lowest wins), which no lm-eval metric computes.

Files under `--data-root`:
- `mmlu/{dev,test}/{subject}_{dev,test}.csv` (Hendrycks `data.tar`, no header: question, A, B, C, D, answer);
  5-shot from dev (first five), lm-eval's MMLU prompt.
- `ceval/{dev,val}/{subject}_{dev,val}.csv` (the official zip, header `id,question,A,B,C,D,answer[,...]`),
  optional `ceval/subject_mapping.json` for the Chinese subject names; 5-shot from dev, lm-eval's C-Eval prompt.
- `piqa/dev.jsonl` + `piqa/dev-labels.lst` (the original release; `valid.*` also accepted), 0-shot.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eve_vlm.errors import DataError
from eve_vlm.eval.bench.base import require_dir, require_file
from eve_vlm.eval.language import _pad_id, _token_logprobs, mc_accuracy, mc_loglikelihoods

__all__ = ["LANGUAGE_SETS", "LanguageSet", "load_ceval", "load_mmlu", "load_piqa", "score_language_set"]

LETTERS = ["A", "B", "C", "D"]
PIQA_TEMPLATE = "The following makes sense: \nQ: {goal}\nA: {sol}\n"


@dataclass(frozen=True)
class LanguageSet:
    """A language benchmark: `load(root, shots) -> {subject: items}` and how its items are scored.

    Attributes:
        name: The name on the command line and in metrics (`mmlu`, `ceval`, `piqa`).
        column: The column header of the paper's table.
        load: Reads the items per subject (`context`, `choices`, `label` each).
        full_sequence: Score each choice by the mean log-probability of the whole string (OpenCompass PPL),
            not by the continuation's summed log-probability.
    """

    name: str
    column: str
    load: Callable[[str, int], dict[str, list[dict]]]
    full_sequence: bool = False


def _read_csv(path: str) -> list[list[str]]:
    """A header-less MMLU subject CSV (question, A, B, C, D, answer letter)."""
    with open(require_file(path, "an MMLU subject CSV"), encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    for line, row in enumerate(rows, start=1):
        if len(row) < 6:
            raise DataError(f"{path}, line {line}: expected question, A, B, C, D and the answer letter.")
        if row[5].strip() not in LETTERS:
            raise DataError(f"{path}, line {line}: the answer must be A, B, C or D, not {row[5]!r}.")
    return rows


def _mc_items(description: str, shots: list[list[str]], rows: list[list[str]], answer_cue: str) -> list[dict]:
    def block(r: list[str]) -> str:
        return f"{r[0].strip()}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\n{answer_cue}"

    prefix = description + "".join(f"{block(s)} {s[5].strip()}\n\n" for s in shots)
    return [
        {"context": prefix + block(r), "choices": LETTERS, "label": LETTERS.index(r[5].strip())} for r in rows
    ]


def _subjects(folder: str, split: str) -> list[str]:
    split_dir = require_dir(os.path.join(folder, split), f"{{subject}}_{split}.csv files")
    names = sorted(n[: -len(f"_{split}.csv")] for n in os.listdir(split_dir) if n.endswith(f"_{split}.csv"))
    if not names:
        raise DataError(f"Folder {split_dir} holds no {{subject}}_{split}.csv file.")
    return names


def load_mmlu(root: str, shots: int = 5) -> dict[str, list[dict]]:
    folder = require_dir(os.path.join(root, "mmlu"), "MMLU's dev/ and test/ CSV folders (Hendrycks data.tar)")
    out = {}
    for subject in _subjects(folder, "test"):
        dev = _read_csv(os.path.join(folder, "dev", f"{subject}_dev.csv"))[:shots]
        test = _read_csv(os.path.join(folder, "test", f"{subject}_test.csv"))
        topic = subject.replace("_", " ")
        description = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        out[subject] = _mc_items(description, dev, test, "Answer:")
    return out


def load_ceval(root: str, shots: int = 5) -> dict[str, list[dict]]:
    folder = require_dir(os.path.join(root, "ceval"), "C-Eval's dev/ and val/ CSV folders")
    mapping_path = os.path.join(folder, "subject_mapping.json")
    mapping = {}
    if os.path.isfile(mapping_path):
        with open(mapping_path, encoding="utf-8") as f:
            mapping = json.load(f)
    out = {}
    for subject in _subjects(folder, "val"):
        dev = _read_csv_ceval(os.path.join(folder, "dev", f"{subject}_dev.csv"))[:shots]
        val = _read_csv_ceval(os.path.join(folder, "val", f"{subject}_val.csv"))
        name = mapping.get(subject, [subject, subject])[1]
        description = f"以下是中国关于{name}的单项选择题，请选出其中的正确答案。\n\n"
        out[subject] = _mc_items(description, dev, val, "答案：")
    return out


def _read_csv_ceval(path: str) -> list[list[str]]:
    with open(require_file(path, "a C-Eval subject CSV"), encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:7] != ["id", "question", "A", "B", "C", "D", "answer"]:
        raise DataError(f"{path}: expected the header id,question,A,B,C,D,answer of C-Eval's CSVs.")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 7 or row[6].strip() not in LETTERS:
            raise DataError(f"{path}, line {line}: expected id, question, A-D and an answer letter A-D.")
    return [r[1:] for r in rows[1:]]  # without the id column


def load_piqa(root: str, shots: int = 0) -> dict[str, list[dict]]:
    folder = require_dir(os.path.join(root, "piqa"), "PIQA's dev.jsonl and dev-labels.lst")
    stem = "dev" if os.path.isfile(os.path.join(folder, "dev.jsonl")) else "valid"
    data = require_file(
        os.path.join(folder, f"{stem}.jsonl"), "PIQA's validation questions (goal, sol1, sol2)"
    )
    labels_path = require_file(os.path.join(folder, f"{stem}-labels.lst"), "PIQA's validation labels (0/1)")
    with open(labels_path, encoding="utf-8") as f:
        labels = [x.strip() for x in f if x.strip()]
    items = []
    with open(data, encoding="utf-8") as f:
        for line, raw in enumerate((x for x in f if x.strip()), start=1):
            try:
                row = json.loads(raw)
                goal, sols = row["goal"], [row["sol1"], row["sol2"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{data}, line {line}: expected a JSON object with goal, sol1, sol2.") from e
            items.append({"texts": [PIQA_TEMPLATE.format(goal=goal, sol=s) for s in sols], "choices": sols})
    if len(labels) != len(items) or any(x not in ("0", "1") for x in labels):
        raise DataError(f"{labels_path}: expected one label 0 or 1 per line of {data} ({len(items)} lines).")
    for item, label in zip(items, labels, strict=True):
        item["label"] = int(label)
    return {"piqa": items}


@torch.no_grad()
def _mean_logprob_scores(
    model: nn.Module, tokenizer, items: list[dict], batch_size: int
) -> list[list[float]]:
    """Per item and choice: minus the mean token NLL of the whole string (OpenCompass PPL, higher is better)."""
    requests = [(k, tokenizer.encode(t)) for k, item in enumerate(items) for t in item["texts"]]
    scores: list[list[float]] = [[] for _ in items]
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        for (k, _), lp in zip(
            batch, _token_logprobs(model, [ids for _, ids in batch], _pad_id(tokenizer)), strict=True
        ):
            scores[k].append(float(lp.double().mean()))
    return scores


def score_language_set(
    lang: LanguageSet, model: nn.Module, tokenizer, subjects: dict[str, list[dict]], batch_size: int = 8
) -> dict:
    """`{"headline" (unweighted mean of subject accuracies), "acc" (over all items), "items", "subjects"}` (%)."""
    per_subject, right = {}, 0
    for subject, items in subjects.items():
        if lang.full_sequence:
            scores = _mean_logprob_scores(model, tokenizer, items, batch_size)
        else:
            scores = mc_loglikelihoods(model, tokenizer, items, batch_size=batch_size)
        per_subject[subject] = mc_accuracy(items, scores)["acc"]
        right += per_subject[subject] * len(items) / 100.0
    items = sum(len(v) for v in subjects.values())
    return {
        "headline": sum(per_subject.values()) / len(per_subject),
        "acc": 100.0 * right / items,
        "items": items,
        "subjects": per_subject,
    }


LANGUAGE_SETS = (
    LanguageSet(name="mmlu", column="MMLU", load=load_mmlu),
    LanguageSet(name="ceval", column="C-Eval", load=load_ceval),
    LanguageSet(name="piqa", column="PIQA", load=load_piqa, full_sequence=True),
)
