"""easy-VQA (PyPI `easy-vqa`, MIT; vzhou842/easy-VQA) -> LLaVA JSON for the three quickstart stages.

easy-VQA is 64x64 PNGs of one coloured shape (3 shapes, 8 colours) with templated questions: 4,000 train
images / 38,575 questions and 1,000 test images / 9,673 questions, 13 one-word answers. It ships no captions,
so stage-1 captions are inferred from each image's own questions and answers:

- "what is the blue shape?" -> rectangle gives both attributes; "what color is the triangle?" -> red too;
- a yes/no question states a fact when the answer is affirmative after negation ("is there not a red
  shape?" -> no means red); a denied attribute is ruled out, so when two shapes (or seven colours) are ruled
  out the remaining one is inferred.

This names the shape of 3,837 and the colour of 3,712 of the 4,000 train images (every named colour matches
the image's pixels); the caption says what is known ("A blue triangle.", "A blue shape.", "A triangle."),
giving 3,971 caption rows; the 29 images with neither known get none.

Files written (image paths relative to the JSON files' folder, which is LLaVA's default image folder):

- `captions.json`: one row per captioned train image, human "<image>\\nDescribe the image in a few words." and
  the caption as the gpt turn: stage 1 trains on it in the `plain` template (image + caption only), the
  quickstart's stage 3 in the chat template;
- `train.json`: stages 2/3, one row per train question: "<image>\\n<Question>? Answer with one word." and the
  one-word answer; the instruction makes the expected reply format explicit to a chat LM;
- `train_dialogues.json`: the questions in LLaVA-665k's layout, an image's questions as the turns of
  conversations of up to `DIALOGUE_TURNS` turns (in a shuffled order fixed by the image id; `<image>` in the
  first turn only), so a training step supervises several answers per image instead of one;
- `train_dialogues_balanced.json`: the same with the yes/no questions balanced. easy-VQA asks "is there a red
  shape?" of random colours, so "no" answers 88% of such questions (and "yes" 88% of "is there not a red
  shape?"); answering by the question's form alone scores about 82% on the yes/no test questions without
  looking at the image, and a small model trained on the raw mix learns exactly that. Here, for each form
  (plain or negated, colour or shape), the majority answer's questions are subsampled (seeded) to the
  minority answer's count, which takes that shortcut away (at the quickstart's budget the model then answers
  yes/no questions at chance, so the quickstart's stage 2 trains on the raw mix);
- `train_dialogues_open.json`: the same with the shape and colour questions only (no yes/no), which the
  question's form does not answer (an earlier turn of the conversation names the answer for about a fifth of
  them, as in the other files);
- `train_dialogues_described.json` (and `_balanced_described`, `_open_described`): the same conversations,
  each opened, when the image's caption is known, by the caption turn ("<image>\\nDescribe the image in a few
  words." -> "A blue triangle."), the questions following without `<image>`. A model trained on them answers
  a question after describing the image in its own words, which is how the quickstart evaluates it
  (`eve eval vqa --describe-first`): the yes/no comparison is then between two words of the conversation, which
  the 135M LLM learns, and not between a word and the image tokens, which it does not at this budget (README,
  "Describe, then answer");
- `test.json`: evaluation only (never trained on), the same rows for the test split;
- `images/{train,test}/<id>.png`: copies of the package's images.

Every row also carries `question_type` (`shape`, `color` or `yes-no`, from the answer); test rows carry
`answers` (the accepted answers, here the single one).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
CAPTION_PROMPT = "Describe the image in a few words."
VQA_INSTRUCTION = "Answer with one word."
DIALOGUE_TURNS = 4
DialogueSet = Literal["all", "balanced", "open"]  # which questions a dialogue file keeps
DIALOGUE_SETS: tuple[DialogueSet, ...] = get_args(DialogueSet)
SPLITS = ("train", "test")


def question_type(answer: str) -> str:
    """`shape`, `color` or `yes-no`, from the answer."""
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    if answer in ("yes", "no"):
        return "yes-no"
    raise ValueError(f"unknown easy-VQA answer {answer!r}")


def question_facts(question: str, answer: str) -> tuple[dict[str, str], set[str]]:
    """What one question/answer pair says about its image.

    Returns:
        `(facts, ruled_out)`: facts as `{"shape": ..., "color": ...}` (either may be absent) and the set of
        shapes/colours the pair says are not in the image.
    """
    words = re.findall(r"[a-z]+", question.lower())
    shape = next((w for w in words if w in SHAPES), None)
    color = next((w for w in words if w in COLORS), None)
    facts: dict[str, str] = {}
    if answer in ("yes", "no"):
        negated = "not" in words or "no" in words
        present = (answer == "yes") != negated
        named = {k: v for k, v in (("shape", shape), ("color", color)) if v}
        if present:
            return named, set()
        return {}, set(named.values())
    # A "what ..." question: the answer is one attribute; a word in the question names the other.
    facts[question_type(answer)] = answer
    if shape:
        facts["shape"] = shape
    if color:
        facts["color"] = color
    return facts, set()


def image_facts(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The shape and colour of an image, as far as its question/answer pairs reveal them.

    Raises:
        ValueError: when two pairs contradict each other.
    """
    facts: dict[str, str] = {}
    ruled_out: set[str] = set()
    for question, answer in pairs:
        new, out = question_facts(question, answer)
        ruled_out |= out
        for key, value in new.items():
            if facts.setdefault(key, value) != value:
                raise ValueError(f"contradicting answers: {key} is {facts[key]!r} and {value!r}")
    for key, values in (("shape", SHAPES), ("color", COLORS)):
        left = [v for v in values if v not in ruled_out]
        if key not in facts and len(left) == 1:
            facts[key] = left[0]
    return facts


