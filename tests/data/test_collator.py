"""Collator padding and pixel_values, the modality-grouped sampler (single-modality chunks, coverage,
determinism, DDP), and the dataset end to end from a JSONL file."""

import json

import pytest
import torch
from conftest import tiny_tokenizer
from PIL import Image
from torch.utils.data import DataLoader

from eve_vlm.data import (
    IGNORE_INDEX,
    ConversationEncoder,
    DataSource,
    EveCollator,
    LlavaDataset,
    ModalityLengthGroupedSampler,
    load_rows,
)
from eve_vlm.errors import ConfigError, DataError


class FakeImageLoader:
    """Records the paths it is given and returns one zero image per path."""

    def __init__(self):
        self.calls = []

    def __call__(self, paths):
        self.calls.append(list(paths))
        return torch.zeros(len(paths), 3, 8, 8)


def test_collator_pads_and_loads_only_image_rows():
    loader = FakeImageLoader()
    batch = EveCollator(pad_token_id=0, image_loader=loader)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "image": "/a.png"},
            {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "image": None},
            {"input_ids": [9, 10], "labels": [-100, 10], "image": "/b.png"},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 10, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert loader.calls == [["/a.png", "/b.png"]] and batch["pixel_values"].shape == (2, 3, 8, 8)

    text_only = EveCollator(pad_token_id=0, image_loader=loader)(
        [{"input_ids": [1], "labels": [1], "image": None}]
    )
    assert "pixel_values" not in text_only and len(loader.calls) == 1


def chunks_of(order, size):
    return [order[k : k + size] for k in range(0, len(order), size)]


@pytest.mark.parametrize(("batch_size", "world_size"), [(1, 1), (3, 1), (2, 2), (4, 2)])
def test_sampler_chunks_are_single_modality_sorted_and_cover_everything(batch_size, world_size):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 100, (23,), generator=g).tolist()
    is_image = (torch.rand(23, generator=g) < 0.6).tolist()
    sampler = ModalityLengthGroupedSampler(lengths, is_image, batch_size, world_size=world_size, seed=1)
    order = list(sampler)

    assert len(order) == len(sampler) and len(order) % (batch_size * world_size) == 0
    assert set(order) == set(range(23))
    assert len(order) < 23 + 2 * batch_size * world_size  # padding is less than a megabatch per modality
    for megabatch in chunks_of(order, batch_size * world_size):  # one optimizer step across all processes
        assert len({is_image[i] for i in megabatch}) == 1
        assert [lengths[i] for i in megabatch] == sorted((lengths[i] for i in megabatch), reverse=True)
    for rank in range(world_size):  # what accelerate hands each process: chunks rank, rank + world_size, ...
        for chunk in chunks_of(order, batch_size)[rank::world_size]:
            assert len(chunk) == batch_size and len({is_image[i] for i in chunk}) == 1


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths, is_image = list(range(40)), [i % 3 == 0 for i in range(40)]

    def order(seed, epoch):
        sampler = ModalityLengthGroupedSampler(lengths, is_image, batch_size=2, world_size=2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0) and order(0, 3) == order(0, 3)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(7, 0)
    assert sorted(set(order(0, 1))) == list(range(40))


def test_sampler_with_one_modality_and_bad_arguments():
    order = list(ModalityLengthGroupedSampler([3, 1, 2], [False] * 3, batch_size=2))
    assert len(order) == 4 and set(order) == {0, 1, 2}  # one row repeated to fill the last batch
    with pytest.raises(ValueError, match="is_image"):
        ModalityLengthGroupedSampler([1, 2], [True], batch_size=1)


def write_data(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [
        {
            "id": "img",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "what is this"},
                {"from": "gpt", "value": "a red circle"},
            ],
        },
        {
            "id": "txt",
            "conversations": [
                {"from": "human", "value": "what is red"},
                {"from": "gpt", "value": "a colour"},
            ],
        },
        {
            "id": "long",
            "conversations": [{"from": "human", "value": "what " * 30}, {"from": "gpt", "value": "yes"}],
        },
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_encoder(**kwargs):
    tok = tiny_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    return ConversationEncoder(
        tok, image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=4, **kwargs
    )


def test_dataset_skips_rows_that_do_not_encode_and_feeds_the_loader(tmp_path):
    rows = load_rows([DataSource(write_data(tmp_path), weight=2.0)]).rows
    encoder = make_encoder(max_length=20)  # the "long" row's prompt fills max_length: no label left
    with pytest.raises(DataError, match="row id 'long'.*no label token is left"):
        LlavaDataset(rows, encoder)
    dataset = LlavaDataset(rows, encoder, on_bad_row="skip")

    assert [(b.id, b.line) for b in dataset.skipped] == [("long", 3)]  # once, although the row is repeated
    assert "no label token is left" in dataset.skipped[0].reason and "row id" not in dataset.skipped[0].reason
    assert len(dataset) == 4 and dataset.is_image == [True, False, True, False]
    assert dataset.lengths == [len(dataset[k]["input_ids"]) for k in range(4)]
    assert dataset[0]["image"] == str(tmp_path / "a.png") and dataset[1]["image"] is None

    loader = FakeImageLoader()
    sampler = ModalityLengthGroupedSampler(dataset.lengths, dataset.is_image, batch_size=2)
    batches = list(DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=EveCollator(0, loader)))
    assert len(batches) == 2 and loader.calls == [[str(tmp_path / "a.png")] * 2]
    for batch in batches:
        has_image = "pixel_values" in batch
        assert (batch["input_ids"] == encoder.image_token_id).sum() == (
            8 if has_image else 0
        )  # 4 image tokens per image row
        assert (batch["labels"] != IGNORE_INDEX).any()


def test_collator_expands_only_examples_marked_compact(tmp_path):
    rows = load_rows([DataSource(write_data(tmp_path))]).rows
    encoder = make_encoder(max_length=40)
    image_id = encoder.image_token_id
    expanded = LlavaDataset(rows, encoder, on_bad_row="skip")[0]  # already 4 image tokens
    compact = encoder.encode_compact(rows[0])
    assert expanded["input_ids"].count(image_id) == 4 and compact.input_ids.count(image_id) == 1
    collator = EveCollator(0, FakeImageLoader(), image_token_id=image_id, num_image_tokens=4)
    as_is = collator([expanded])
    assert as_is["input_ids"][0].tolist() == expanded["input_ids"]  # not 16 image tokens
    grown = collator(
        [{"input_ids": compact.input_ids, "labels": compact.labels, "image": compact.image, "compact": True}]
    )
    assert grown["input_ids"][0].tolist() == expanded["input_ids"]
    assert grown["labels"][0].tolist() == expanded["labels"]
    with pytest.raises(ConfigError, match="compact .* no image_token_id"):
        EveCollator(0, FakeImageLoader())([{**expanded, "compact": True}])
