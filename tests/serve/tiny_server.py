"""A tiny random LoRA + EVF Eve model behind a live `eve serve` app on 127.0.0.1 (uvicorn in a thread), and
helpers to talk to it. The tokenizer's words fill the LM vocabulary, so every generated token decodes to text."""

from __future__ import annotations

import base64
import copy
import io
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
from conftest import CHATML, VOCAB, tiny_model
from PIL import Image

from eve_vlm.model import EveProcessor
from eve_vlm.model.lora import lora_layers
from eve_vlm.serve.engine import EngineConfig
from eve_vlm.serve.prompt import PromptLimits
from eve_vlm.serve.server import build_server

MODEL_ID = "tiny-eve"


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    words = [
        "\n",
        "user",
        "assistant",
        "system",
        "what",
        "is",
        "in",
        "this",
        "image",
        "colour",
        "red",
        "blue",
    ]
    words += [f"w{i}" for i in range(VOCAB - 1 - len(specials) - len(words))]  # <image> takes the last id
    vocab = {tok: i for i, tok in enumerate(specials + words)}
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


def tiny_parts(seed: int = 0):
    """(model with LoRA and EVF, processor, base LM): LoRA and the vision experts are perturbed so that they
    change answers."""
    model = tiny_model(projector="ldp", seed=seed)
    processor = EveProcessor.from_parts(
        tokenizer=word_tokenizer(),
        vision_config=model.config.vision_config,
        image_size=model.config.image_size,
        num_image_tokens=model.config.num_image_tokens,
    )
    assert processor.image_token_id == VOCAB - 1
    model.config.image_token_id = processor.image_token_id
    with torch.no_grad():  # larger weights than the default init, so that answers vary from token to token
        for name, p in model.language_model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    base = copy.deepcopy(model.language_model).eval()
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    torch.manual_seed(seed + 3)
    for layer in lora_layers(model.language_model):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    model.add_elastic_vision_ffns("alternate")
    for evf in model.evf_layers.values():
        torch.nn.init.normal_(evf.router.weight, std=1.0)
        for p in evf.vision_ffns.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    return model.eval(), processor, base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(
    model, processor, engine_config: EngineConfig | None = None, limits: PromptLimits | None = None
):
    """Yields `(base_url, engine)` of a running server."""
    import uvicorn

    app, engine = build_server(model, processor, MODEL_ID, engine_config, limits)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", workers=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()


def png_data_url(colour=(200, 30, 30), size=40, fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, url: str | None = None) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url or png_data_url()}},
            {"type": "text", "text": text},
        ],
    }
