"""Dataset, batch collator and modality-grouped sampler for training on LLaVA-format conversations.

- `LlavaDataset` encodes every row up front with a `ConversationEncoder`, in memory, so bad rows are found
  (and, with `on_bad_row="skip"`, counted) before the first step, and exposes `lengths` / `is_image` for the
  sampler. Training reads `cache.CachedDataset` instead (encoded once, on disk); this one is the reference
  the cache is tested against.
- `EveCollator` right-pads a batch (`input_ids` with the pad id, `labels` with -100) and loads the images of
  the rows that have one, in order, as `pixel_values` (or stacks the ones the dataset loaded). An example
  marked `compact` (the data cache, `cache.py`, stores one placeholder per image) has each image placeholder
  expanded to `num_image_tokens` ids first; other examples are taken as they are.
- `ModalityLengthGroupedSampler` is LLaVA's `group_by_modality_length` (`llava/train/llava_trainer.py`,
  `get_modality_length_grouped_indices`) without its one mixed last batch: each modality is padded with its
  own rows to whole megabatches, so every batch on every process is all-image or all-text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from eve_vlm.data.conversations import IGNORE_INDEX, ConversationEncoder, EncodedExample, row_where
from eve_vlm.data.llava import ON_BAD_ROW, BadRow, ConversationRow
from eve_vlm.errors import ConfigError, DataError


class LlavaDataset(Dataset):
    """Encoded conversations, ready for `EveCollator`.

    Args:
        rows: Rows from `load_rows` (weighted; a repeated row is encoded once).
        encoder: Renders and tokenises each row.
        on_bad_row: "raise" to stop at the first row that does not encode, "skip" to drop it and record it
            in `skipped`.

    Raises:
        DataError: (with on_bad_row="raise") for the first row that does not encode, naming it.
    """

    def __init__(
        self, rows: list[ConversationRow], encoder: ConversationEncoder, *, on_bad_row: str = "raise"
    ):
        if on_bad_row not in ON_BAD_ROW:
            raise ConfigError(f"on_bad_row={on_bad_row!r}; use one of {ON_BAD_ROW}")
        self.skipped: list[BadRow] = []
        self.examples: list[EncodedExample] = []
        cache: dict[int, EncodedExample | None] = {}
        for row in rows:
            if id(row) not in cache:
                cache[id(row)] = self.encode(row, encoder, on_bad_row)
            if cache[id(row)] is not None:
                self.examples.append(cache[id(row)])

    def encode(
        self, row: ConversationRow, encoder: ConversationEncoder, on_bad_row: str
    ) -> EncodedExample | None:
        try:
            return encoder.encode(row)
        except DataError as e:
            if on_bad_row == "raise":
                raise
            reason = str(e).removeprefix(f"{row_where(row)}: ")
            self.skipped.append(BadRow(source=row.source, line=row.line, id=row.id, reason=reason))
            return None

    def drop_text_only(self) -> int:
        """Removes the rows without an image; returns how many were removed."""
        before = len(self.examples)
        self.examples = [e for e in self.examples if e.image is not None]
        return before - len(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        return {"input_ids": ex.input_ids, "labels": ex.labels, "image": ex.image}

    @property
    def lengths(self) -> list[int]:
        """Token count of each example."""
        return [len(ex.input_ids) for ex in self.examples]

    @property
    def is_image(self) -> list[bool]:
        """Whether each example has an image."""
        return [ex.image is not None for ex in self.examples]


class EveCollator:
    """Pads a list of examples into a batch of tensors.

    An example is `{"input_ids", "labels", "image"}` (a path or None); it may also carry `compact: True`
    (its `input_ids` hold one `image_token_id` per image, to be expanded here; without it they are taken
    as already expanded), `pixel_values` `(3, H, W)` loaded by the dataset (then `image_loader` is not
    called for it) and `bad_images`, the number of unreadable images the dataset skipped to find it (summed
    into the batch's `num_bad_images`).

    Args:
        pad_token_id: Fills `input_ids` on the right.
        image_loader: Maps a list of image paths to `pixel_values` `(N, 3, H, W)`, one per path, in order
            (e.g. open with PIL and run the processor's image processor).
        image_token_id: In a `compact` example each such id is one image placeholder and is expanded to
            `num_image_tokens` ids (labels -100), as `ConversationEncoder.encode` does.
        num_image_tokens: Image-token ids per image (with `image_token_id`).
    """

    def __init__(
        self,
        pad_token_id: int,
        image_loader: Callable[[list[str]], torch.Tensor],
        *,
        image_token_id: int | None = None,
        num_image_tokens: int = 1,
    ):
        if num_image_tokens < 1:
            raise ConfigError(f"num_image_tokens={num_image_tokens} must be >= 1")
        self.pad_token_id = pad_token_id
        self.image_loader = image_loader
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens

    def expand(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`ids` and `labels` with each image placeholder repeated `num_image_tokens` times."""
        if self.num_image_tokens == 1:
            return ids, labels
        is_image = ids == self.image_token_id
        if not bool(is_image.any()):
            return ids, labels
        repeats = torch.where(is_image, self.num_image_tokens, 1)
        labels = labels.masked_fill(is_image, IGNORE_INDEX)
        return ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Returns `input_ids`, `labels`, `attention_mask` `(B, T)` and, if any row has an image,
        `pixel_values` `(N_images, 3, H, W)`; and `num_bad_images` (a scalar) when the examples report any.

        Raises:
            DataError: when `image_loader` returns a different number of images than it was given paths.
            ConfigError: for a `compact` example when the collator has no `image_token_id`.
        """
        ids, labels = [], []
        for b, ex in enumerate(examples):
            t = torch.as_tensor(np.asarray(ex["input_ids"]), dtype=torch.long)
            lab = torch.as_tensor(np.asarray(ex["labels"]), dtype=torch.long)
            if ex.get("compact", False):
                if self.image_token_id is None:
                    raise ConfigError(
                        f"Example {b} of the batch is compact (one placeholder per image) but the collator "
                        "has no image_token_id to expand it; pass image_token_id and num_image_tokens."
                    )
                t, lab = self.expand(t, lab)
            ids.append(t)
            labels.append(lab)
        width = max(len(t) for t in ids)
        batch = {
            "input_ids": torch.full((len(ids), width), self.pad_token_id, dtype=torch.long),  # (B, T)
            "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
        }
        for b, (t, lab) in enumerate(zip(ids, labels, strict=True)):
            if len(t) != len(lab):
                raise DataError(f"Example {b} of the batch has {len(t)} input_ids but {len(lab)} labels.")
            batch["input_ids"][b, : len(t)] = t
            batch["labels"][b, : len(t)] = lab
            batch["attention_mask"][b, : len(t)] = 1
        with_image = [ex for ex in examples if ex.get("image") is not None]
        if with_image and all("pixel_values" in ex for ex in with_image):
            batch["pixel_values"] = torch.stack([ex["pixel_values"] for ex in with_image])
        elif with_image:
            paths = [ex["image"] for ex in with_image]
            pixel_values = self.image_loader(paths)
            if len(pixel_values) != len(paths):
                raise DataError(
                    f"image_loader returned {len(pixel_values)} images for {len(paths)} paths: {paths}"
                )
            batch["pixel_values"] = pixel_values
        if any("bad_images" in ex for ex in examples):
            batch["num_bad_images"] = torch.tensor(sum(ex.get("bad_images", 0) for ex in examples))
        return batch


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yields indices in single-modality batches of similar length (LLaVA's `group_by_modality_length`).

    Each modality's indices are shuffled and padded to a multiple of `batch_size * world_size` with its own
    (random) indices; cut into megabatches of that size; each megabatch sorted by length, longest first; and
    the megabatches of both modalities shuffled together. Every run of `batch_size` consecutive indices is
    therefore one modality, and so is every group of `world_size` consecutive batches, which distributed
    loaders (accelerate) hand to the processes round-robin: all processes see the same modality at each step.

    Args:
        lengths: Token count of each example.
        is_image: Whether each example has an image.
        batch_size: Per-device batch size.
        world_size: Number of data-parallel processes.
        seed: With the epoch (`set_epoch`), seeds the shuffle: same seed and epoch, same order.
        generator: Used instead of `seed` and the epoch when given.
    """

    def __init__(
        self,
        lengths: list[int],
        is_image: list[bool],
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ):
        if len(lengths) != len(is_image):
            raise ConfigError(
                f"{len(lengths)} lengths but {len(is_image)} is_image flags; give one per example"
            )
        if batch_size < 1 or world_size < 1:
            raise ConfigError(f"batch_size={batch_size} and world_size={world_size} must be >= 1")
        self.lengths = list(lengths)
        self.is_image = [bool(f) for f in is_image]
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.generator = generator
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch, which changes the order."""
        self.epoch = epoch

    @property
    def megabatch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        sizes = (sum(self.is_image), len(self.is_image) - sum(self.is_image))
        return sum(n + (-n % self.megabatch_size) for n in sizes)

    def __iter__(self) -> Iterator[int]:
        g = self.generator
        if g is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
        m = self.megabatch_size
        megabatches = []
        for flag in (True, False):
            members = [i for i, f in enumerate(self.is_image) if f == flag]
            if not members:
                continue
            shuffled = [members[k] for k in torch.randperm(len(members), generator=g).tolist()]
            shuffled += [shuffled[k % len(shuffled)] for k in range(-len(shuffled) % m)]
            for start in range(0, len(shuffled), m):
                megabatch = shuffled[start : start + m]
                megabatches.append(sorted(megabatch, key=lambda i: self.lengths[i], reverse=True))
        for k in torch.randperm(len(megabatches), generator=g).tolist():
            yield from megabatches[k]
