"""From a validated chat request to what the engine decodes: the prompt's token ids, its images and the
sampling, checked against the model's limits.

- Each message's content parts become one string: an image part is the processor's `<image>` marker, text
  parts are their text, joined by newlines (so `[image, text]` renders as `eve chat` renders an image
  question). The conversation goes through the tokenizer's own chat template with the generation prompt.
- A conversation with an image and no system message gets the model's own system prompt (the one it was
  instruction-tuned with); a text-only one renders exactly as the base LLM's chat does.
- A text-only conversation is tokenised as the base LLM's (`EveProcessor.text_tokenizer`): an `<image>` typed
  in it stays text. In a conversation with images the marker stands for an image, so typing it there is
  refused.
- Refused with a 400 and the field at fault: images outside user messages, the `<image>` marker typed as
  text beside images, more images than `max_images`, a prompt that leaves no room in the context, `max_tokens` beyond it,
  `n` > 1, any image `media.load_image_url` refuses.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from jinja2 import TemplateError

from eve_vlm.serve.engine import Sampling
from eve_vlm.serve.media import ImageLimits, load_image_url
from eve_vlm.serve.protocol import ApiError, ChatCompletionRequest, ImagePart


@dataclass(frozen=True)
class PromptLimits:
    """Limits of one request.

    Attributes:
        max_images: Images per conversation.
        context: Prompt plus completion tokens (the LM's `max_position_embeddings`).
        default_max_tokens: Completion tokens when the request names none (cut to what the context leaves).
        images: Image decoding limits.
    """

    max_images: int = 4
    context: int = 2048
    default_max_tokens: int = 256
    images: ImageLimits = ImageLimits()


@dataclass
class Prepared:
    input_ids: list[int]
    pixel_values: object  # torch.Tensor | None
    sampling: Sampling


class PromptBuilder:
    """Turns requests into engine inputs with the model's processor (thread-safe)."""

    def __init__(self, processor, limits: PromptLimits):
        self.processor = processor
        self.limits = limits
        self._lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once

    def prepare(self, request: ChatCompletionRequest) -> Prepared:
        """Raises `ApiError` (400) for anything the model cannot take."""
        if request.n not in (None, 1):
            raise ApiError(400, "Only one choice per request is supported (n must be 1).", param="n")
        messages, images = self._render_messages(request)
        try:
            prompt = self.processor.generation_prompt(messages, with_images=bool(images))
        except TemplateError as err:
            raise ApiError(
                400, f"The model's chat template cannot render these messages: {err}", param="messages"
            ) from None
        with self._lock:
            inputs = self.processor(prompt, images=images or None, padding=False)
        input_ids = inputs["input_ids"][0].tolist()
        sampling = self._sampling(request, len(input_ids))
        return Prepared(input_ids, inputs.get("pixel_values"), sampling)

    def _render_messages(self, request: ChatCompletionRequest) -> tuple[list[dict], list]:
        marker = self.processor.image_token
        image_parts = [
            (i, j, part)
            for i, message in enumerate(request.messages)
            if isinstance(message.content, list)
            for j, part in enumerate(message.content)
            if isinstance(part, ImagePart)
        ]
        if len(image_parts) > self.limits.max_images:
            raise ApiError(
                400,
                f"The messages hold {len(image_parts)} images; this model takes at most {self.limits.max_images} "
                "per conversation.",
                param="messages",
                code="too_many_images",
            )
        rendered, images = [], []
        for i, message in enumerate(request.messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content
            pieces = []
            if isinstance(content, str):
                pieces.append(content)
            elif content is not None:
                for j, part in enumerate(content):
                    if isinstance(part, ImagePart):
                        param = f"messages[{i}].content[{j}].image_url"
                        if role != "user":
                            raise ApiError(400, "Images are accepted in user messages only.", param=param)
                        images.append(load_image_url(part.image_url.url, param, self.limits.images))
                        pieces.append(marker)
                    else:
                        pieces.append(part.text)
            text = "\n".join(pieces)
            if image_parts and marker in "".join(p for p in pieces if p != marker):
                raise ApiError(
                    400,
                    f"Beside images, message text may not contain the image marker {marker!r}; send images as "
                    "image_url parts.",
                    param=f"messages[{i}].content",
                )
            rendered.append({"role": role, "content": text})
        system = self.processor.system_prompt
        if images and system is not None and not any(m["role"] == "system" for m in rendered):
            rendered.insert(0, {"role": "system", "content": system})
        return rendered, images

    def _sampling(self, request: ChatCompletionRequest, prompt_tokens: int) -> Sampling:
        context = self.limits.context
        room = context - prompt_tokens
        if room < 1:
            raise ApiError(
                400,
                f"The prompt is {prompt_tokens} tokens long, but this model's context is {context} tokens; "
                "shorten the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        wanted = request.max_new_tokens
        if wanted is not None and wanted > room:
            raise ApiError(
                400,
                f"This model's context is {context} tokens; the prompt takes {prompt_tokens}, so at most {room} "
                f"can be generated, but {wanted} were requested.",
                param="max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens",
                code="context_length_exceeded",
            )
        return Sampling(
            max_new_tokens=wanted if wanted is not None else min(self.limits.default_max_tokens, room),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=tuple(request.stops),
            seed=request.seed,
        )
