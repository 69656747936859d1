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

Or the Hugging Face parquet layouts, used when the CSV/JSONL ones are absent (read with pyarrow, which the
`eval` extra installs): `mmlu/{subject}/{dev,test}-*.parquet` (`cais/mmlu`: question, choices, answer index;
the `all` and `auxiliary_train` configs are skipped), `ceval/{subject}/{dev,val}-*.parquet` (`ceval/ceval-exam`:
id, question, A-D, answer letter; older snapshots' `ceval-exam-{split}.parquet` too) and
`piqa/piqa_validation.parquet` (`baber/piqa`: goal, sol1, sol2, label).
"""

from __future__ import annotations

import csv
import glob
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


def _read_parquet(path: str, columns: list[str]) -> list[dict]:
    """The rows of a parquet file as dicts, checking that it has `columns`."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({e}).") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: expected the columns {columns}; missing {missing}.")
    return table.select(columns).to_pylist()


def _parquet_split(folder: str, subject: str, split: str) -> str:
    """The one parquet file of `subject`'s `split` in a Hugging Face layout (`{split}-*.parquet`, or an older
    snapshot's `*-{split}.parquet`)."""
    found = sorted(glob.glob(os.path.join(folder, subject, f"{split}-*.parquet")))
    found = found or sorted(glob.glob(os.path.join(folder, subject, f"*-{split}.parquet")))
    if len(found) != 1:
        raise DataError(
            f"Folder {os.path.join(folder, subject)} should hold one {split}-*.parquet file, found {len(found)}."
        )
    return found[0]


def _parquet_subjects(folder: str, split: str) -> list[str]:
    """The subject folders of a Hugging Face parquet layout that hold a `split` file."""
    skip = {"all", "auxiliary_train"}
    names = sorted(
        n
        for n in os.listdir(folder)
        if n not in skip
        and (
            glob.glob(os.path.join(folder, n, f"{split}-*.parquet"))
            or glob.glob(os.path.join(folder, n, f"*-{split}.parquet"))
        )
    )
    if not names:
        raise DataError(
            f"Folder {folder} holds neither {split}/{{subject}}_{split}.csv files nor "
            f"{{subject}}/{split}-*.parquet files."
        )
    return names


def _mmlu_parquet(path: str) -> list[list[str]]:
    rows = []
    for k, row in enumerate(_read_parquet(path, ["question", "choices", "answer"])):
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or len(choices) != 4 or answer not in range(4):
            raise DataError(f"{path}, row {k}: expected four choices and an answer index 0-3.")
        rows.append([row["question"], *choices, LETTERS[answer]])
    return rows


def _ceval_parquet(path: str) -> list[list[str]]:
    rows = []
    for k, row in enumerate(_read_parquet(path, ["question", *LETTERS, "answer"])):
        if str(row["answer"]).strip() not in LETTERS:
            raise DataError(f"{path}, row {k}: the answer must be A, B, C or D, not {row['answer']!r}.")
        rows.append([row["question"], *(row[x] for x in LETTERS), str(row["answer"]).strip()])
    return rows


def load_mmlu(root: str, shots: int = 5) -> dict[str, list[dict]]:
    folder = require_dir(
        os.path.join(root, "mmlu"),
        "MMLU's dev/ and test/ CSV folders (Hendrycks data.tar) or cais/mmlu parquet",
    )
    csv_layout = os.path.isdir(os.path.join(folder, "test"))
    out = {}
    for subject in _subjects(folder, "test") if csv_layout else _parquet_subjects(folder, "test"):
        if csv_layout:
            dev = _read_csv(os.path.join(folder, "dev", f"{subject}_dev.csv"))[:shots]
            test = _read_csv(os.path.join(folder, "test", f"{subject}_test.csv"))
        else:
            dev = _mmlu_parquet(_parquet_split(folder, subject, "dev"))[:shots]
            test = _mmlu_parquet(_parquet_split(folder, subject, "test"))
        topic = subject.replace("_", " ")
        description = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        out[subject] = _mc_items(description, dev, test, "Answer:")
    return out


def load_ceval(root: str, shots: int = 5) -> dict[str, list[dict]]:
    folder = require_dir(
        os.path.join(root, "ceval"), "C-Eval's dev/ and val/ CSV folders or ceval-exam parquet"
    )
    csv_layout = os.path.isdir(os.path.join(folder, "val"))
    mapping_path = os.path.join(folder, "subject_mapping.json")
    mapping = {}
    if os.path.isfile(mapping_path):
        with open(mapping_path, encoding="utf-8") as f:
            mapping = json.load(f)
    out = {}
    for subject in _subjects(folder, "val") if csv_layout else _parquet_subjects(folder, "val"):
        if csv_layout:
            dev = _read_csv_ceval(os.path.join(folder, "dev", f"{subject}_dev.csv"))[:shots]
            val = _read_csv_ceval(os.path.join(folder, "val", f"{subject}_val.csv"))
        else:
            dev = _ceval_parquet(_parquet_split(folder, subject, "dev"))[:shots]
            val = _ceval_parquet(_parquet_split(folder, subject, "val"))
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
    parquet = os.path.join(folder, "piqa_validation.parquet")
    if not os.path.isfile(os.path.join(folder, f"{stem}.jsonl")) and os.path.isfile(parquet):
        items = []
        for k, row in enumerate(_read_parquet(parquet, ["goal", "sol1", "sol2", "label"])):
            if row["label"] not in (0, 1):
                raise DataError(f"{parquet}, row {k}: the label must be 0 or 1, not {row['label']!r}.")
            sols = [row["sol1"], row["sol2"]]
            texts = [PIQA_TEMPLATE.format(goal=row["goal"], sol=s) for s in sols]
            items.append({"texts": texts, "choices": sols, "label": row["label"]})
        return {"piqa": items}
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