def caption_for(facts: dict[str, str]) -> str | None:
    """The caption ("A blue triangle.", "A blue shape." or "A triangle."), or None when nothing is known."""
    if not facts:
        return None
    words = [facts[k] for k in ("color", "shape") if k in facts]
    if "shape" not in facts:
        words.append("shape")
    return f"A {' '.join(words)}."


def question_prompt(question: str) -> str:
    """The human turn's text for a question: capitalised, with the one-word instruction."""
    return f"{question[:1].upper()}{question[1:]} {VQA_INSTRUCTION}"


def vqa_row(row_id: str, image: str, question: str, answer: str, *, with_answers: bool) -> dict:
    """One LLaVA row for a question about `image` (a path relative to the JSON file)."""
    prompt = f"<image>\n{question_prompt(question)}"
    row = {
        "id": row_id,
        "image": image,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
        "question_type": question_type(answer),
    }
    if with_answers:
        row["answers"] = [answer]
    return row


def yes_no_form(question: str) -> tuple[bool, str]:
    """`(negated, "color" or "shape")` of a yes/no question."""
    words = re.findall(r"[a-z]+", question.lower())
    return "not" in words or "no" in words, "color" if any(w in COLORS for w in words) else "shape"


def balanced_yes_no(questions, answers, seed: int = 0) -> list[int]:
    """Indices of the questions to keep so that each yes/no form has as many "yes" as "no" answers (the
    majority answer's questions subsampled with `seed`); every other question is kept."""
    by_form = defaultdict(lambda: {"yes": [], "no": []})
    keep = []
    for k, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        if answer in ("yes", "no"):
            by_form[yes_no_form(question)][answer].append(k)
        else:
            keep.append(k)
    rng = random.Random(seed)
    for form in sorted(by_form):
        yes, no = by_form[form]["yes"], by_form[form]["no"]
        count = min(len(yes), len(no))
        keep += rng.sample(yes, count) + rng.sample(no, count)
    return sorted(keep)


def dialogue_questions(questions, answers, kept: DialogueSet) -> list[int]:
    """Indices of the questions a dialogue file keeps: `all`, `balanced` (yes/no balanced per form, see
    `balanced_yes_no`) or `open` (the shape and colour questions, no yes/no)."""
    if kept == "all":
        return list(range(len(questions)))
    if kept == "balanced":
        return balanced_yes_no(questions, answers)
    if kept == "open":
        return [k for k, answer in enumerate(answers) if question_type(answer) != "yes-no"]
    raise ValueError(f"kept must be one of {DIALOGUE_SETS}, not {kept!r}")


