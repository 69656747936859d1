"""Loads LLaVA-format conversation data (JSON arrays or JSONL) and checks every row before training starts.

A row is LLaVA's `{"id", "image"?, "conversations": [{"from": "human"|"gpt"|"system", "value": str}]}`
(haotian-liu/LLaVA `llava/train/train.py`, `LazySupervisedDataset`); rows with `role`/`content` keys and
`user`/`assistant` role names are accepted and normalised to LLaVA's. Unlike LLaVA, which finds a bad row
only when a worker crashes on it mid-run, every row is validated up front:

- `conversations` is a non-empty list of turns: an optional leading system turn, then human/gpt alternating,
  starting with human, with at least one gpt turn;
- `image` (optional) is resolved against the source's `image_folder` (default: the data file's folder) and
  checked as `check_images` says: `none` (not at all), `exists` (the file exists) or `decode` (it opens with
  PIL, passes `verify()` and decodes in full);
- `<image>` appears at most once, in the first human turn, and only in rows that have an image; a row with an
  image and no marker gets `"<image>\\n"` prepended to its first human turn (where LLaVA puts it).

A bad row raises `DataError` naming the file, line and row id (`on_bad_row="raise"`) or is skipped and
recorded (`on_bad_row="skip"`). Each source has a sampling weight: 2.0 repeats its rows twice, 0.5 keeps a
seeded half.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field

from PIL import Image

from eve_vlm.errors import ConfigError, DataError

IMAGE_MARKER = "<image>"
ROLE_NAMES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}
ON_BAD_ROW = ("raise", "skip")
CHECK_IMAGES = ("none", "exists", "decode")


@dataclass
class ConversationRow:
    """One validated conversation.

    Attributes:
        id: The row's `id` (or `<file stem>-<line>` when the row has none).
        conversations: Turns as `{"from": "human"|"gpt"|"system", "value": str}`.
        image: Absolute path of the row's image, or None for a text-only row.
        source: Path of the data file the row came from.
        line: 1-based line (JSONL) or 1-based index in the JSON array.
    """

    id: str
    conversations: list[dict]
    image: str | None
    source: str
    line: int


@dataclass
class DataSource:
    """A data file and how to read it.

    Attributes:
        path: A `.json` file holding a list of rows or a `.jsonl` file with one row per line.
        image_folder: Folder that relative `image` paths are resolved against (default: the file's folder).
        weight: Sampling weight: the integer part repeats the rows, the fractional part keeps a seeded subset.
    """

    path: str
    image_folder: str | None = None
    weight: float = 1.0


@dataclass
class BadRow:
    """A row that was skipped, and why."""

    source: str
    line: int
    id: str
    reason: str


@dataclass
class LoadedRows:
    """The rows kept (weighted, in source order) and the rows skipped."""

    rows: list[ConversationRow] = field(default_factory=list)
    skipped: list[BadRow] = field(default_factory=list)


def bad_row_error(bad: BadRow) -> DataError:
    """The error raised for a bad row under `on_bad_row="raise"`."""
    return DataError(
        f"{bad.source}, line {bad.line}, row id {bad.id!r}: {bad.reason}. "
        "Fix the row, or pass on_bad_row='skip' to skip bad rows and count them."
    )


def read_records(path: str) -> list[tuple[int, object, str | None]]:
    """Reads a data file into `(line, record, parse_error)` triples.

    Raises:
        DataError: when the file is missing, has an unknown extension, or is a `.json` file that does not
            parse or is not a list (a malformed JSONL line is reported as that row's parse error instead).
    """
    if not os.path.isfile(path):
        raise DataError(f"Data file {path} does not exist; check the path in the recipe.")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        if ext == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
                    "Fix the file (a .json file must hold one list of rows; use .jsonl for one row per line)."
                ) from e
            if not isinstance(data, list):
                raise DataError(
                    f"{path} holds a JSON {type(data).__name__}, not a list of rows; wrap the rows in [...]."
                )
            return [(i + 1, record, None) for i, record in enumerate(data)]
        if ext == ".jsonl":
            records = []
            for i, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    records.append((i, json.loads(text), None))
                except json.JSONDecodeError as e:
                    records.append((i, None, f"malformed JSON ({e.msg} at column {e.colno})"))
            return records
    raise DataError(f"{path}: unknown data file type {ext!r}; use .json (a list of rows) or .jsonl.")


def normalise_turns(turns: object) -> list[dict]:
    """Checks the turn list and returns it as LLaVA `{"from", "value"}` dicts.

    Raises:
        ValueError: with the reason, when a turn or the turn order is invalid.
    """
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of turns")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {k} is a {type(turn).__name__}, not an object with 'from' and 'value'")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role not in ROLE_NAMES:
            raise ValueError(
                f"turn {k} has role {role!r}; use one of human, gpt, system (or user, assistant)"
            )
        if not isinstance(value, str):
            raise ValueError(f"turn {k} has a {type(value).__name__} value; the value must be a string")
        out.append({"from": ROLE_NAMES[role], "value": value})
    body = out[1:] if out[0]["from"] == "system" else out
    for k, turn in enumerate(body):
        expected = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(
                f"turn {k + len(out) - len(body)} is {turn['from']!r} where {expected!r} was expected; "
                "turns must alternate human, gpt, ... starting with human (after an optional system turn)"
            )
    if not any(t["from"] == "gpt" for t in out):
        raise ValueError("the conversation has no gpt turn, so there is nothing to learn from it")
    return out


def image_check_mode(check_images: bool | str) -> str:
    """`check_images` as one of `CHECK_IMAGES` (True is "decode", False is "exists").

    Raises:
        ConfigError: for an unknown mode.
    """
    if isinstance(check_images, bool):
        return "decode" if check_images else "exists"
    if check_images not in CHECK_IMAGES:
        raise ConfigError(f"check_images={check_images!r}; use one of {CHECK_IMAGES}")
    return check_images


def decode_image(path: str) -> None:
    """Opens `path` with PIL, verifies it and decodes its pixels.

    Raises:
        ValueError: naming the file, when it is corrupt or not an image.
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"image {path} is corrupt or not an image ({type(e).__name__}: {e})") from e


def resolve_image(image: object, base: str, check_images: bool | str) -> str:
    """The absolute path of a row's image, checked as `check_images` says (see `CHECK_IMAGES`).

    Raises:
        ValueError: with the reason, when the image is not a path, is missing or cannot be read.
    """
    mode = image_check_mode(check_images)
    if not isinstance(image, str) or not image:
        raise ValueError(f"'image' must be one non-empty path string, got {image!r}")
    path = os.path.abspath(os.path.join(base, image))
    if mode != "none" and not os.path.isfile(path):
        raise ValueError(f"image {image!r} not found at {path}; check the path or the source's image_folder")
    if mode == "decode":
        decode_image(path)
    return path


def place_image_marker(turns: list[dict], has_image: bool) -> None:
    """Checks the `<image>` markers and inserts one into the first human turn of an image row without one.

    Raises:
        ValueError: with the reason, when markers are misplaced or do not match the image.
    """
    counts = [t["value"].count(IMAGE_MARKER) for t in turns]
    first_human = next(k for k, t in enumerate(turns) if t["from"] == "human")
    if not has_image:
        if sum(counts):
            raise ValueError(
                f"the text has {IMAGE_MARKER} but the row has no 'image'; add one or drop the marker"
            )
        return
    if sum(counts) > 1 or sum(counts) != counts[first_human]:
        raise ValueError(f"{IMAGE_MARKER} must appear once, in the first human turn (found {sum(counts)})")
    if counts[first_human] == 0:
        turns[first_human]["value"] = IMAGE_MARKER + "\n" + turns[first_human]["value"]


def parse_row(record: object, line: int, source: DataSource, check_images: bool | str) -> ConversationRow:
    """Validates one record into a `ConversationRow`.

    Raises:
        ValueError: with the reason, when the record is invalid.
    """
    if not isinstance(record, dict):
        raise ValueError(f"the row is a JSON {type(record).__name__}, not an object")
    turns = normalise_turns(record.get("conversations", record.get("messages")))
    image = record.get("image")
    path = None
    if image is not None:
        base = source.image_folder or os.path.dirname(os.path.abspath(source.path))
        path = resolve_image(image, base, check_images)
    place_image_marker(turns, path is not None)
    return ConversationRow(
        id=row_id(record, source, line), conversations=turns, image=path, source=source.path, line=line
    )


def row_id(record: object, source: DataSource, line: int) -> str:
    """The row's `id`, or `<file stem>-<line>` when it has none."""
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return f"{os.path.splitext(os.path.basename(source.path))[0]}-{line}"


def apply_weight(rows: list, weight: float, rng: random.Random) -> list:
    """Repeats `rows` `floor(weight)` times and adds a seeded subset of `round(frac * len)` rows, in order."""
    whole = math.floor(weight)
    extra = round((weight - whole) * len(rows))
    keep = sorted(rng.sample(range(len(rows)), extra))
    return rows * whole + [rows[i] for i in keep]


def check_weight(source: DataSource) -> None:
    """Raises `ConfigError` unless the source's weight is a finite number >= 0."""
    if not math.isfinite(source.weight) or source.weight < 0:
        raise ConfigError(f"{source.path}: weight {source.weight} must be a finite number >= 0")


def source_rng(seed: int, index: int, source: DataSource) -> random.Random:
    """The generator that picks the fractional-weight subset of source number `index`."""
    return random.Random(f"{seed}:{index}:{source.path}")


def load_rows(
    sources: list[DataSource], *, on_bad_row: str = "raise", seed: int = 0, check_images: bool | str = True
) -> LoadedRows:
    """Loads, validates and weights the rows of several LLaVA-format files.

    Args:
        sources: The data files, each with its image folder and sampling weight.
        on_bad_row: "raise" to stop at the first bad row, "skip" to skip bad rows and record them.
        seed: Seeds the subset kept for a fractional weight (the same seed keeps the same rows).
        check_images: `none`, `exists` or `decode` (open, verify and decode every image: slower, but catches
            corrupt files); True is `decode`, False is `exists`.

    Returns:
        The kept rows, source after source, each file's rows in file order; and the skipped rows.

    Raises:
        DataError: for a missing or unparsable file, or (with on_bad_row="raise") a bad row, naming the file,
            line and row id and saying what is wrong.
        ConfigError: for an unknown `on_bad_row` or a negative weight.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row={on_bad_row!r}; use one of {ON_BAD_ROW}")
    check_images = image_check_mode(check_images)
    loaded = LoadedRows()
    for index, source in enumerate(sources):
        check_weight(source)
        rows = []
        for line, record, parse_error in read_records(source.path):
            try:
                if parse_error is not None:
                    raise ValueError(parse_error)
                rows.append(parse_row(record, line, source, check_images))
            except ValueError as e:
                bad = BadRow(source=source.path, line=line, id=row_id(record, source, line), reason=str(e))
                if on_bad_row == "raise":
                    raise bad_row_error(bad) from e
                loaded.skipped.append(bad)
        loaded.rows.extend(apply_weight(rows, source.weight, source_rng(seed, index, source)))
    return loaded
