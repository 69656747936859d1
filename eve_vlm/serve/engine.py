"""The generation engine of `eve serve`: one thread owns the model and decodes requests in batches.

- At most `max_queue` requests wait (queued, or set aside because they did not fit a batch): `reserve` (or
  `submit`) raises `EngineBusy` beyond that, so the server refuses a request before it decodes its images.
  The engine thread takes the oldest one, then collects compatible requests for up to `batch_wait_ms`, up to `max_batch_size`, and runs one
  `model.generate` on the left-padded batch with the KV cache.
- Compatible = the same sampling (greedy, or the same temperature and top_p). A request with a `seed` runs
  alone, right after `torch.manual_seed`, so its sampling repeats. Text-only and image requests share
  batches: the model keeps the text path per sequence (LoRA off, language FFN only), so a text-only request
  gets the base LLM's answer whatever its batch-mates. Where an EVF layer's evaluation capacity could drop
  image tokens (`eval_capacity_factor * top_k < num_experts`), image requests would compete for it, so such a
  model takes at most one image request per batch.
- Each row is followed by a `RowTracker` (a transformers `StoppingCriteria`): it decodes the row's new
  tokens, holds back text that could begin a stop string and cuts it at a stop string, stops the row at EOS,
  at its own token limit or when its client has gone, and sends the text deltas to the request's
  `asyncio.Queue` through `loop.call_soon_threadsafe`.
- Events sent to a request: `Delta(text)`, then `Done(finish_reason, prompt_tokens, completion_tokens)`, or
  `Failed(message)` when the batch failed.
- When the engine thread ends (`stop`, or an unexpected error), every request it has not answered gets
  `Failed`, and `reserve`/`submit` raise `EngineStopped` from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

log = logging.getLogger(__name__)


class EngineBusy(Exception):
    """Too many requests are waiting."""


class EngineStopped(Exception):
    """The engine thread has ended: no request will be decoded."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches.

    Attributes:
        max_batch_size: Requests decoded together (1 = batching off).
        batch_wait_ms: How long the engine waits for more requests after the first of a batch.
        max_queue: Requests waiting beyond the running batch (reserved, queued or set aside for a later batch);
            more are refused (503).
    """

    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue < 1 or self.batch_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and batch_wait_ms >= 0")


@dataclass(frozen=True)
class Sampling:
    """Sampling of one request: temperature 0 is greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def batch_key(self) -> tuple:
        return ("greedy",) if self.greedy else ("sample", self.temperature, self.top_p)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


class Sink:
    """Where the engine thread sends a request's events: an `asyncio.Queue` on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def send(self, event) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for this request any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """The client has gone: the engine stops this request's generation at its next step."""
        self.cancelled.set()


@dataclass
class Request:
    """A tokenised request ready for the engine.

    Attributes:
        input_ids: The prompt's token ids, image placeholders expanded.
        pixel_values: (N, 3, H, W) for the prompt's images in order, or None.
        sampling: How to decode.
        sink: Where its events go.
    """

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    sampling: Sampling
    sink: Sink

    @property
    def has_image(self) -> bool:
        return self.pixel_values is not None


@dataclass
class EngineStats:
    """Counters of the engine (read by /health and the tests)."""

    batches: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    running: int = 0
    largest_batch: int = 0


