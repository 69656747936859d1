"""MMBench dev with CircularEval (LLaVA-1.5's `model_vqa_mmbench.py --single-pred-prompt`; matching as
VLMEvalKit's `exact_matching` policy, no GPT judge).

Files under `--data-root`: `mmbench/mmbench_dev_en_20231003.tsv` (Eve's and MobileVLM's version) or
`mmbench/mmbench_dev_20230712.tsv` (LLaVA-1.5's), the first one found in that order; columns `index, question,
hint, A, B, C, D, answer, category, image (base64), ...`. The TSV holds the circular copies: row `index` is
shift `index // 1e6` of question `index % 1e6`.
Prompt: `[{hint}\\n]{question}\\nA. {A}\\nB. {B}[...]\\nAnswer with the option's letter from the given choices
directly.`; options A-D until the first missing one (empty, "nan" or "none"); at most 1024 new tokens.
Matching rule (no GPT judge): punctuation `.()[],:;!*#{}` becomes spaces; if exactly one option letter appears
as a word, that is the answer; else if exactly one option's text is contained in the lower-cased answer, that
option; else the row is unresolved and counts wrong.
Headline: circular accuracy, x100 - a question is right only when every one of its rows (rotations) is right;
plain accuracy over the main rows (`index < 1e6`) is reported beside it.
"""

from __future__ import annotations

import os
import string

from eve_vlm.errors import DataError
from eve_vlm.eval.bench.base import LETTER_ANSWER, Question, VLMBenchmark, require_dir, require_file

__all__ = ["MMBENCH", "mmbench_accuracy", "parse_mmbench_answer"]

FILES = ("mmbench_dev_en_20231003.tsv", "mmbench_dev_20230712.tsv")
COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "image")
CIRCULAR = 1_000_000
_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def _is_none(value) -> bool:
    return value is None or str(value).strip().lower() in ("", "nan", "none")


def _tsv_path(root: str) -> str:
    folder = require_dir(os.path.join(root, "mmbench"), f"MMBench's {FILES[0]} or {FILES[1]}")
    for name in FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return require_file(os.path.join(folder, FILES[0]), f"MMBench's dev TSV ({FILES[0]} or {FILES[1]})")


def read_mmbench(path: str) -> list[dict]:
    """The TSV's rows as dicts of strings, each with `options` (the option texts in order).

    Raises:
        DataError: naming the file, when a column is missing or an index is not an integer.
    """
    import pandas as pd

    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable TSV ({e}); it should be MMBench's dev TSV.") from e
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing the column(s) {', '.join(missing)} of MMBench's dev TSV.")
    rows = []
    for k, row in enumerate(table.to_dict("records"), start=2):
        if not row["index"].strip().isdigit():
            raise DataError(f"{path}, line {k}: 'index' must be an integer, not {row['index']!r}.")
        options = []
        for letter in "ABCD":
            if _is_none(row.get(letter)):
                break
            options.append(row[letter])
        rows.append({**row, "index": int(row["index"]), "options": options})
    return rows


def _prompt(row: dict) -> str:
    question = row["question"] if _is_none(row["hint"]) else f"{row['hint']}\n{row['question']}"
    for letter, option in zip(string.ascii_uppercase, row["options"], strict=False):
        question += f"\n{letter}. {option}"
    return f"{question}\n{LETTER_ANSWER}"


def load_mmbench(root: str) -> list[Question]:
    return [
        Question(
            question_id=row["index"],
            prompt=_prompt(row),
            image_base64=row["image"],
            max_new_tokens=1024,
            metadata={
                "round_id": 0,
                "options": row["options"],
                "option_char": list(string.ascii_uppercase[: len(row["options"])]),
            },
        )
        for row in read_mmbench(_tsv_path(root))
    ]


def parse_mmbench_answer(text: str, options: list[str]) -> str | None:
    """The option letter an answer names (the matching rule in the module docstring), or None."""
    letters = string.ascii_uppercase[: len(options)]
    named = {w for w in text.translate(_PUNCTUATION).split() if w in letters}
    if len(named) == 1:
        return named.pop()
    contained = [
        letter for letter, option in zip(letters, options, strict=True) if option.lower() in text.lower()
    ]
    return contained[0] if len(contained) == 1 else None


def mmbench_accuracy(rows: list[dict], answers: dict[str, dict]) -> dict:
    """Circular accuracy (a question counts only if all its rows are right) and plain main-row accuracy (%)."""
    groups: dict[int, list[bool]] = {}
    main_right = main_total = unresolved = 0
    for row in rows:
        answer = answers.get(str(row["index"]))
        letter = None if answer is None else parse_mmbench_answer(answer["text"], row["options"])
        unresolved += answer is not None and letter is None
        ok = letter is not None and letter == row["answer"].strip()
        groups.setdefault(row["index"] % CIRCULAR, []).append(ok)
        if row["index"] < CIRCULAR:
            main_total += 1
            main_right += ok
    circular = 100.0 * sum(all(oks) for oks in groups.values()) / len(groups) if groups else 0.0
    return {
        "headline": circular,
        "circular_accuracy": circular,
        "vanilla_accuracy": 100.0 * main_right / main_total if main_total else 0.0,
        "questions": len(groups),
        "rows": len(rows),
        "unresolved": unresolved,
        "missing": sum(1 for r in rows if str(r["index"]) not in answers),
    }


def score_mmbench(root: str, answers: dict[str, dict]) -> dict:
    path = _tsv_path(root)
    return {**mmbench_accuracy(read_mmbench(path), answers), "file": os.path.basename(path)}


MMBENCH = VLMBenchmark(
    name="mmbench", column="MMBench", folder="mmbench", load=load_mmbench, score=score_mmbench
)