def dialogue_rows(
    questions,
    answers,
    image_ids,
    image_path,
    turns: int = DIALOGUE_TURNS,
    kept: DialogueSet = "all",
    captions: dict | None = None,
) -> list[dict]:
    """Stages 2/3 rows in LLaVA-665k's multi-turn layout: each image's questions (those `kept`, see
    `dialogue_questions`), shuffled with a seed of the image id, cut into conversations of at most `turns`
    question/answer turns; in image id order. With `captions` (image id -> caption), each conversation of an
    image with a caption opens with the caption turn (`CAPTION_PROMPT` and the caption), which does not count
    among the `turns`."""
    pairs = defaultdict(list)
    for k in dialogue_questions(questions, answers, kept):
        pairs[image_ids[k]].append((questions[k], answers[k]))
    rows = []
    for image_id in sorted(pairs):
        qa = list(pairs[image_id])
        random.Random(image_id).shuffle(qa)
        caption = (captions or {}).get(image_id)
        opening = [(CAPTION_PROMPT, caption)] if caption is not None else []
        for part, start in enumerate(range(0, len(qa), turns)):
            conversation = []
            turns_here = opening + [(question_prompt(q), a) for q, a in qa[start : start + turns]]
            for k, (text, answer) in enumerate(turns_here):
                conversation.append({"from": "human", "value": f"<image>\n{text}" if k == 0 else text})
                conversation.append({"from": "gpt", "value": answer})
            rows.append(
                {
                    "id": f"easy-vqa-dialogue-{image_id}-{part}",
                    "image": image_path(image_id),
                    "conversations": conversation,
                }
            )
    return rows


def facts_by_image(questions, answers, image_ids) -> dict:
    """`image_facts` of each image id, from all the question/answer pairs about it."""
    pairs = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        pairs[image_id].append((question, answer))
    return {image_id: image_facts(found) for image_id, found in pairs.items()}


def image_captions(questions, answers, image_ids) -> dict:
    """The caption of each image id whose questions reveal its shape or colour (`caption_for`)."""
    facts = facts_by_image(questions, answers, image_ids)
    captions = {image_id: caption_for(found) for image_id, found in facts.items()}
    return {image_id: caption for image_id, caption in captions.items() if caption is not None}


def caption_rows(questions, answers, image_ids, image_path) -> list[dict]:
    """Stage-1 rows, one per image whose questions reveal its shape or colour, in image id order."""
    rows = []
    for image_id, caption in sorted(image_captions(questions, answers, image_ids).items()):
        rows.append(
            {
                "id": f"easy-vqa-caption-{image_id}",
                "image": image_path(image_id),
                "conversations": [
                    {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    return rows


def write_json_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Writes a JSON array with one row per line (deterministic bytes, readable, diffable)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")


def build_easy_vqa(out_dir: str | os.PathLike, source=None) -> dict:
    """Writes captions.json, train.json, train_dialogues(_balanced, _open)(_described).json, test.json, images.

    Args:
        out_dir: Destination folder (created if missing).
        source: An object with easy-VQA's API (default: the installed `easy_vqa` module).

    Returns:
        Counts: images and questions per split, caption rows, and questions per type in the test split.
    """
    if source is None:
        import easy_vqa as source
    out = Path(out_dir)
    counts: dict[str, int] = {}
    for split in SPLITS:
        questions, answers, image_ids = getattr(source, f"get_{split}_questions")()
        image_files = getattr(source, f"get_{split}_image_paths")()
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for image_id in sorted(image_files):
            shutil.copyfile(image_files[image_id], out / "images" / split / f"{image_id}.png")

        def image_path(image_id, split=split):
            return f"images/{split}/{image_id}.png"

        rows = [
            vqa_row(f"easy-vqa-{split}-{k}", image_path(i), q, a, with_answers=split == "test")
            for k, (q, a, i) in enumerate(zip(questions, answers, image_ids, strict=True))
        ]
        write_json_rows(out / f"{split}.json", rows)
        counts[f"{split}_images"] = len(image_files)
        counts[f"{split}_questions"] = len(rows)
        if split == "train":
            captions = caption_rows(questions, answers, image_ids, image_path)
            write_json_rows(out / "captions.json", captions)
            counts["captions"] = len(captions)
            known = image_captions(questions, answers, image_ids)
            for kept in DIALOGUE_SETS:
                for described in (False, True):
                    suffix = ("" if kept == "all" else f"_{kept}") + ("_described" if described else "")
                    dialogues = dialogue_rows(
                        questions,
                        answers,
                        image_ids,
                        image_path,
                        kept=kept,
                        captions=known if described else None,
                    )
                    write_json_rows(out / f"train_dialogues{suffix}.json", dialogues)
                    counts[f"dialogues{suffix}"] = len(dialogues)
        else:
            for qtype in ("shape", "color", "yes-no"):
                counts[f"test_{qtype}"] = sum(r["question_type"] == qtype for r in rows)
    return counts
