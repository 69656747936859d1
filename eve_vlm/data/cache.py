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

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from eve_vlm.data.conversations import ConversationEncoder, row_where
from eve_vlm.data.llava import (
    ON_BAD_ROW,
    BadRow,
    DataSource,
    apply_weight,
    bad_row_error,
    check_weight,
    image_check_mode,
    parse_row,
    read_records,
    row_id,
    source_rng,
)
from eve_vlm.errors import ConfigError, DataError

CACHE_FORMAT = 3  # 3: labels placed from one render through token offsets
MANIFEST = "manifest.json"
COLUMNS = ("tokens", "label_mask", "offsets", "lengths", "has_image", "source", "line")
STRINGS = ("image", "id")
MAX_IMAGE_RETRIES = 64
BUILDING = ".building-"  # in the name of a folder being built: .<key>.building-<host>-<pid>-<random>
STALE_BUILD_HOURS = 24
PROGRESS_EVERY = 64
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


@dataclass
class Shard:
    """The rows one build process handles: `tasks[start:end]`, with its output folder."""

    start: int
    end: int
    folder: Path


@dataclass
class BuildJob:
    """What every build process needs (shared with forked processes without pickling)."""

    sources: list[DataSource]
    tasks: list[tuple[int, int, object, str | None]]  # (source index, line, record, parse error)
    encoder: ConversationEncoder
    check_images: str
    on_bad_row: str


def encode_shard(job: BuildJob, shard: Shard, progress: Callable[[int], None], stop: Callable[[], bool]):
    """Parses, checks and encodes `job.tasks[shard.start:shard.end]` into `shard.folder`: `tokens.bin` and
    `label_mask.bin` (raw int32 / uint8), `rows.npz` (per-row columns), `strings.json` and `bad.json` (the
    skipped rows, or with `on_bad_row="raise"` the first bad one as `error`)."""
    shard.folder.mkdir(parents=True)
    columns = {"sizes": [], "lengths": [], "has_image": [], "source": [], "line": []}
    strings = {"image": [], "id": []}
    bad, error, done = [], None, 0
    with (
        open(shard.folder / "tokens.bin", "wb") as tokens,
        open(shard.folder / "label_mask.bin", "wb") as mask,
    ):
        for k in range(shard.start, shard.end):
            index, line, record, parse_error = job.tasks[k]
            source = job.sources[index]
            step = "parse"
            try:
                if parse_error is not None:
                    raise ValueError(parse_error)
                row = parse_row(record, line, source, job.check_images)
                step = "encode"
                try:
                    ex = job.encoder.encode_compact(row)
                except DataError as e:
                    raise ValueError(str(e).removeprefix(f"{row_where(row)}: ").removesuffix(".")) from e
                except Exception as e:  # e.g. jinja2's TemplateError from a template's raise_exception
                    raise ValueError(f"the row does not render or tokenise ({type(e).__name__}: {e})") from e
            except ValueError as e:
                item = BadRow(source=source.path, line=line, id=row_id(record, source, line), reason=str(e))
                if job.on_bad_row == "raise":
                    error = dataclasses.asdict(item)
                    break
                bad.append({**dataclasses.asdict(item), "source_index": index, "step": step})
            else:
                ids = np.asarray(ex.input_ids, dtype=np.int32)
                labels = np.asarray(ex.labels, dtype=np.int64)
                assert np.all((labels == ids) | (labels == -100)), "labels are ids or -100"
                tokens.write(ids.tobytes())
                mask.write((labels == ids).astype(np.uint8).tobytes())
                columns["sizes"].append(len(ids))
                columns["lengths"].append(ex.length)
                columns["has_image"].append(row.image is not None)
                columns["source"].append(index)
                columns["line"].append(line)
                strings["image"].append(row.image or "")
                strings["id"].append(row.id)
            done += 1
            if done % PROGRESS_EVERY == 0:
                progress(PROGRESS_EVERY)
                if stop():
                    break
    progress(done % PROGRESS_EVERY)
    np.savez(shard.folder / "rows.npz", **{k: np.asarray(v, dtype=np.int64) for k, v in columns.items()})
    (shard.folder / "strings.json").write_text(json.dumps(strings))
    (shard.folder / "bad.json").write_text(json.dumps({"skipped": bad, "error": error}))


def run_shards(job: BuildJob, shards: list[Shard], bar: tqdm) -> None:
    """Runs `encode_shard` on every shard: in this process for one shard, else one forked process each."""
    if len(shards) == 1 or "fork" not in multiprocessing.get_all_start_methods():
        for shard in shards:
            encode_shard(job, shard, bar.update, lambda: False)
        return
    ctx = multiprocessing.get_context("fork")
    counter, stop = ctx.Value("q", 0), ctx.Event()

    def add(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    def target(shard: Shard) -> None:
        encode_shard(job, shard, add, stop.is_set)
        if json.loads((shard.folder / "bad.json").read_text())["error"] is not None:
            stop.set()  # on_bad_row="raise": the others need not finish

    procs = [ctx.Process(target=target, args=(shard,), daemon=True) for shard in shards]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(0.2)
            bar.update(counter.value - bar.n)
        bar.update(counter.value - bar.n)
    finally:
        for p in procs:
            p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise DataError(
            f"{len(failed)} data-cache build process(es) died (exit codes {failed}; -9 is usually the "
            "out-of-memory killer); see the output above, or set data.num_proc: 1 to build in this process."
        )


def write_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(array))


