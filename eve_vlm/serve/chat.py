"""`eve chat`: one question to a saved Eve model, with or without an image.

The prompt is the tokenizer's own chat template with the generation prompt; an image adds `<image>` in front
of the question. Decoding is greedy with the KV cache. A question without an image runs the base LLM's text
path, so it gets the base LLM's answer.
"""

from __future__ import annotations

import torch
from PIL import Image

from eve_vlm.errors import DataError
from eve_vlm.model import EveForConditionalGeneration, EveProcessor
from eve_vlm.model.folder import check_eve_folder


def build_prompt(processor: EveProcessor, question: str, with_image: bool, system: str | None = None) -> str:
    """The chat-template prompt for one user turn (an image request gets the model's own system prompt
    unless `system` is given)."""
    content = f"{processor.image_token}\n{question}" if with_image else question
    return processor.chat_prompt(content, system)


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"Cannot read image {path}: {err}. Give a PNG/JPEG file.") from None


@torch.no_grad()
def answer(
    model: EveForConditionalGeneration,
    processor: EveProcessor,
    question: str,
    image: Image.Image | None = None,
    max_new_tokens: int = 64,
    system: str | None = None,
) -> str:
    """Greedy answer to one question."""
    prompt = build_prompt(processor, question, image is not None, system)
    inputs = processor(prompt, images=[image] if image is not None else None)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def add_chat_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="ask a saved model one question, optionally about an image")
    p.add_argument("--model", required=True, help="model folder (e.g. runs/quickstart/stage3)")
    p.add_argument("--image", help="image file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--system", help="system prompt")
    p.add_argument("question")
    p.set_defaults(func=_run)


def _run(args) -> None:
    check_eve_folder(args.model)
    model = EveForConditionalGeneration.from_pretrained(args.model).eval()
    processor = EveProcessor.from_pretrained(args.model)
    image = load_image(args.image) if args.image else None
    print(answer(model, processor, args.question, image, args.max_new_tokens, args.system))
