"""The interactive `eve chat` session: a read-answer loop with streamed output and the conversation's history.

The history is kept as OpenAI chat messages (an attached image is a `data:` URL part), so the same session
talks either to the model in-process (`LocalBackend`: the server's prompt builder and engine, no HTTP) or to
a running `eve serve` (`RemoteBackend`: `/v1/chat/completions` streamed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from eve_vlm.errors import ConfigError, DataError

HELP = "Type a message. /image PATH attaches an image to the next message, /reset clears the history, /exit leaves."


class ChatError(Exception):
    """A turn failed (bad input or an unreachable server); the session reports it and goes on."""


class LocalBackend:
    """Decodes in this process with the server's `PromptBuilder` and `Engine`."""

    def __init__(self, model, processor):
        from eve_vlm.serve.engine import Engine, EngineConfig
        from eve_vlm.serve.prompt import PromptBuilder, PromptLimits

        context = int(model.config.text_config.max_position_embeddings)
        self.builder = PromptBuilder(processor, PromptLimits(context=context))
        self.engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=1, batch_wait_ms=0))

    @classmethod
    def load(
        cls,
        model_dir: str,
        dtype: str | None = None,
        device: str | None = None,
        threads: int | None = None,
        quantize: str | None = None,
    ) -> LocalBackend:
        from eve_vlm.serve.loading import load_model, set_threads

        set_threads(threads)
        return cls(*load_model(model_dir, dtype, device, quantize))

    def __enter__(self):
        self.engine.start()
        return self

    def __exit__(self, *exc):
        self.engine.stop()

    def stream(self, messages: list[dict], options: dict) -> Iterator[str]:
        from eve_vlm.serve.engine import Delta, Done, EngineBusy, EngineStopped, Request, Sink
        from eve_vlm.serve.protocol import ApiError, ChatCompletionRequest

        try:
            request = ChatCompletionRequest.model_validate(
                {"model": "local", "messages": messages, **options}
            )
            prepared = self.builder.prepare(request)
        except ApiError as err:
            raise ChatError(err.message) from None
        except ValidationError as err:
            raise ChatError(str(err.errors()[0]["msg"])) from None
        loop = asyncio.new_event_loop()
        sink = Sink(loop)
        try:
            try:
                self.engine.submit(
                    Request(prepared.input_ids, prepared.pixel_values, prepared.sampling, sink)
                )
            except (EngineBusy, EngineStopped):
                raise ChatError("The model engine is not running.") from None
            while True:
                event = loop.run_until_complete(sink.events.get())
                if isinstance(event, Delta):
                    yield event.text
                elif isinstance(event, Done):
                    return
                else:
                    raise ChatError(event.message)
        finally:
            sink.cancel()  # an answer left unfinished (Ctrl-C) stops decoding
            loop.close()


class RemoteBackend:
    """Talks to a running `eve serve` over HTTP (the `serve` extra's httpx)."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        try:
            import httpx
        except ImportError:
            from eve_vlm.errors import MissingDependencyError

            raise MissingDependencyError("--url needs httpx: pip install -e '.[serve]'") from None
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s)
        try:
            self.model = self.http.get(f"{self.url}/v1/models").json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as err:
            raise ConfigError(f"--url {url}: no eve serve answers there ({err}).") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.http.close()

    def stream(self, messages: list[dict], options: dict) -> Iterator[str]:
        import httpx

        body = {"model": self.model, "messages": messages, "stream": True, **options}
        try:
            with self.http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    try:
                        message = response.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = response.text
                    raise ChatError(f"{message} (HTTP {response.status_code})")
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise ChatError(chunk["error"]["message"])
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content"):
                            yield choice["delta"]["content"]
        except httpx.HTTPError as err:
            raise ChatError(f"The server at {self.url} did not answer: {err}") from None


def image_part(path: str) -> dict:
    """An `image_url` part with the file as a data URL.

    Raises:
        DataError: The file is missing, not an image, or in a format `eve serve` does not accept.
    """
    from PIL import Image

    from eve_vlm.serve.chat import load_image
    from eve_vlm.serve.media import FORMATS

    load_image(path)  # a clear error now rather than from the server
    with Image.open(path) as img:
        if img.format not in FORMATS:
            raise DataError(f"Image format {img.format} is not accepted; give a {', '.join(FORMATS)} file.")
    kind = Path(path).suffix.lower().lstrip(".") or "png"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {
        "type": "image_url",
        "image_url": {"url": f"data:image/{'jpeg' if kind == 'jpg' else kind};base64,{data}"},
    }


class ChatSession:
    """The read-answer loop.

    Args:
        backend: `LocalBackend` or `RemoteBackend`.
        options: Request fields for every turn (`max_tokens`, `temperature`).
        system: A system message for the conversation, or None.
    """

    def __init__(self, backend, options: dict, system: str | None = None, out=None, read=input):
        self.backend = backend
        self.options = options
        self.system = system
        self.out = out or sys.stdout
        self.read = read
        self.history: list[dict] = []
        self.images: list[dict] = []

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def run(self) -> None:
        """The loop; end of input, /exit or Ctrl-C ends it."""
        try:
            self._loop()
        except KeyboardInterrupt:
            self.say()

    def _loop(self) -> None:
        self.say(HELP)
        while True:
            try:
                line = self.read("> ").strip()
            except EOFError:
                self.say()
                return
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                self.history, self.images = [], []
                self.say("(history cleared)")
            elif line.startswith("/image"):
                path = line[len("/image") :].strip()
                try:
                    self.images.append(image_part(path))
                    self.say(f"(image {path} attached to the next message)")
                except DataError as err:
                    self.say(f"error: {err}")
            elif line.startswith("/"):
                self.say(f"error: unknown command {line.split()[0]}. {HELP}")
            else:
                self.turn(line)

    def turn(self, text: str) -> None:
        content = [*self.images, {"type": "text", "text": text}] if self.images else text
        message = {"role": "user", "content": content}
        prefix = [{"role": "system", "content": self.system}] if self.system else []
        pieces = []
        try:
            for piece in self.backend.stream([*prefix, *self.history, message], self.options):
                pieces.append(piece)
                self.say(piece, end="")
        except ChatError as err:
            self.say(("\n" if pieces else "") + f"error: {err}")
            if self.images:  # a refused image would make every later turn fail
                self.images = []
                self.say("(the attached image was dropped; attach it again with /image)")
            return
        self.say()
        self.history += [message, {"role": "assistant", "content": "".join(pieces)}]
        self.images = []
