"""Building the data cache (see `eve_vlm/data/cache.py`): rows parsed, checked and encoded in `num_proc`
forked processes, each on a contiguous share, merged into the `.npy` columns and `manifest.json` of a
temporary folder, flushed to disk and renamed into place; what a killed build left is removed first."""

from __future__ import annotations

import dataclasses
import json
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
from tqdm.auto import tqdm

from eve_vlm.data.conversations import ConversationEncoder, row_where
from eve_vlm.data.llava import (
    BadRow,
    DataSource,
    bad_row_error,
    parse_row,
    read_records,
    row_id,
)
from eve_vlm.errors import ConfigError, DataError

MANIFEST = "manifest.json"
STRINGS = ("image", "id")
BUILDING = ".building-"  # in the name of a folder being built: .<key>.building-<host>-<pid>-<random>
STALE_BUILD_HOURS = 24
PROGRESS_EVERY = 64


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
