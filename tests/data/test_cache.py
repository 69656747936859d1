"""The data cache: the cached path gives the same examples as encoding on the fly (chat, plain, truncating
rows, one or two build processes); what invalidates it and what does not; atomic builds; bad rows and bad
images under `raise` and `skip`; pickling without copying the arrays."""

import json
import os
import pickle
import random
import socket
import subprocess
import time

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from conftest import CHATML, tiny_tokenizer
from PIL import Image
from torch.utils.data import DataLoader

import eve_vlm
from eve_vlm.data import ConversationEncoder, DataSource, EveCollator, LlavaDataset, load_rows
from eve_vlm.data.cache import CachedRows, key_digest, prepare_cache
from eve_vlm.errors import ConfigError, DataError, user_message

N_IMG = 4
WORDS = ["what", "is", "the", "colour", "of", "shape", "a", "red", "blue", "circle", "square", "yes", "no"]


def tokenizer(extra_tokens=()):
    tok = tiny_tokenizer()
    tok.add_tokens(["<image>", *extra_tokens], special_tokens=True)
    return tok


def encoder(tok=None, **kwargs):
    tok = tok or tokenizer()
    options = {"num_image_tokens": N_IMG, "max_length": 24, **kwargs}
    return ConversationEncoder(tok, image_token_id=tok.convert_tokens_to_ids("<image>"), **options)


