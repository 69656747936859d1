"""The OpenAI Chat Completions wire format that `eve serve` speaks: validated request models, response and
stream-chunk builders, and the error envelope.

Requests follow `openai-python`'s `completion_create_params`: `messages` with roles system, developer, user and
assistant; content as a string or a list of `text` and `image_url` parts; sampling by `temperature`, `top_p`,
`max_completion_tokens` (or the older `max_tokens`), `stop` (up to 4 strings) and `seed`; `stream` with
`stream_options.include_usage`. Fields this server has no use for (`user`, `metadata`, ...) are accepted and
ignored; `n` other than 1 is refused. Errors are `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape.

    Args:
        status: HTTP status (400 bad request, 404 unknown model, 503 busy, 500 internal).
        message: What is wrong and what to do about it.
        type: OpenAI error type (`invalid_request_error`, `server_error`, ...).
        param: The request field at fault (`messages[0].content[1].image_url`), or None.
        code: A short machine-readable code, or None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageUrl(_Part):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """A `POST /v1/chat/completions` body."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # torch.manual_seed's range
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_param(loc: tuple) -> str | None:
    """A pydantic error location -> an OpenAI `param` path such as `messages[0].content[1].image_url`."""
    path = ""
    for item in loc:
        if item == "body":
            continue
        if isinstance(item, int):
            path += f"[{item}]"
        elif item in ("text", "image_url") and path.endswith("]") and ".content[" in path:
            # pydantic names the union branch it tried; the client's field is the part itself
            continue
        else:
            path += f".{item}" if path else str(item)
    return path or None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


class ChunkWriter:
    """Builds the SSE events of one streamed completion: every chunk has the same id and `created`."""

    def __init__(self, cid: str, model: str, include_usage: bool):
        self.cid = cid
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _chunk(self, choices: list, usage_value: dict | None = None) -> dict:
        chunk = {
            "id": self.cid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage_value
        return chunk

    def delta(self, delta: dict, finish_reason: str | None = None) -> dict:
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._chunk([], usage(prompt_tokens, completion_tokens))


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_id, created)]}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "eve-vlm"}