def fsync_folder(folder: Path, *, files: bool = True) -> None:
    """Flushes the folder's entries, and (with `files`) the files directly in it, to disk."""
    for path in folder.iterdir() if files else ():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(cache_dir: Path, log_line: Callable[[str], None]) -> None:
    """Removes the folders of builds that were killed (SIGKILL, out of memory, a lost node): those whose
    process on this host is gone, and any older than `STALE_BUILD_HOURS`."""
    host = socket.gethostname().replace("-", "_")
    for path in cache_dir.glob(f".*{BUILDING}*"):
        owner = path.name.split(BUILDING, 1)[1].rsplit("-", 2)
        try:
            age_hours = (time.time() - path.stat().st_mtime) / 3600
        except FileNotFoundError:
            continue
        gone = len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not pid_alive(int(owner[1]))
        if gone or age_hours > STALE_BUILD_HOURS:
            log_line(f"data cache: removing {path}, left by a build that did not finish")
            shutil.rmtree(path, ignore_errors=True)


def merge_shards(shards: list[Shard], out: Path) -> tuple[int, list[dict]]:
    """Concatenates the shards into the cache columns in `out`; returns the row count and skipped rows.

    Raises:
        DataError: the first bad row (in data order) of a build under `on_bad_row="raise"`.
    """
    skipped = []
    for shard in shards:
        bad = json.loads((shard.folder / "bad.json").read_text())
        if bad["error"] is not None:
            raise bad_row_error(BadRow(**bad["error"]))
        skipped += bad["skipped"]
    rows = [dict(np.load(shard.folder / "rows.npz")) for shard in shards]
    sizes = np.concatenate([r["sizes"] for r in rows])
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    for name, dtype in (("tokens", np.int32), ("label_mask", np.uint8)):
        target = np.lib.format.open_memmap(
            out / f"{name}.npy", mode="w+", dtype=dtype, shape=(int(offsets[-1]),)
        )
        at = 0
        for shard in shards:
            part = np.fromfile(shard.folder / f"{name}.bin", dtype=dtype)
            target[at : at + len(part)] = part
            at += len(part)
        target.flush()
        del target
    write_npy(out / "offsets.npy", offsets)
    write_npy(out / "lengths.npy", np.concatenate([r["lengths"] for r in rows]).astype(np.int32))
    write_npy(out / "has_image.npy", np.concatenate([r["has_image"] for r in rows]).astype(bool))
    write_npy(out / "source.npy", np.concatenate([r["source"] for r in rows]).astype(np.int32))
    write_npy(out / "line.npy", np.concatenate([r["line"] for r in rows]).astype(np.int32))
    for name in STRINGS:
        values = [
            s for shard in shards for s in json.loads((shard.folder / "strings.json").read_text())[name]
        ]
        encoded = [v.encode() for v in values]
        string_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=string_offsets[1:])
        write_npy(out / f"{name}_bytes.npy", np.frombuffer(b"".join(encoded), dtype=np.uint8))
        write_npy(out / f"{name}_offsets.npy", string_offsets)
    return len(sizes), skipped


def build_cache(
    folder: Path,
    key: dict,
    sources: list[DataSource],
    encoder: ConversationEncoder,
    *,
    on_bad_row: str,
    num_proc: int,
    log_line: Callable[[str], None],
) -> None:
    """Builds the cache of `key` into `folder` (under a temporary name, renamed into place when complete).

    Raises:
        DataError: for a missing or unparsable data file, or (on_bad_row="raise") the first bad row.
    """
    start = time.time()
    tasks = []
    for index, source in enumerate(sources):
        tasks += [(index, line, record, err) for line, record, err in read_records(source.path)]
    job = BuildJob(sources, tasks, encoder, key["check_images"], on_bad_row)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(folder.parent, log_line)
        owner = f"{socket.gethostname().replace('-', '_')}-{os.getpid()}-"
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}{BUILDING}{owner}"))
    except OSError as e:
        raise ConfigError(
            f"The data cache folder {folder.parent} cannot be written ({e.strerror}); set data.cache_dir in "
            "the recipe to a writable folder (default: $EVE_HOME/data-cache)."
        ) from e
    try:
        count = max(1, min(num_proc, len(tasks) // PROGRESS_EVERY or 1))
        bounds = np.linspace(0, len(tasks), count + 1).astype(int)
        shards = [
            Shard(int(a), int(b), tmp / "shards" / f"{k:03d}") for k, (a, b) in enumerate(pairwise(bounds))
        ]
        log_line(f"data cache: encoding {len(tasks)} rows with {count} process(es) into {folder}")
        with tqdm(total=len(tasks), desc="encoding rows", unit="row", mininterval=1.0) as bar:
            run_shards(job, shards, bar)
        rows, skipped = merge_shards(shards, tmp)
        shutil.rmtree(tmp / "shards")
        manifest = {
            "key": key,
            "rows": rows,
            "rows_per_source": np.bincount(np.load(tmp / "source.npy"), minlength=len(sources)).tolist(),
            "skipped": skipped,
            "build_seconds": round(time.time() - start, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        fsync_folder(tmp)  # the arrays and manifest are on disk before the folder gets its final name
        try:
            os.rename(tmp, folder)
            fsync_folder(folder.parent, files=False)
        except OSError:
            if not (folder / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