def write_rows(folder, n=40, seed=0, corrupt=()):
    """`n` LLaVA rows: image rows with 1-2 turns, text-only rows, and long rows that truncate at max_length."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        turns = []
        for t in range(rng.choice([1, 2])):
            length = rng.choice([3, 6, 30])  # 30 words overflows max_length=24
            turns += [
                {
                    "from": "human",
                    "value": ("<image>\n" if t == 0 and i % 3 else "")
                    + " ".join(rng.choices(WORDS, k=length)),
                },
                {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.choice([1, 4, 25])))},
            ]
        row = {"id": f"r{i}", "conversations": turns}
        if i % 3:
            row["image"] = f"{i}.png"
            if i in corrupt:
                (folder / "images" / f"{i}.png").write_bytes(b"\x89PNG not an image")
            else:
                Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / "images" / f"{i}.png")
        rows.append(row)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSource(str(path), image_folder=str(folder / "images"))


def prepare(tmp_path, sources, enc, **kwargs):
    options = {"cache_dir": tmp_path / "cache", "on_bad_row": "skip", "log_line": lambda line: None, **kwargs}
    return prepare_cache(sources, enc, **options)


def collate(dataset, collator):
    return [collator([dataset[i]]) for i in range(len(dataset))]


@pytest.mark.parametrize(
    ("template", "num_proc", "n"), [("chat", 1, 40), ("plain", 1, 40), ("chat", 2, 160)], ids=str
)
def test_cached_examples_equal_encoding_on_the_fly(tmp_path, template, num_proc, n):
    source = write_rows(tmp_path, n=n)
    enc = encoder(template=template, system_prompt="a" if template == "chat" else None)
    rows = load_rows([source], on_bad_row="skip").rows
    fly = LlavaDataset(rows, enc, on_bad_row="skip")
    cached = prepare(tmp_path, [source], enc, num_proc=num_proc).dataset
    assert len(fly) == len(cached) > n // 2
    truncated = [ex for ex in fly.examples if len(ex.input_ids) == enc.max_length]
    assert truncated and any(ex.image for ex in truncated)  # truncation is exercised, with images
    assert [bad.line for bad in cached.skipped] == [bad.line for bad in fly.skipped]
    assert cached.lengths == fly.lengths and cached.is_image == fly.is_image
    image_id = enc.image_token_id
    expand = EveCollator(
        0, lambda paths: torch.zeros(len(paths), 3, 2, 2), image_token_id=image_id, num_image_tokens=N_IMG
    )
    for k in range(len(fly)):
        want = fly.examples[k]
        got = cached[k]
        assert got["input_ids"].dtype == np.int32 and list(got["input_ids"]).count(image_id) == (
            1 if want.image else 0
        )
        assert got["image"] == want.image
        batch = expand([got])
        assert batch["input_ids"][0].tolist() == want.input_ids, want.id
        assert batch["labels"][0].tolist() == want.labels, want.id


def test_two_build_processes_write_the_same_cache_as_one(tmp_path):
    source = write_rows(tmp_path, n=160, corrupt={4})
    one = prepare(tmp_path / "a", [source], encoder(), num_proc=1, check_images="decode").dataset.rows
    two = prepare(tmp_path / "b", [source], encoder(), num_proc=2, check_images="decode").dataset.rows
    for name in (
        "tokens",
        "label_mask",
        "offsets",
        "lengths",
        "has_image",
        "line",
        "image_bytes",
        "id_bytes",
    ):
        assert np.array_equal(one.column(name), two.column(name)), name
    assert one.manifest["skipped"] == two.manifest["skipped"] and len(one.skipped) > 0


def cache_folder(tmp_path, sources, enc, **kwargs):
    prepared = prepare(tmp_path, sources, enc, **kwargs)
    return prepared.folder, prepared.built


def test_changing_what_encoding_depends_on_invalidates_the_cache(tmp_path):
    source = write_rows(tmp_path, n=12)
    first, built = cache_folder(tmp_path, [source], encoder())
    assert built
    again, built = cache_folder(tmp_path, [source], encoder())
    assert (again, built) == (first, False)
    variants = {
        "tokenizer": encoder(tokenizer(extra_tokens=["<new>"])),
        "template": encoder(template="plain"),
        "system prompt": encoder(system_prompt="a"),
        "max length": encoder(max_length=25),
        "image-token count": encoder(num_image_tokens=N_IMG + 1),
    }
    folders = {first}
    for name, enc in variants.items():
        folder, built = cache_folder(tmp_path, [source], enc)
        assert built and folder not in folders, name
        folders.add(folder)
    folder, built = cache_folder(tmp_path, [source], encoder(), check_images="decode")
    assert built and folder not in folders
    folders.add(folder)
    key = CachedRows(first).manifest["key"]
    assert key["versions"] == {
        "eve_vlm": eve_vlm.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    for package in key["versions"]:  # an upgrade of the encoding code gives another folder
        upgraded = {**key, "versions": {**key["versions"], package: "99.0"}}
        assert key_digest(upgraded) != first.name
    path = tmp_path / "train.jsonl"
    path.write_text(path.read_text().replace("what", "is", 1))
    folder, built = cache_folder(tmp_path, [source], encoder())
    assert built and folder not in folders  # a data file's contents changed


def test_weights_and_seed_reuse_the_cache_and_pick_rows_like_load_rows(tmp_path):
    source = write_rows(tmp_path, n=12)
    base = prepare(tmp_path, [source], encoder(max_length=200))  # every row encodes
    assert base.dataset.skipped == []
    for weight, seed in [(2.0, 0), (0.5, 0), (0.5, 3), (1.5, 1)]:
        weighted = DataSource(source.path, source.image_folder, weight)
        prepared = prepare(tmp_path, [weighted], encoder(max_length=200), seed=seed)
        assert (prepared.folder, prepared.built) == (base.folder, False)
        want = [r.id for r in load_rows([weighted], seed=seed).rows]
        got = [prepared.dataset.rows.string("id", k) for k in prepared.dataset.indices]
        assert got == want


@pytest.mark.parametrize(
    ("weight", "seed"), [(0.5, 0), (0.5, 3), (1.0, 0), (1.5, 1), (2.0, 0), (2.7, 2), (0.0, 0)]
)
def test_weighted_rows_and_bad_rows_match_encoding_on_the_fly_when_rows_fail(tmp_path, weight, seed):
    write_rows(tmp_path, n=40)
    (tmp_path / "images" / "5.png").unlink()  # fails parsing (image check); long rows fail encoding
    source = DataSource(str(tmp_path / "train.jsonl"), str(tmp_path / "images"), weight)
    other = DataSource(str(tmp_path / "train.jsonl"), str(tmp_path / "images"), 1.0)
    enc = encoder()
    loaded = load_rows([source, other], on_bad_row="skip", seed=seed, check_images="exists")
    fly = LlavaDataset(loaded.rows, enc, on_bad_row="skip")
    cached = prepare(tmp_path, [source, other], enc, seed=seed).dataset
    assert [ex.id for ex in fly.examples] == [cached.rows.string("id", k) for k in cached.indices]
    assert cached.lengths == fly.lengths
    want_skipped = loaded.skipped + fly.skipped
    assert sum(bad.reason.startswith("image") for bad in want_skipped) == 2 < len(want_skipped)
    assert [(bad.line, bad.id) for bad in cached.skipped] == [(bad.line, bad.id) for bad in want_skipped]


def test_a_failed_build_leaves_nothing_behind_and_names_the_row(tmp_path):
    source = write_rows(tmp_path, n=12)
    (tmp_path / "images" / "5.png").unlink()
    with pytest.raises(DataError, match=r"train\.jsonl, line 6, row id 'r5': image '5\.png' not found"):
        prepare(tmp_path, [source], encoder(max_length=200), on_bad_row="raise")
    assert list((tmp_path / "cache").iterdir()) == []
    built = prepare(tmp_path, [source], encoder(max_length=200))  # skip: builds, records the row
    assert [(bad.line, bad.id) for bad in built.dataset.skipped] == [(6, "r5")]
    warm = prepare(tmp_path, [source], encoder(max_length=200))
    assert not warm.built and [bad.id for bad in warm.dataset.skipped] == ["r5"]
    with pytest.raises(
        DataError, match=r"line 6, row id 'r5': image '5\.png' not found at \S+; check [^.]*\. Fix"
    ):
        prepare(
            tmp_path, [source], encoder(max_length=200), on_bad_row="raise"
        )  # the cached bad row still stops a raise run
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [built.folder.name]


def test_a_process_that_waited_for_the_main_one_never_builds(tmp_path):
    source = write_rows(tmp_path, n=12)
    (tmp_path / "images" / "5.png").unlink()
    with pytest.raises(DataError, match="line 6, row id 'r5'"):  # the main process fails
        prepare(tmp_path, [source], encoder(max_length=200), on_bad_row="raise")
    with pytest.raises(DataError, match=r"main process failed to prepare the data cache .*see its error"):
        prepare(tmp_path, [source], encoder(max_length=200), on_bad_row="raise", build=False)
    assert list((tmp_path / "cache").iterdir()) == []
    built = prepare(tmp_path, [source], encoder(max_length=200))
    read = prepare(tmp_path, [source], encoder(max_length=200), build=False)
    assert not read.built and read.folder == built.folder and len(read.dataset) == len(built.dataset)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_row_the_chat_template_refuses_is_a_bad_row_named_by_file_line_and_id(tmp_path, num_proc):
    rows = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": w}, {"from": "gpt", "value": "yes"}]}
        for i, w in enumerate(["what is it"] * 70 + ["a red circle"] + ["what is it"] * 70)
    ]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tokenizer()
    refuse = "{% for m in messages %}{% if 'circle' in m['content'] %}{{ raise_exception('no circles') }}"
    tok.chat_template = refuse + "{% endif %}{% endfor %}" + CHATML
    enc = encoder(tok, max_length=200)
    with pytest.raises(DataError, match=r"text\.jsonl, line 71, row id 't70': .*TemplateError: no circles"):
        prepare(tmp_path, [DataSource(str(path))], enc, num_proc=num_proc, on_bad_row="raise")
    skipped = prepare(tmp_path, [DataSource(str(path))], enc, num_proc=num_proc).dataset.skipped
    assert [(bad.line, bad.id) for bad in skipped] == [(71, "t70")] and "no circles" in skipped[0].reason


def test_an_unwritable_cache_folder_is_a_config_error_naming_it_and_the_key(tmp_path):
    source = write_rows(tmp_path, n=4)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"a-file/cache cannot be written .*set data\.cache_dir"):
        prepare(tmp_path, [source], encoder(), cache_dir=tmp_path / "a-file" / "cache")


def test_a_bad_image_in_a_loader_worker_reads_as_the_original_message(tmp_path):
    source = write_rows(tmp_path, n=12, corrupt={4})
    enc = encoder(max_length=200)
    dataset = prepare(tmp_path, [source], enc, image_loader=loader, on_bad_row="raise").dataset
    collator = EveCollator(0, loader, image_token_id=enc.image_token_id, num_image_tokens=N_IMG)
    with pytest.raises(DataError) as caught:
        list(DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collator))
    assert "Original Traceback" in str(caught.value)
    message = user_message(caught.value)
    assert message.startswith(str(tmp_path)) and "Traceback" not in message
    assert "line 5, row id 'r4': image" in message and message.endswith("skip such rows and count them.")


def test_a_build_removes_what_killed_builds_left(tmp_path):
    source = write_rows(tmp_path, n=4)
    cache = tmp_path / "cache"
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    left = {
        "dead": cache / f".aaa.building-{host}-{dead.pid}-x1",
        "old": cache / ".bbb.building-elsewhere-1-x2",
        "running": cache / f".ccc.building-{host}-{os.getpid()}-x3",
        "recent": cache / ".ddd.building-elsewhere-1-x4",
    }
    for path in left.values():
        (path / "shards").mkdir(parents=True)
    day_ago = time.time() - 25 * 3600
    os.utime(left["old"], (day_ago, day_ago))
    lines = []
    built = prepare(tmp_path, [source], encoder(), log_line=lines.append)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [built.folder.name, left["running"].name, left["recent"].name]
    )
    assert sum("did not finish" in line for line in lines) == 2


def test_check_images_none_exists_decode(tmp_path):
    source = write_rows(tmp_path, n=12, corrupt={4})
    (tmp_path / "images" / "5.png").unlink()
    skipped = {
        mode: [
            bad.id
            for bad in prepare(tmp_path, [source], encoder(max_length=200), check_images=mode).dataset.skipped
        ]
        for mode in ("none", "exists", "decode")
    }
    assert skipped == {"none": [], "exists": ["r5"], "decode": ["r4", "r5"]}


def loader(paths):
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1))
    return torch.stack(images)


def test_a_bad_image_met_in_training_is_skipped_and_counted_or_stops_naming_file_and_row(tmp_path):
    source = write_rows(tmp_path, n=12, corrupt={4})
    enc = encoder(max_length=200)
    skip = prepare(tmp_path, [source], enc, check_images="exists", image_loader=loader).dataset
    position = [skip.rows.string("id", k) for k in skip.indices].index("r4")
    example = skip[position]
    assert example["image"].endswith("5.png") and example["bad_images"] == 1  # the next image row instead
    assert example["pixel_values"].shape == (3, 8, 8)
    collator = EveCollator(0, loader, image_token_id=enc.image_token_id, num_image_tokens=N_IMG)
    batch = collator([skip[position], skip[position + 1]])
    assert int(batch["num_bad_images"]) == 1 and batch["pixel_values"].shape[0] == batch["input_ids"].shape[0]
    assert "num_bad_images" not in EveCollator(0, loader)([{"input_ids": [1], "labels": [1], "image": None}])

    raising = prepare(
        tmp_path, [source], enc, check_images="exists", image_loader=loader, on_bad_row="raise"
    ).dataset
    with pytest.raises(
        DataError,
        match=r"train\.jsonl, line 5, row id 'r4': image .*4\.png cannot be loaded .*check_images: exists "
        r"checks only .*check_images: decode .*on_bad_row: skip",
    ):
        raising[position]


def test_pickling_the_dataset_does_not_copy_the_arrays(tmp_path):
    source = write_rows(tmp_path, n=40)
    dataset = prepare(tmp_path, [source], encoder()).dataset
    first = dataset[0]
    assert isinstance(dataset.rows.column("tokens"), np.memmap)
    blob = pickle.dumps(dataset)
    assert np.asarray(dataset.rows.column("tokens")).tobytes() not in blob
    copy = pickle.loads(blob)
    assert copy.rows.arrays == {} and np.array_equal(copy[0]["input_ids"], first["input_ids"])


def test_cache_size_and_rows(tmp_path):
    source = write_rows(tmp_path, n=12)
    prepared = prepare(tmp_path, [source], encoder())
    rows = CachedRows(prepared.folder)
    assert len(rows) == len(prepared.dataset) and rows.size_bytes() > rows.column("tokens").nbytes
