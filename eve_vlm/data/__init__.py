"""Data: LLaVA-format rows (`llava`), chat-template rendering with label masks (`conversations`), and the
dataset, collator and modality-grouped sampler used in training (`collator`)."""

from eve_vlm.data.collator import EveCollator, LlavaDataset, ModalityLengthGroupedSampler
from eve_vlm.data.conversations import IGNORE_INDEX, ConversationEncoder, EncodedExample
from eve_vlm.data.llava import BadRow, ConversationRow, DataSource, LoadedRows, load_rows

__all__ = [
    "IGNORE_INDEX",
    "BadRow",
    "ConversationEncoder",
    "ConversationRow",
    "DataSource",
    "EncodedExample",
    "EveCollator",
    "LlavaDataset",
    "LoadedRows",
    "ModalityLengthGroupedSampler",
    "load_rows",
]
