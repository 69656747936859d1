"""`eve chat`: a saved Eve model from the shell.

- `eve chat MODEL_DIR "question" [--image PATH]` (or `--model MODEL_DIR`): one greedy answer, printed.
- `eve chat MODEL_DIR` with no question: an interactive session with streamed answers and the conversation's
  history; `/image PATH` attaches an image to the next message, `/reset` clears the history, `/exit` (or end
  of input) leaves. It decodes in-process through the server's engine (`engine.py`, `prompt.py`), so it gives
  the answers `eve serve` gives; with `--url http://HOST:PORT` it talks to a running `eve serve` instead.

The prompt is the tokenizer's own chat template with the generation prompt; an image adds `<image>` in front
of the question. A question without an image runs the base LLM's text path, so it gets the base LLM's answer.
"""

from __future__ import annotations

import torch
from PIL import Image

from eve_vlm.device import add_device_arguments
from eve_vlm.errors import ConfigError, DataError
from eve_vlm.model import EveForConditionalGeneration, EveProcessor


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
    inputs = processor(prompt, images=[image] if image is not None else None).to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def add_chat_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a saved model (interactive without a question), optionally about images"
    )
    p.add_argument("words", nargs="*", metavar="MODEL_DIR [QUESTION]", help="model folder, then the question")
    p.add_argument("--model", help="model folder (then every positional word is the question)")
    p.add_argument("--url", help="talk to a running `eve serve` at this address instead of loading a model")
    p.add_argument("--image", help="image file (one-shot form)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--temperature",
        type=float,
        help="interactive form: 0 = greedy (default) to 2; the one-shot form is greedy",
    )
    p.add_argument("--system", help="system prompt")
    add_device_arguments(p, suffix=" (not with --url)")
    p.add_argument("--threads", type=int, help="torch CPU threads (not with --url)")
    p.set_defaults(func=_run)


def check_options(args, question: str | None) -> None:
    """Refuses options the chosen form would ignore, and bad values, before anything is loaded."""
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1.")
    if args.temperature is not None and not 0.0 <= args.temperature <= 2.0:
        raise ConfigError(f"--temperature must be between 0 and 2, got {args.temperature}.")
    if question is not None:
        if args.url is not None:
            raise ConfigError("The one-shot form needs a model folder; use the interactive form with --url.")
        if args.temperature not in (None, 0.0):
            raise ConfigError("The one-shot form is greedy; --temperature is for the interactive form.")
        return
    if args.image is not None:
        raise ConfigError(
            "--image is for the one-shot form (with a question); in the session use /image PATH."
        )
    if args.url is not None:
        given = [name for name in ("device", "dtype", "threads") if getattr(args, name) is not None]
        if given:
            raise ConfigError(f"--{given[0]} does not apply with --url: the server loaded the model.")


def _run(args) -> None:
    words = list(args.words)
    model_dir = args.model
    if model_dir is None and args.url is None:
        if not words:
            raise ConfigError(
                "eve chat needs a model folder (eve chat MODEL_DIR) or --url of a running server."
            )
        model_dir = words.pop(0)
    question = " ".join(words) if words else None
    check_options(args, question)
    if question is not None:
        from eve_vlm.serve.loading import load_model, set_threads

        set_threads(args.threads)
        model, processor = load_model(model_dir, args.dtype, args.device, args.quantize)
        image = load_image(args.image) if args.image else None
        print(answer(model, processor, question, image, args.max_new_tokens, args.system))
        return
    from eve_vlm.serve.command import require_serve_extra

    require_serve_extra("the interactive eve chat", ("pydantic", "httpx") if args.url else ("pydantic",))
    from eve_vlm.serve.session import ChatSession, LocalBackend, RemoteBackend

    if args.url is not None:
        backend = RemoteBackend(args.url)
    else:
        backend = LocalBackend.load(model_dir, args.dtype, args.device, args.threads, args.quantize)
    options = {"max_tokens": args.max_new_tokens, "temperature": args.temperature or 0.0}
    with backend:
        ChatSession(backend, options, args.system).run()
