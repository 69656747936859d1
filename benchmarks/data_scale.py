"""Data preparation at LLaVA-665k shape: cold and warm data cache, per N rows, extrapolated to 665k.

Writes N LLaVA-665k-shaped rows (1 to 6 question/answer turns, each image row with its own image file,
about 6% text-only rows as ShareGPT's are in 665k) into `--workdir`, then for each N runs two fresh
processes, each playing one rank, after a third that prepares without the cache (in-memory: `load_rows` +
`LlavaDataset` in the one process, as every rank did before the cache; the comparison): the first on an
empty cache folder (cold: parse, check images, render,
tokenise, write), the second on the cache the first wrote (warm). Each prints one JSON line: seconds to
prepare, rows/s, resident memory added by preparing (`VmRSS` after minus before, the tokenizer already
loaded), cache size, and seconds to the first batch (preparation + the length-grouped sampler's first
order + collating the first batch with its images: the data side of the first step). A last JSON line per
N extrapolates linearly to 665,298 rows.

    python benchmarks/data_scale.py --n 20000 100000
    python benchmarks/data_scale.py --n 2000 --num-proc 2     # a quick check

Needs the SmolLM2 tokenizer (`eve prepare`, or `--tokenizer FOLDER`). Timing is the machine's: run nothing
else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAVA_665K = 665_298
WORDS = [
    "the",
    "a",
    "of",
    "in",
    "on",
    "what",
    "is",
    "this",
    "picture",
    "image",
    "person",
    "man",
    "woman",
    "there",
    "are",
    "two",
    "three",
    "left",
    "right",
    "color",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "table",
    "street",
    "car",
    "dog",
    "cat",
    "sitting",
    "standing",
    "holding",
    "wearing",
    "near",
    "behind",
    "front",
    "describe",
    "detail",
    "scene",
    "background",
    "sign",
    "window",
    "building",
    "tree",
    "sky",
    "water",
    "people",
    "looking",
    "how",
    "many",
    "where",
]


def write_rows(folder: Path, n: int, seed: int = 0) -> Path:
    """`n` LLaVA-665k-shaped rows in `folder/train.json`, image files in `folder/images/`."""
    from PIL import Image

    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    template = images / "template.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(template)
    rows = []
    for i in range(n):
        text_only = rng.random() < 0.06
        turns = []
        for t in range(rng.randint(1, 6)):
            question = " ".join(rng.choices(WORDS, k=rng.randint(5, 25))) + "?"
            if t == 0 and not text_only:
                question = "<image>\n" + question
            turns += [
                {"from": "human", "value": question},
                {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(3, 60))) + "."},
            ]
        row = {"id": f"row{i}", "conversations": turns}
        if not text_only:
            row["image"] = f"images/{i:07d}.png"
            shutil.copyfile(template, folder / row["image"])
        rows.append(row)
    path = folder / "train.json"
    path.write_text(json.dumps(rows))
    return path


IN_MEMORY = "in-memory"  # the --rank cache folder that selects the path without the cache


def rss_mib() -> float:
    """Resident memory of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_memory_rank(data: Path, tokenizer_dir: str, check_images: str) -> dict:
    """One rank without the cache, as before it: every row checked and encoded in this process, kept as
    Python lists with the image tokens expanded (`load_rows` + `LlavaDataset`, the in-memory reference)."""
    from transformers import AutoTokenizer

    from eve_vlm.data.collator import LlavaDataset
    from eve_vlm.data.conversations import ConversationEncoder
    from eve_vlm.data.llava import DataSource, load_rows

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    encoder = ConversationEncoder(
        tokenizer,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_image_tokens=576,
        template="chat",
        max_length=2048,
    )
    before = rss_mib()
    start = time.perf_counter()
    loaded = load_rows([DataSource(str(data))], check_images=check_images, on_bad_row="skip")
    dataset = LlavaDataset(loaded.rows, encoder, on_bad_row="skip")
    prepare_s = time.perf_counter() - start
    return {
        "rows": len(dataset.examples),
        "prepare_s": round(prepare_s, 2),
        "rows_per_s": round(len(loaded.rows) / prepare_s, 1),
        "rss_added_mib": round(rss_mib() - before, 1),
    }


