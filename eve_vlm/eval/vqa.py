"""Visual question answering: batched greedy generation on LLaVA-format eval files, VQAv2-style scoring.

What is measured, per question: the model's greedy answer to the first human turn (rendered with the
tokenizer's own chat template plus its generation prompt, `<image>` expanded by `EveProcessor`; with
`describe_first`, asked as the second turn after the model's own description of the image), compared with the
reference answer(s) after VQAv2's answer normalisation:

- `exact_match`: the normalised prediction equals the most common normalised reference (ties: the first);
- `accuracy`: with one reference, exact match; with the 10 annotators' answers of VQAv2/TextVQA, the official
  soft accuracy: `min(1, matches among the other 9 / 3)` averaged over the 10 leave-one-out subsets (0.3, 0.6,
  0.9 and 1.0 for 1, 2, 3 and 4+ matching annotators); with another number of references,
  `min(1, matches / 3)`;
- both overall and per question type (`question_type` or `type` field of a row), and per modality.

Normalisation follows the official VQAv2 evaluation (`vqaEval.py`, GT-Vision-Lab/VQA): lower case, punctuation
stripped (kept inside numbers like 1,000 and 2.5), articles dropped, number words `zero`..`ten`/`none` mapped to
digits, and a light set of apostrophe-less contractions restored (`dont` -> `don't`).

Eval rows are LLaVA rows (`eve_vlm.data.llava`): the question in the first human turn, the reference in the gpt
turn that follows, or several references in an `answers` list (strings, or VQAv2 `{"answer": ...}` objects), in
which case the gpt turn may be left out. Generation runs with left padding and the KV cache, in batches that
never mix rows with and without an image.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm

from eve_vlm.data.conversations import END_OF_TURN_TOKENS
from eve_vlm.data.llava import (
    BadRow,
    ConversationRow,
    DataSource,
    bad_row_error,
    parse_row,
    read_records,
    row_id,
)

__all__ = [
    "VQARow",
    "answer_accuracy",
    "describe_images",
    "evaluate_vqa",
    "generate_answers",
    "load_vqa_rows",
    "normalize_answer",
    "paired_difference",
    "score_predictions",
    "standard_error",
    "stop_token_ids",
    "without_marker",
]

SOFT_MATCHES = 3  # VQAv2: an answer given by 3 of the annotators counts fully
ANNOTATORS = 10  # VQAv2 and TextVQA: 10 answers per question, scored over their 10 leave-one-out subsets
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
CONTRACTIONS = {
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "isnt": "isn't",
    "its": "it's",
    "shouldnt": "shouldn't",
    "thats": "that's",
    "theres": "there's",
    "theyre": "they're",
    "wasnt": "wasn't",
    "werent": "weren't",
    "whats": "what's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "youre": "you're",
}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ","]
PUNCTUATION += ["?", "!", ":", "*", "#", "%", "&", "$", "^", "~", "|"]
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # every period not followed by a digit (vqaEval.py periodStrip)
_COMMA_IN_NUMBER = re.compile(r"(\d),(\d)")


@dataclass
class VQARow:
    """One eval question.

    Attributes:
        row: The validated LLaVA row (its gpt turn holds the first reference), for teacher-forced use.
        question: The first human turn, with `<image>` where the image goes (image rows only).
        answers: The reference answers (at least one).
        question_type: The row's `question_type` / `type` field, or None.
    """

    row: ConversationRow
    question: str
    answers: list[str]
    question_type: str | None

    @property
    def id(self) -> str:
        return self.row.id

    @property
    def image(self) -> str | None:
        return self.row.image


def normalize_answer(answer: str) -> str:
    """VQAv2 answer normalisation: lower case, punctuation, number words -> digits, articles, contractions.

    Examples:
        >>> normalize_answer("Two dogs.")
        '2 dogs'
        >>> normalize_answer("The Red one!")
        'red 1'
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_IN_NUMBER.sub(r"\1\2", text)  # 1,000 -> 1000
    text = text.replace("'", "")  # "don't" and "dont" both become "dont", restored below
    for p in PUNCTUATION:
        text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub(" ", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def answer_accuracy(prediction: str, answers: list[str]) -> tuple[float, float]:
    """`(accuracy, exact_match)` of one prediction against its references (normalised inside).

    `accuracy` is exact match with one reference and `min(1, matches / 3)` with several; `exact_match`
    compares with the most common normalised reference (ties: the first one given).
    """
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    majority = Counter(refs).most_common(1)[0][0]
    exact = float(pred == majority)
    if len(refs) == 1:
        return exact, exact
    matches = sum(r == pred for r in refs)
    if len(refs) != ANNOTATORS:
        return min(1.0, matches / SOFT_MATCHES), exact
    # Leaving out a matching annotator (`matches` subsets) leaves matches - 1; any other leaves `matches`.
    left_out = matches * min(1.0, (matches - 1) / SOFT_MATCHES)
    kept = (ANNOTATORS - matches) * min(1.0, matches / SOFT_MATCHES)
    return (left_out + kept) / ANNOTATORS, exact


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of per-question scores in [0, 1], in percentage points (0 for n < 2)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return 100.0 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_difference(a: list[dict], b: list[dict]) -> dict:
    """Accuracy of `a` minus that of `b` on the same questions (matched by `id`), with the paired standard
    error (of the per-question differences), in percentage points.

    Raises:
        ValueError: The two prediction lists do not cover the same question ids.
    """
    ids = [p["id"] for p in a]
    if len(set(ids)) != len(ids) or sorted(ids) != sorted(p["id"] for p in b):
        raise ValueError("paired_difference needs predictions for the same, distinct question ids")
    by_id = {p["id"]: p["accuracy"] for p in b}
    diffs = [p["accuracy"] - by_id[p["id"]] for p in a]
    return {
        "questions": len(diffs),
        "difference": 100.0 * sum(diffs) / len(diffs) if diffs else 0.0,
        "stderr": standard_error(diffs),
    }


def score_predictions(predictions: list[dict]) -> dict:
    """Aggregates scored predictions into the VQA metrics.

    Args:
        predictions: Dicts with `prediction`, `answers`, and optionally `question_type` and `image`.

    Returns:
        `{"questions", "accuracy", "accuracy_stderr", "exact_match", "by_type": {type: {...}},
        "by_modality": {...}}`, each group with `questions`, `accuracy`, `accuracy_stderr` (standard error of
        the mean over questions) and `exact_match` (percentages, 0-100).
    """
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for p in predictions:
        acc, exact = answer_accuracy(p["prediction"], p["answers"])
        groups[("all", "all")].append((acc, exact))
        groups[("type", p.get("question_type") or "untyped")].append((acc, exact))
        groups[("modality", "image" if p.get("image") else "text")].append((acc, exact))

    def summary(scores: list[tuple[float, float]]) -> dict:
        n = len(scores)
        return {
            "questions": n,
            "accuracy": 100.0 * sum(a for a, _ in scores) / n if n else 0.0,
            "accuracy_stderr": standard_error([a for a, _ in scores]),
            "exact_match": 100.0 * sum(e for _, e in scores) / n if n else 0.0,
        }

    out = summary(groups.pop(("all", "all"), []))
    out["by_type"] = {name: summary(s) for (kind, name), s in sorted(groups.items()) if kind == "type"}
    out["by_modality"] = {
        name: summary(s) for (kind, name), s in sorted(groups.items()) if kind == "modality"
    }
    return out


def _reference_answers(record: dict) -> list[str] | None:
    """The `answers` list of a record as strings (VQAv2 `{"answer": ...}` objects accepted), or None."""
    answers = record.get("answers")
    if answers is None:
        return None
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise ValueError("'answers' must be a non-empty list of reference answers")
    out = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    if not all(isinstance(a, str) and a.strip() for a in out):
        raise ValueError("every entry of 'answers' must be a non-empty string (or an object with 'answer')")
    return out


def parse_vqa_record(record: object, line: int, source: DataSource, check_images: bool) -> VQARow:
    """Validates one eval record (the training row checks, relaxed so a gpt turn may stand in `answers`).

    Raises:
        ValueError: with the reason, when the record is invalid or has no reference answer.
    """
    if not isinstance(record, dict):
        raise ValueError(f"the row is a JSON {type(record).__name__}, not an object")
    answers = _reference_answers(record)
    turns = record.get("conversations", record.get("messages"))
    has_reply = isinstance(turns, list) and any(
        isinstance(t, dict) and t.get("from", t.get("role")) in ("gpt", "assistant") for t in turns
    )
    if not has_reply:
        if answers is None:
            raise ValueError("no reference answer: give a gpt turn after the question or an 'answers' list")
        if isinstance(turns, list):
            record = {**record, "conversations": [*turns, {"from": "gpt", "value": answers[0]}]}
    row = parse_row(record, line, source, check_images)
    first = next(k for k, t in enumerate(row.conversations) if t["from"] == "human")
    reference = row.conversations[first + 1]["value"] if first + 1 < len(row.conversations) else ""
    if answers is None:
        if not reference.strip():
            raise ValueError("the gpt turn after the question (the reference answer) is empty")
        answers = [reference]
    kind = record.get("question_type", record.get("type"))
    return VQARow(
        row=row,
        question=row.conversations[first]["value"],
        answers=answers,
        question_type=None if kind is None else str(kind),
    )


def load_vqa_rows(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    check_images: bool = False,
) -> list[VQARow]:
    """Reads a LLaVA-format eval file (`.json` list or `.jsonl`).

    Args:
        path: The eval file.
        image_folder: Folder relative image paths are resolved against (default: the file's folder).
        limit: Keep only the first `limit` rows.
        check_images: Open and verify every image up front (missing images are always caught).

    Raises:
        DataError: naming the file, line and row id, for a bad JSON line, a missing image or answer, or an
            invalid conversation.
    """
    source = DataSource(path=str(path), image_folder=None if image_folder is None else str(image_folder))
    rows = []
    for line, record, parse_error in read_records(source.path):
        if limit is not None and len(rows) >= limit:
            break
        try:
            if parse_error is not None:
                raise ValueError(parse_error)
            rows.append(parse_vqa_record(record, line, source, check_images))
        except ValueError as e:
            bad = BadRow(source=source.path, line=line, id=row_id(record, source, line), reason=str(e))
            raise bad_row_error(bad) from e
    return rows


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end a generated reply: the tokenizer's end-of-turn tokens and its eos, sorted."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def modality_batches(rows: list, batch_size: int) -> Iterable[list]:
    """Batches of at most `batch_size` rows, image rows first, never mixing modalities; within a modality the
    rows are taken in order of question length (stable), so a left-padded batch holds little padding."""
    for flag in (True, False):
        group = sorted((r for r in rows if (r.image is not None) == flag), key=lambda r: len(r.question))
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def render_prompt(
    processor,
    question: str,
    prompt_suffix: str | None = None,
    description: tuple[str, str] | None = None,
) -> str:
    """The question as a user turn, rendered with the chat template and its generation prompt (a question
    with an image gets the model's own system prompt, `EveProcessor.system_prompt`).

    With `description` (`(prompt, reply)`), the question follows a first exchange about its image: the image
    and the describe prompt, then the model's own description; the question's `<image>` moves to that first
    turn.
    """
    content = question if not prompt_suffix else f"{question}\n{prompt_suffix}"
    if description is None:
        return processor.chat_prompt(content)
    marker = processor.image_token
    prompt, reply = description
    history = [
        {"role": "user", "content": f"{marker}\n{prompt}"},
        {"role": "assistant", "content": reply.replace(marker, "")},  # one image, one placeholder
    ]
    return processor.chat_prompt(without_marker(content, marker), history=history)


def without_marker(text: str, marker: str) -> str:
    """`text` with every `marker` taken out, wherever it stands: a line that held only the marker goes, and on a
    line that held it beside words the words close up around one space."""
    lines = []
    for line in text.split("\n"):
        if marker not in line:
            lines.append(line)
            continue
        line = re.sub(r"[ \t]{2,}", " ", line.replace(marker, " ")).strip()
        if line:
            lines.append(line)
    return "\n".join(lines).strip()


def _greedy(model, processor, texts: list[str], images: list[Image.Image], max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded `texts` (KV cache; stops at an end of turn), stripped."""
    tokenizer = processor.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = processor(texts, images=images or None, padding=True).to(model.device)
    finally:
        tokenizer.padding_side = padding_side
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=stop_ids or None,
    )
    new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (B, new)
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@torch.no_grad()
def describe_images(
    model, processor, images: list[str], prompt: str, *, batch_size: int = 8, max_new_tokens: int = 32
) -> dict[str, str]:
    """The model's greedy reply to `prompt` about each image, each image described once.

    Args:
        model: An `EveForConditionalGeneration` in eval mode.
        processor: Its `EveProcessor`.
        images: Image file paths (repeats allowed).
        prompt: The user turn's text after the image, e.g. "Describe the image in a few words.".
        batch_size: Images per generate call.
        max_new_tokens: Longest reply.

    Returns:
        `{path: reply}` for every distinct path.
    """
    descriptions: dict[str, str] = {}
    unique = sorted(set(images))
    text = processor.chat_prompt(f"{processor.image_token}\n{prompt}")
    for start in range(0, len(unique), batch_size):
        paths = unique[start : start + batch_size]
        replies = _greedy(
            model, processor, [text] * len(paths), [_open_rgb(p) for p in paths], max_new_tokens
        )
        descriptions.update(zip(paths, replies, strict=True))
    return descriptions


@torch.no_grad()
def generate_answers(
    model,
    processor,
    rows: list[VQARow],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prompt_suffix: str | None = None,
    describe_first: str | None = None,
    describe_tokens: int = 32,
    progress: bool = True,
) -> list[dict]:
    """Greedy answers (KV cache, left padding), one prediction dict per row, in batch order.

    With `describe_first` (a prompt such as "Describe the image in a few words."), each image is first
    described by the model (greedy, at most `describe_tokens` tokens, once per image), and each question about
    it is asked as the second turn of that conversation (`render_prompt`); rows without an image are asked
    as usual.

    Returns:
        Dicts with `id`, `question`, `image`, `question_type`, `answers`, `prediction`; with `describe_first`
        also `description` (the model's reply about the row's image; None for a row without an image).
    """
    descriptions: dict[str, str] = {}
    if describe_first is not None:
        images = [r.image for r in rows if r.image is not None]
        descriptions = describe_images(
            model, processor, images, describe_first, batch_size=batch_size, max_new_tokens=describe_tokens
        )
    predictions = []
    bar = tqdm(total=len(rows), desc="vqa", unit="q", disable=not progress)
    for batch in modality_batches(rows, batch_size):
        texts = [
            render_prompt(
                processor,
                r.question,
                prompt_suffix,
                (describe_first, descriptions[r.image]) if r.image in descriptions else None,
            )
            for r in batch
        ]
        images = [_open_rgb(r.image) for r in batch if r.image is not None]
        for row, text in zip(batch, _greedy(model, processor, texts, images, max_new_tokens), strict=True):
            prediction = {
                "id": row.id,
                "question": row.question,
                "image": row.image,
                "question_type": row.question_type,
                "answers": row.answers,
                "prediction": text,
            }
            if describe_first is not None:
                prediction["description"] = descriptions.get(row.image)
            predictions.append(prediction)
        bar.update(len(batch))
    bar.close()
    return predictions


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def evaluate_vqa(
    model,
    processor,
    rows: list[VQARow],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: int | None = None,
    prompt_suffix: str | None = None,
    describe_first: str | None = None,
    describe_tokens: int = 32,
    progress: bool = True,
) -> dict:
    """Generates answers for `rows` and scores them.

    Args:
        model: An `EveForConditionalGeneration` (put in eval mode here).
        processor: Its `EveProcessor`.
        rows: From `load_vqa_rows`.
        batch_size: Questions per generate call (one modality per batch).
        max_new_tokens: Longest answer.
        limit: Evaluate only the first `limit` rows.
        prompt_suffix: Text appended to each question on a new line, e.g. LLaVA's
            "Answer the question using a single word or phrase."
        describe_first: Ask each question after the model's own description of its image, in reply to this
            prompt (`generate_answers`); a protocol of ours, stated in the metrics as `describe_first`.
        describe_tokens: Longest description.
        progress: Show a tqdm progress bar.

    Returns:
        The metrics of `score_predictions`, plus `predictions` (the list of prediction dicts; report writers
        leave it out of metrics files).
    """
    model.eval()
    rows = rows[:limit] if limit is not None else rows
    predictions = generate_answers(
        model,
        processor,
        rows,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_suffix=prompt_suffix,
        describe_first=describe_first,
        describe_tokens=describe_tokens,
        progress=progress,
    )
    for p in predictions:
        p["accuracy"], p["exact_match"] = answer_accuracy(p["prediction"], p["answers"])
    protocol = {} if describe_first is None else {"describe_first": describe_first}
    return {**score_predictions(predictions), **protocol, "predictions": predictions}
