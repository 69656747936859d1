"""What every benchmark adapter provides: its questions (prompt + image), a scorer over an answers file, and
the headline number of the paper's table; plus the registry the commands look benchmarks up in.

A `VLMBenchmark` reads its files under `--data-root` (LLaVA's `playground/data/eval` layout), turns each
question into a `Question` whose `prompt` is the text LLaVA-1.5's eval scripts give the model (the image
goes before it), and scores `{question_id: answer text}` with the benchmark's official metric. Scoring needs
no model, so answers written by LLaVA's or MoE-LLaVA's own scripts score the same way.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from PIL import Image

from eve_vlm.errors import ConfigError, DataError

__all__ = [
    "SHORT_ANSWER",
    "LETTER_ANSWER",
    "BenchmarkRegistry",
    "Question",
    "VLMBenchmark",
    "field_of",
    "read_json",
    "read_jsonl",
    "require_dir",
    "require_file",
]

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5 short-answer prompt
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5 MC prompt


@dataclass(frozen=True)
class Question:
    """One generation request.

    Attributes:
        question_id: The id the answers file carries (the benchmark's own id, as LLaVA writes it).
        prompt: The text after the image, prompt instructions included (written to the answers file).
        image_path: The image file, or None.
        image_base64: The image as base64 (MMBench's TSV), or None.
        max_new_tokens: The longest answer LLaVA's script for this benchmark allows.
        metadata: Extra fields copied into the answers row (MMBench: `round_id`, `options`, `option_char`).
    """

    question_id: str | int
    prompt: str
    image_path: str | None = None
    image_base64: str | None = None
    max_new_tokens: int = 128
    metadata: dict = field(default_factory=dict)

    def capped(self, max_new_tokens: int) -> Question:
        """This question with its answer length capped at `max_new_tokens`."""
        return replace(self, max_new_tokens=min(self.max_new_tokens, max_new_tokens))

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_base64 is not None

    def open_image(self) -> Image.Image:
        """The question's image as RGB.

        Raises:
            DataError: The image file is missing or unreadable.
        """
        try:
            if self.image_base64 is not None:
                with Image.open(io.BytesIO(base64.b64decode(self.image_base64))) as im:
                    return im.convert("RGB")
            with Image.open(self.image_path) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            where = self.image_path or "its base64 image"
            raise DataError(
                f"Question {self.question_id}: cannot read {where} ({e}); check the benchmark's image folder."
            ) from e


@dataclass(frozen=True)
class VLMBenchmark:
    """A vision-language benchmark: files, prompt, parser and metric.

    Attributes:
        name: The name on the command line and in the table (`gqa`, `sqa_img`, ...).
        column: The column header of the paper's table.
        folder: Its folder under `--data-root`.
        load: `load(root) -> list[Question]`, the questions in file order.
        score: `score(root, answers) -> metrics` with `answers = {str(question_id): answers row}`; the metrics
            hold `headline` (the table's number) and the benchmark's other official numbers.
    """

    name: str
    column: str
    folder: str
    load: Callable[[str], list[Question]]
    score: Callable[[str, dict[str, dict]], dict]


@dataclass(frozen=True)
class BenchmarkRegistry:
    """Benchmarks by name, passed explicitly to the commands (no global registry).

    Attributes:
        vlm: The vision-language benchmarks, in the table's column order.
    """

    vlm: tuple[VLMBenchmark, ...]

    def names(self) -> list[str]:
        return [b.name for b in self.vlm]

    def get(self, name: str) -> VLMBenchmark:
        """The benchmark called `name`.

        Raises:
            ConfigError: No benchmark has that name (the message lists the known ones).
        """
        for bench in self.vlm:
            if bench.name == name:
                return bench
        raise ConfigError(f"Unknown benchmark {name!r}; choose one of: {', '.join(self.names())}.")

    def __iter__(self) -> Iterator[VLMBenchmark]:
        return iter(self.vlm)


def require_dir(path: str, what: str) -> str:
    """`path` if it is a folder, else a DataError naming it and what belongs there."""
    if not os.path.isdir(path):
        raise DataError(f"Folder {path} does not exist; it should hold {what}.")
    return path


def require_file(path: str, what: str) -> str:
    """`path` if it is a file, else a DataError naming it and what it should be."""
    if not os.path.isfile(path):
        raise DataError(f"File {path} does not exist; it should be {what}.")
    return path


def read_json(path: str, what: str):
    """A JSON file's content.

    Raises:
        DataError: naming the file, when it is missing or malformed.
    """
    require_file(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno}); it should be {what}."
            ) from e


def read_jsonl(path: str, what: str) -> list[dict]:
    """A JSON-lines file's objects (blank lines skipped).

    Raises:
        DataError: naming the file and line, when it is missing or a line is not a JSON object.
    """
    require_file(path, what)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, line {line}: malformed JSON ({e.msg} at column {e.colno}); it should be {what}."
                ) from e
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {line}: not a JSON object; it should be {what}.")
            rows.append(row)
    return rows


def field_of(row: dict, key: str, path: str, line: int | str):
    """`row[key]`, or a DataError naming the file, line and missing key."""
    if key not in row:
        raise DataError(f"{path}, row {line}: missing the field {key!r}.")
    return row[key]