def rank(data: Path, cache_dir: Path, tokenizer_dir: str, num_proc: int, check_images: str) -> dict:
    """One rank: prepare (or read) the cache, then collate the first batch of the sampler's order."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoTokenizer

    from eve_vlm.data.cache import prepare_cache
    from eve_vlm.data.collator import EveCollator, ModalityLengthGroupedSampler
    from eve_vlm.data.conversations import ConversationEncoder
    from eve_vlm.data.llava import DataSource

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    encoder = ConversationEncoder(
        tokenizer, image_token_id=image_id, num_image_tokens=576, template="chat", max_length=2048
    )

    def load_images(paths):
        out = []
        for path in paths:
            with Image.open(path) as im:
                out.append(torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1))
        return torch.stack(out).float()

    before = rss_mib()
    start = time.perf_counter()
    prepared = prepare_cache(
        [DataSource(str(data))],
        encoder,
        cache_dir=cache_dir,
        check_images=check_images,
        on_bad_row="skip",
        num_proc=num_proc,
        image_loader=load_images,
        log_line=lambda line: None,
    )
    prepare_s = time.perf_counter() - start
    dataset = prepared.dataset
    sampler = ModalityLengthGroupedSampler(dataset.lengths, dataset.is_image, batch_size=4)
    first = list(next(iter(torch.utils.data.BatchSampler(sampler, 4, drop_last=False))))
    EveCollator(0, load_images, image_token_id=image_id, num_image_tokens=576)([dataset[i] for i in first])
    first_batch_s = time.perf_counter() - start
    return {
        "built": prepared.built,
        "rows": len(dataset),
        "skipped": len(dataset.skipped),
        "prepare_s": round(prepare_s, 2),
        "rows_per_s": round((len(dataset) + len(dataset.skipped)) / prepare_s, 1),
        "rss_added_mib": round(rss_mib() - before, 1),
        "cache_mib": round(dataset.rows.size_bytes() / 2**20, 1),
        "first_batch_s": round(first_batch_s, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[20_000, 100_000], help="row counts")
    parser.add_argument("--num-proc", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--check-images", default="exists", choices=["none", "exists", "decode"])
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the prepared SmolLM2)")
    parser.add_argument(
        "--workdir", default=None, help="where rows, images and caches go (default: a temp dir)"
    )
    parser.add_argument("--rank", nargs=2, metavar=("DATA", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokenizer is None:
        from eve_vlm.assets import asset_paths

        args.tokenizer = str(asset_paths()["llm"])
        if not Path(args.tokenizer, "tokenizer.json").is_file():
            sys.exit(f"no tokenizer at {args.tokenizer}: run `eve prepare` or pass --tokenizer FOLDER")
    if args.rank:
        data, cache_dir = Path(args.rank[0]), args.rank[1]
        if cache_dir == IN_MEMORY:
            result = in_memory_rank(data, args.tokenizer, args.check_images)
        else:
            result = rank(data, Path(cache_dir), args.tokenizer, args.num_proc, args.check_images)
        print(json.dumps(result))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="eve-data-scale-"))
    for n in args.n:
        folder = work / f"n{n}"
        shutil.rmtree(folder, ignore_errors=True)
        data = write_rows(folder, n)
        results = {}
        for phase in ("in_memory", "cold", "warm"):
            cmd = [
                sys.executable,
                __file__,
                "--rank",
                str(data),
                IN_MEMORY if phase == "in_memory" else str(folder / "cache"),
                "--tokenizer",
                args.tokenizer,
            ]
            cmd += ["--num-proc", str(args.num_proc), "--check-images", args.check_images]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps({"n": n, "phase": phase, "num_proc": args.num_proc, **results[phase]}))
        scale = LLAVA_665K / n
        print(
            json.dumps(
                {
                    "n": n,
                    "extrapolated_to": LLAVA_665K,
                    "in_memory_prepare_min": round(results["in_memory"]["prepare_s"] * scale / 60, 1),
                    "in_memory_rss_added_mib": round(results["in_memory"]["rss_added_mib"] * scale, 0),
                    "cold_prepare_min": round(results["cold"]["prepare_s"] * scale / 60, 1),
                    "warm_first_batch_s": round(results["warm"]["first_batch_s"] * scale, 1),
                    "cold_rss_added_mib": round(results["cold"]["rss_added_mib"] * scale, 0),
                    "warm_rss_added_mib": round(results["warm"]["rss_added_mib"] * scale, 0),
                    "cache_gib": round(results["cold"]["cache_mib"] * scale / 1024, 2),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                }
            )
        )
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