def stop_cut(text: str, stops: tuple[str, ...]) -> str | None:
    """`text` up to the first of the stop strings it contains, or None when it contains none."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else None


class RowTracker(StoppingCriteria):
    """Follows every row of one `generate` call: decodes, streams, and says which rows are done."""

    def __init__(self, requests: list[Request], tokenizer, eos_ids: set[int], prompt_width: int):
        self.requests = requests
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.prompt_width = prompt_width
        self.ids: list[list[int]] = [[] for _ in requests]
        self.sent = [0] * len(requests)  # characters of the row's text already sent
        self.finish: list[str | None] = [None] * len(requests)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        for row, token in enumerate(new):
            if self.finish[row] is None:
                self._step(row, token)
        return torch.tensor([f is not None for f in self.finish], device=input_ids.device)

    def _step(self, row: int, token: int) -> None:
        request = self.requests[row]
        if request.sink.cancelled.is_set():
            self.finish[row] = "cancelled"
            return
        self.ids[row].append(token)
        if token in self.eos_ids:
            self._close(row, "stop")
            return
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        stops = request.sampling.stop
        cut = stop_cut(text, stops)
        if cut is not None:
            self._emit(row, cut)
            self.finish[row] = "stop"
            self._done(row)
            return
        if len(self.ids[row]) >= request.sampling.max_new_tokens:
            self._close(row, "length", text)
            return
        hold = max((len(s) for s in stops), default=1) - 1
        safe = len(text) - hold
        while safe > 0 and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
            safe -= 1
        self._emit(row, text[:safe])

    def _emit(self, row: int, text: str) -> None:
        if len(text) > self.sent[row]:
            self.requests[row].sink.send(Delta(text[self.sent[row] :]))
            self.sent[row] = len(text)

    def _close(self, row: int, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        cut = stop_cut(text, self.requests[row].sampling.stop)
        self._emit(row, text if cut is None else cut)
        self.finish[row] = reason
        self._done(row)

    def _done(self, row: int) -> None:
        request = self.requests[row]
        request.sink.send(Done(self.finish[row], len(request.input_ids), len(self.ids[row])))

    def close_all(self) -> None:
        """Rows still open when `generate` returned stopped at the length limit."""
        for row, reason in enumerate(self.finish):
            if reason is None:
                self._close(row, "length")


class Engine:
    """Owns the model; decodes queued requests in batches on its own thread.

    Args:
        model: An `EveForConditionalGeneration` in eval mode.
        tokenizer: Its tokenizer (decoding; the pad and EOS ids).
        config: Batching options.
    """

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.stats = EngineStats()
        self._queue: queue.Queue[Request] = queue.Queue()
        self._pending: deque[Request] = deque()
        self._lock = threading.Lock()
        self._waiting = 0  # reserved + queued + pending, bounded by max_queue
        self._ended = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.eos_ids = self._eos_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        # The image placeholder may lie inside the LM's vocabulary; generating it would turn a row into an image
        # prompt without an image.
        vocab = int(model.config.text_config.vocab_size)
        self.suppress = [model.config.image_token_id] if model.config.image_token_id < vocab else None
        self.one_image_per_batch = any(
            evf.allocation != "modality" and evf.eval_capacity_factor * evf.top_k < evf.num_experts
            for evf in model.evf_layers.values()
        )

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is not None:
                ids.update(source if isinstance(source, (list, tuple)) else [source])
        return ids

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="eve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._ended

    @property
    def ended(self) -> bool:
        """The engine thread has ended (stopped or failed): no request will be answered any more."""
        return self._ended

    @property
    def queued(self) -> int:
        """Requests waiting: reserved, queued, or set aside for a later batch."""
        return self._waiting

    def reserve(self) -> None:
        """Holds a place among the waiting requests for one request still being prepared; give it back with
        `release` if the request is not submitted, or pass `reserved=True` to `submit`.

        Raises:
            EngineBusy: `max_queue` requests are already waiting.
            EngineStopped: The engine thread has ended.
        """
        with self._lock:
            self._hold_place()

    def _hold_place(self) -> None:
        if self._ended:
            raise EngineStopped
        if self._waiting >= self.config.max_queue:
            raise EngineBusy
        self._waiting += 1

    def release(self, count: int = 1) -> None:
        """Gives back places held by `reserve` (or by requests that left the waiting ones)."""
        with self._lock:
            self._waiting -= count

    def submit(self, request: Request, reserved: bool = False) -> None:
        """Queues a request.

        Args:
            reserved: A place was already held for it with `reserve`.

        Raises:
            EngineBusy: `max_queue` requests are already waiting.
            EngineStopped: The engine thread has ended.
        """
        with self._lock:  # with the thread's end (`_loop`): a request queued here is answered there
            if not reserved:
                self._hold_place()
            elif self._ended:
                raise EngineStopped
            self._queue.put_nowait(request)

    # --- the engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        batch: list[Request] = []
        try:
            while not self._stop.is_set():
                batch = self._next_batch()
                if batch:
                    self._run(batch)
                batch = []
        except Exception:
            log.exception("the engine thread failed; no more requests will be answered")
        finally:
            with self._lock:
                self._ended = True
            if self._stop.is_set():
                message = "The server is shutting down."
            else:
                message = "The server's model engine has stopped; restart the server."
            for request in [*batch, *self._pending, *iter_queue(self._queue)]:
                request.sink.send(Failed(message))
            self._pending.clear()

    def _take(self, timeout: float) -> Request | None:
        if self._pending:
            return self._pending.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _compatible(self, batch: list[Request], request: Request) -> bool:
        first = batch[0]
        if request.sampling.seed is not None or request.sampling.batch_key != first.sampling.batch_key:
            return False
        return not (self.one_image_per_batch and request.has_image and any(r.has_image for r in batch))

    def _drop(self, request: Request) -> None:
        """A request whose client has gone before it ran: it leaves the waiting ones without running."""
        self.stats.cancelled += 1
        self.release()

    def _next_batch(self) -> list[Request]:
        first = self._take(timeout=0.1)
        while first is not None and first.sink.cancelled.is_set():
            self._drop(first)
            first = self._take(timeout=0.0)
        if first is None:
            return []
        batch = [first]
        if first.sampling.seed is None and self.config.max_batch_size > 1:
            self._fill(batch)
        self.release(len(batch))
        return batch

    def _fill(self, batch: list[Request]) -> None:
        # Waiting requests that did not fit an earlier batch come first, in order.
        kept = deque()
        while self._pending and len(batch) < self.config.max_batch_size:
            request = self._pending.popleft()
            if request.sink.cancelled.is_set():
                self._drop(request)
            else:
                (batch if self._compatible(batch, request) else kept).append(request)
        self._pending.extendleft(reversed(kept))
        deadline = time.monotonic() + self.config.batch_wait_ms / 1000
        while len(batch) < self.config.max_batch_size:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request.sink.cancelled.is_set():
                self._drop(request)
            elif self._compatible(batch, request):
                batch.append(request)
            else:
                self._pending.append(request)

    def _run(self, batch: list[Request]) -> None:
        self.stats.running = len(batch)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        width = max(len(r.input_ids) for r in batch)
        device = self.model.device
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, request in enumerate(batch):
            n = len(request.input_ids)
            input_ids[row, width - n :] = torch.tensor(request.input_ids)
            attention_mask[row, width - n :] = 1
        pixels = [r.pixel_values for r in batch if r.pixel_values is not None]
        tracker = RowTracker(batch, self.tokenizer, self.eos_ids, width)
        sampling = batch[0].sampling
        generation = GenerationConfig(
            max_new_tokens=max(r.sampling.max_new_tokens for r in batch),
            do_sample=not sampling.greedy,
            temperature=None if sampling.greedy else sampling.temperature,
            top_p=None if sampling.greedy else sampling.top_p,
            top_k=None,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            suppress_tokens=self.suppress,
        )
        try:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    pixel_values=torch.cat(pixels).to(device, self.model.dtype) if pixels else None,
                    generation_config=generation,
                    stopping_criteria=StoppingCriteriaList([tracker]),
                )
            tracker.close_all()
        except Exception as err:  # one failed batch must not stop the server
            log.exception("generation failed for a batch of %d request(s)", len(batch))
            self.stats.failed += len(batch)
            for row, request in enumerate(batch):
                if tracker.finish[row] is None:
                    request.sink.send(Failed(f"The model failed on this request ({type(err).__name__})."))
            return
        finally:
            self.stats.running = 0
        for reason in tracker.finish:
            if reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.completed += 1


def iter_queue(q: queue.Queue):
    """Takes every item out of `q`."""
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return
