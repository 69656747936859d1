"""The data cache: LLaVA-format data checked and encoded once, stored as memory-mapped arrays that every
rank, data-loader worker, resumed run and later stage reads without encoding again.

Features:
- One cache folder per key: the versions of eve_vlm, transformers and tokenizers, the data files (path and
  sha256 of the contents) and image folders, the image check (`none` | `exists` | `decode`), the tokenizer
  (a digest of its saved files, chat template included), the template, system prompt, max length, image
  token and image-token count. Changing any of them gives a new folder; sampling weights and the seed only
  choose rows from it (`CachedDataset.indices`), so they do not.
- What is stored, per kept row, in `.npy` files read with `np.load(mmap_mode="r")`: the token ids as int32
  with one placeholder per image (`EveCollator` expands it to `num_image_tokens`), a uint8 label mask
  (labels are the ids where it is 1, -100 elsewhere), the expanded length (for the length-grouped sampler,
  without reading the tokens), whether it has an image, its image path, row id, source file and line.
  Skipped rows and their reasons are in `manifest.json`, so a warm start reports them too.
- Building runs in `num_proc` forked processes, each on a contiguous share of the rows (parse, image check,
  render, tokenise, labels), with a progress bar (rows/s, ETA). The folder is built under a temporary name
  next to its final place, flushed to disk and renamed into it when complete, so a killed build leaves no
  half cache; the next build removes what a killed one left (its process gone, or older than a day).
- A bad image met while training (a corrupt file under `check_images: exists`) is handled by the dataset:
  `on_bad_row: raise` stops with a `DataError` naming the file, line, row id and image; `skip` logs it, takes
  the next image row instead and counts it in the example (`bad_images`, summed per batch by the collator).

Multi-process runs call `prepare_cache` inside `TrainingArguments.main_process_first`: the main process
builds, the others wait and then read the folder with `build=False`, so when the main process fails they stop
with a `DataError` pointing at its error instead of building again (see `eve_vlm/train/stages.py`). Follows HF
`datasets`' pattern (fingerprinted cache files, `map(num_proc=...)`, memory-mapped Arrow), with plain numpy
arrays: a token table needs only flat int32/uint8 columns and offsets, and numpy is already a core dependency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from eve_vlm.data.cache_build import MANIFEST, build_cache
from eve_vlm.data.conversations import ConversationEncoder
from eve_vlm.data.llava import (
    ON_BAD_ROW,
    BadRow,
    DataSource,
    apply_weight,
    bad_row_error,
    check_weight,
    image_check_mode,
    source_rng,
)
from eve_vlm.errors import ConfigError, DataError

CACHE_FORMAT = 3  # 3: labels placed from one render through token offsets
MAX_IMAGE_RETRIES = 64
log = logging.getLogger(__name__)


def file_sha256(path: str) -> str:
    """sha256 of a file's contents, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 over the files `tokenizer.save_pretrained` writes (vocabulary, merges, added tokens, chat
    template, special tokens)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(tmp).as_posix().encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def encoder_versions() -> dict[str, str]:
    """The versions of the code that encodes rows: eve_vlm, transformers (chat templates, tokenizer
    classes) and tokenizers. An upgrade of any of them builds a new cache."""
    import tokenizers
    import transformers

    import eve_vlm

    return {
        "eve_vlm": eve_vlm.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def cache_key(sources: list[DataSource], encoder: ConversationEncoder, check_images: str) -> dict:
    """Everything the cached rows depend on, as a JSON-able dict (written to the manifest).

    Raises:
        DataError: when a data file does not exist.
    """
    files = []
    for source in sources:
        if not os.path.isfile(source.path):
            raise DataError(f"Data file {source.path} does not exist; check the path in the recipe.")
        folder = source.image_folder or os.path.dirname(os.path.abspath(source.path))
        files.append(
            {
                "path": os.path.abspath(source.path),
                "sha256": file_sha256(source.path),
                "image_folder": os.path.abspath(folder),
            }
        )
    return {
        "format": CACHE_FORMAT,
        "versions": encoder_versions(),
        "files": files,
        "check_images": check_images,
        "tokenizer": tokenizer_digest(encoder.tokenizer),
        "template": encoder.template,
        "system_prompt": encoder.system_prompt,
        "max_length": encoder.max_length,
        "image_token": encoder.image_token,
        "image_token_id": encoder.image_token_id,
        "num_image_tokens": encoder.num_image_tokens,
    }


def key_digest(key: dict) -> str:
    """The cache folder name of `key`."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def as_bad_row(bad: dict) -> BadRow:
    """A manifest's skipped-row entry as a `BadRow`."""
    return BadRow(source=bad["source"], line=bad["line"], id=bad["id"], reason=bad["reason"])


class CachedRows:
    """Read-only view of one cache folder; the arrays are memory-mapped on first use (and again after
    unpickling in a worker process, so pickling never copies them)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "manifest": self.manifest, "arrays": {}}

    def column(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self.arrays[name]

    def __len__(self) -> int:
        return self.manifest["rows"]

    def string(self, name: str, k: int) -> str:
        offsets = self.column(f"{name}_offsets")
        return self.column(f"{name}_bytes")[offsets[k] : offsets[k + 1]].tobytes().decode()

    def example(self, k: int) -> dict:
        """Row `k`: `input_ids` (int32, one placeholder per image: `compact` for `EveCollator`), `labels`,
        `image` (path or None)."""
        a, b = self.column("offsets")[k : k + 2]
        ids = np.array(self.column("tokens")[a:b])
        labels = np.where(self.column("label_mask")[a:b].astype(bool), ids, -100).astype(np.int32)
        image = self.string("image", k) if self.column("has_image")[k] else None
        return {"input_ids": ids, "labels": labels, "image": image, "compact": True}

    def where(self, k: int) -> str:
        """`file, line N, row id 'x'` of row `k`."""
        source = self.manifest["key"]["files"][int(self.column("source")[k])]["path"]
        return f"{source}, line {int(self.column('line')[k])}, row id {self.string('id', k)!r}"

    @property
    def skipped(self) -> list[BadRow]:
        """Every row the build skipped, in data order."""
        return [as_bad_row(bad) for bad in self.manifest["skipped"]]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


class CachedDataset(Dataset):
    """The training rows of a cache, weighted and ready for `EveCollator` (which expands the placeholders).

    Args:
        rows: The cache.
        indices: Cache row of each example (a weighted source repeats or subsets its rows here).
        image_loader: Maps a list of image paths to `pixel_values` `(N, 3, H, W)`; when given, each example
            carries its own `pixel_values` `(3, H, W)` and a bad image is handled here (see `on_bad_row`).
        on_bad_row: For an image that fails to load: "raise" a `DataError` naming the file, row and image;
            "skip" logs it and returns the next image row instead, with `bad_images` counting the skipped.
        skipped: The bad rows to report (default: every row the build skipped).
    """

    def __init__(
        self,
        rows: CachedRows,
        indices: np.ndarray,
        *,
        image_loader: Callable[[list[str]], torch.Tensor] | None = None,
        on_bad_row: str = "raise",
        skipped: list[BadRow] | None = None,
    ):
        if on_bad_row not in ON_BAD_ROW:
            raise ConfigError(f"on_bad_row={on_bad_row!r}; use one of {ON_BAD_ROW}")
        self.rows = rows
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_loader = image_loader
        self.on_bad_row = on_bad_row
        self.skipped = rows.skipped if skipped is None else skipped

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def lengths(self) -> list[int]:
        """Token count of each example, image placeholders expanded."""
        return self.rows.column("lengths")[self.indices].tolist()

    @property
    def is_image(self) -> list[bool]:
        """Whether each example has an image."""
        return self.rows.column("has_image")[self.indices].tolist()

    def drop_text_only(self) -> int:
        """Removes the examples without an image; returns how many were removed."""
        before = len(self.indices)
        self.indices = self.indices[self.rows.column("has_image")[self.indices]]
        return before - len(self.indices)

    def __getitem__(self, index: int) -> dict:
        k = int(self.indices[index])
        if self.image_loader is None or not self.rows.column("has_image")[k]:
            return self.rows.example(k)
        bad = 0
        for step in range(min(MAX_IMAGE_RETRIES, len(self.indices))):
            k = int(self.indices[(index + step) % len(self.indices)])
            if not self.rows.column("has_image")[k]:
                continue
            example = self.rows.example(k)
            try:
                example["pixel_values"] = self.image_loader([example["image"]])[0]
            except Exception as e:  # PIL raises many types for a bad file
                message = f"{self.rows.where(k)}: image {example['image']} cannot be loaded ({type(e).__name__}: {e})"
                if self.on_bad_row == "raise":
                    raise DataError(
                        f"{message}. The default data.check_images: exists checks only that image files "
                        "exist, so a corrupt one is found when training reaches it. Fix or remove the image; "
                        "set data.check_images: decode to find every bad image before training, or "
                        "data.on_bad_row: skip to skip such rows and count them."
                    ) from e
                log.warning("skipping a row with a bad image: %s", message)
                bad += 1
                continue
            example["bad_images"] = bad
            return example
        raise DataError(
            f"{bad} image rows in a row from example {index} of {self.rows.folder} fail to load; check the "
            "image folder (data.check_images: decode lists every bad image before training)."
        )


def weighted_indices(
    rows: CachedRows, sources: list[DataSource], seed: int
) -> tuple[np.ndarray, list[BadRow]]:
    """Cache row of each example, and the bad rows to report, picked exactly as `load_rows` followed by
    `LlavaDataset` pick them: each source's weight is applied to its rows that parse (those that then fail
    to encode included, in file order, with the same generator), and the rows that fail to encode are
    dropped afterwards; such a row is reported only when the weight picked it, a row that does not parse
    always."""
    counts = rows.manifest["rows_per_source"]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    lines = rows.column("line")
    entries = rows.manifest["skipped"]
    out, failed_to_encode = [], []
    for index, source in enumerate(sources):
        check_weight(source)
        # (line, cache row or -1 - position in the manifest's skipped list)
        parsed = [(int(lines[k]), k) for k in range(starts[index], starts[index + 1])]
        parsed += [
            (bad["line"], -1 - n)
            for n, bad in enumerate(entries)
            if bad["source_index"] == index and bad["step"] == "encode"
        ]
        parsed.sort()
        picked = apply_weight([k for _, k in parsed], source.weight, source_rng(seed, index, source))
        out += [k for k in picked if k >= 0]
        failed_to_encode += sorted({-1 - k for k in picked if k < 0})
    skipped = [as_bad_row(bad) for bad in entries if bad["step"] == "parse"]
    skipped += [as_bad_row(entries[n]) for n in failed_to_encode]
    return np.asarray(out, dtype=np.int64), skipped


@dataclass
class PreparedData:
    """A prepared data set and how it was obtained."""

    dataset: CachedDataset
    folder: Path
    built: bool
    seconds: float


def prepare_cache(
    sources: list[DataSource],
    encoder: ConversationEncoder,
    *,
    cache_dir: str | os.PathLike,
    check_images: str = "exists",
    on_bad_row: str = "raise",
    seed: int = 0,
    num_proc: int = 1,
    image_loader: Callable[[list[str]], torch.Tensor] | None = None,
    log_line: Callable[[str], None] = print,
    build: bool = True,
) -> PreparedData:
    """The cached, weighted data set of `sources`: read from `cache_dir` when a cache with the same key is
    there, else built into it first.

    Args:
        build: False in a process that waited for the main process to prepare the cache: it never builds,
            and a cache that is not there means the main process failed.

    Raises:
        DataError: for a missing or unparsable data file, or (on_bad_row="raise") the first bad row, naming
            the file, line and row id; also when a cache built with `skip` holds bad rows, and (with
            `build=False`) when the cache is not there.
        ConfigError: for an unknown `check_images` or `on_bad_row`, a bad weight or `num_proc` < 1.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row={on_bad_row!r}; use one of {ON_BAD_ROW}")
    if num_proc < 1:
        raise ConfigError(f"num_proc={num_proc} must be >= 1")
    for source in sources:
        check_weight(source)
    start = time.time()
    key = cache_key(sources, encoder, image_check_mode(check_images))
    folder = Path(cache_dir) / key_digest(key)
    built = not (folder / MANIFEST).is_file()
    if built and not build:
        raise DataError(
            f"The main process failed to prepare the data cache {folder} (see its error above); this "
            "process waited for it and does not build it again."
        )
    if built:
        build_cache(
            folder, key, sources, encoder, on_bad_row=on_bad_row, num_proc=num_proc, log_line=log_line
        )
    else:
        log_line(f"data cache: reading {folder}")
    rows = CachedRows(folder)
    if rows.manifest["key"] != key:
        raise DataError(f"{folder}/{MANIFEST} does not match its folder name; delete {folder} to rebuild it.")
    if on_bad_row == "raise" and rows.skipped:
        raise bad_row_error(rows.skipped[0])
    indices, skipped = weighted_indices(rows, sources, seed)
    dataset = CachedDataset(rows, indices, image_loader=image_loader, on_bad_row=on_bad_row, skipped=skipped)
    return PreparedData(dataset=dataset, folder=folder, built=built, seconds=time.time() - start)
