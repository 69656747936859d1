"""Data: LLaVA-format rows (`llava`), chat-template rendering with label masks (`conversations`), the
collator and modality-grouped sampler used in training (`collator`), and the data cache that training reads
(`cache`)."""

from eve_vlm.data.cache import CachedDataset, prepare_cache
from eve_vlm.data.collator import EveCollator, LlavaDataset, ModalityLengthGroupedSampler
from eve_vlm.data.conversations import IGNORE_INDEX, ConversationEncoder, EncodedExample
from eve_vlm.data.llava import BadRow, ConversationRow, DataSource, LoadedRows, load_rows

__all__ = [
    "IGNORE_INDEX",
    "BadRow",
    "CachedDataset",
    "ConversationEncoder",
    "ConversationRow",
    "DataSource",
    "EncodedExample",
    "EveCollator",
    "LlavaDataset",
    "LoadedRows",
    "ModalityLengthGroupedSampler",
    "load_rows",
    "prepare_cache",
]
