"""Tiny random configs built in memory (no network): a Llama- and a Qwen2-family LM, CLIP/SigLIP/DINOv2 towers."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    Dinov2Config,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

import eve_vlm  # noqa: E402, F401  (registers the Auto classes)
from eve_vlm.model import EveConfig, EveForConditionalGeneration  # noqa: E402

VOCAB = 128
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
IMAGE_TOKEN_ID = VOCAB  # outside the LM vocabulary, as with a real tokenizer that gained `<image>`


def tiny_text_config(family: str = "llama", **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if family == "gemma3":  # scaled embeddings; windows shorter than the test sequences
        return Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=8)
    raise ValueError(family)


def tiny_vision_config(kind: str = "dinov2", image_size: int = 32, patch_size: int = 8):
    common = dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    if kind == "clip":
        return CLIPVisionConfig(**common)
    if kind == "siglip":
        return SiglipVisionConfig(**common)
    if kind == "dinov2":
        return Dinov2Config(**common)
    raise ValueError(kind)


def tiny_eve_config(family="llama", tower="dinov2", projector="mlp2x_gelu", **overrides) -> EveConfig:
    return EveConfig(
        text_config=tiny_text_config(family),
        vision_config=tiny_vision_config(tower),
        projector_type=projector,
        projector_grid=2 if projector == "ldpv2" else None,
        image_token_id=IMAGE_TOKEN_ID,
        **overrides,
    )


def tiny_model(family="llama", tower="dinov2", projector="mlp2x_gelu", seed=0, **overrides):
    torch.manual_seed(seed)
    return EveForConditionalGeneration(tiny_eve_config(family, tower, projector, **overrides)).eval()


def image_batch(config: EveConfig, batch: int = 2, text_len: int = 6, seed: int = 0, images_per_row: int = 1):
    """input_ids with `images_per_row` image blocks per row after a BOS, plus matching pixel_values."""
    g = torch.Generator().manual_seed(seed)
    n = config.num_image_tokens
    rows = []
    for _ in range(batch):
        parts = [torch.tensor([1])]
        for _ in range(images_per_row):
            parts.append(torch.full((n,), IMAGE_TOKEN_ID))
            parts.append(torch.randint(3, VOCAB, (text_len,), generator=g))
        rows.append(torch.cat(parts))
    input_ids = torch.stack(rows)
    pixel_values = torch.randn(batch * images_per_row, 3, config.image_size, config.image_size, generator=g)
    return input_ids, pixel_values


def text_batch(batch: int = 2, length: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


@pytest.fixture(params=["llama", "qwen2"])
def family(request):
    return request.param


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "what",
    "is",
    "the",
    "colour",
    "of",
    "shape",
    "in",
    "this",
    "image",
    "a",
    "an",
    "red",
    "blue",
    "green",
    "yellow",
    "circle",
    "square",
    "triangle",
    "yes",
    "no",
    "does",
    "contain",
    "picture",
    "describe",
    "it",
    "there",
    "one",
    "two",
    "three",
]


def tiny_tokenizer():
    """A word-level fast tokenizer with ChatML specials, built in memory (ids < VOCAB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + ["\n", "user", "assistant", "system", *WORDS])}
    assert len(vocab) < VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    return tok


def byte_level_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2/SmolLM2/Qwen2 style) trained in memory, with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["what colour is the circle? It is red.\nuser assistant system"] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(["<|im_start|>", "<image>"], special_tokens=True)
    tok.chat_template = CHATML
    return tok


def load_benchmark(name: str):
    """The script `benchmarks/<name>.py` as a module (its `main` not run)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    """`python benchmarks/<name>.py ARGS` in a subprocess (one OpenMP thread, offline), its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(BENCHMARKS / f"{name}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
