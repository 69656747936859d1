"""`eve serve` against the official `openai` client on 127.0.0.1, with a tiny random LoRA + EVF model:
answers, streaming, usage, stop strings, seeds, batching that never changes an answer, the text path in a
mixed batch, every bad request's error object, a full queue, a client that goes away."""

import asyncio
import json
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip(
    "openai", reason="the serve-test extra is not installed (pip install -e '.[serve-test]')"
)
import httpx  # noqa: E402
from tiny_server import (  # noqa: E402
    MODEL_ID,
    image_message,
    live_server,
    png_data_url,
    tiny_parts,
    word_tokenizer,
)

from eve_vlm.serve.engine import EngineConfig  # noqa: E402
from eve_vlm.serve.prompt import PromptLimits  # noqa: E402

TEXTS = [
    "what is red",
    "what is blue",
    "colour",
    "what is in this",
    "red blue",
    "is this red",
    "blue",
    "what",
]


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@pytest.fixture(scope="module")
def server(parts):
    model, processor, _ = parts
    config = EngineConfig(max_batch_size=16, batch_wait_ms=100, max_queue=64)
    with live_server(model, processor, config, PromptLimits(max_images=2, context=256)) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def ask(client, messages, **options):
    options.setdefault("temperature", 0)
    options.setdefault("max_tokens", 10)
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **options)


def user(text):
    return [{"role": "user", "content": text}]


def base_answer(parts, text, max_new_tokens=10):
    """The base LLM's greedy answer (no LoRA, no EVF) and its token count, EOS included, its prompt tokenised
    by the base LLM's own tokenizer."""
    model, processor, base = parts
    tokenizer = word_tokenizer()
    prompt = tokenizer.apply_chat_template(user(text), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = base.generate(
        input_ids=ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=[model.config.image_token_id],
    )[0, ids.shape[1] :].tolist()
    eos = processor.tokenizer.eos_token_id
    count = out.index(eos) + 1 if eos in out else len(out)
    return processor.tokenizer.decode(out[:count], skip_special_tokens=True), count, ids.shape[1]


def test_answer_is_the_base_llms_with_usage(parts, client):
    reply = ask(client, user("what is red"))
    text, count, prompt_tokens = base_answer(parts, "what is red")
    assert reply.choices[0].message.content == text and text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == count
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == count + prompt_tokens
    assert reply.choices[0].finish_reason == ("length" if count == 10 else "stop")


def test_a_typed_image_marker_in_a_text_only_request_is_text(parts, client):
    """Review item 22: "<image>" typed in a text-only request reaches the model as the base LLM reads it."""
    reply = ask(client, user("what is <image> red"))
    text, count, prompt_tokens = base_answer(parts, "what is <image> red")
    assert reply.choices[0].message.content == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, count)


def test_stream_matches_the_plain_answer(client, server):
    messages = [image_message("what is in this image")]
    plain = ask(client, messages)
    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    # The raw stream: SSE events, no usage chunk unless asked for, ends with [DONE].
    body = {"model": MODEL_ID, "messages": user("blue"), "stream": True, "temperature": 0, "max_tokens": 4}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:]).get("choices") for e in events[:-1])


def test_stop_strings_are_never_returned(client):
    full = ask(client, user("what is blue"), max_tokens=12).choices[0].message.content
    words = full.split()
    stop = words[3]
    cut = full[: full.index(stop)]
    reply = ask(client, user("what is blue"), max_tokens=12, stop=[stop, "zzz"])
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    streamed = ask(client, user("what is blue"), max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_seed_repeats_sampling(client):
    def sample(seed):
        return (
            ask(client, user("colour"), temperature=1.5, top_p=0.95, seed=seed, max_tokens=12)
            .choices[0]
            .message.content
        )

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10))


def test_sixteen_concurrent_streams_equal_their_solo_answers_and_text_rows_are_the_base_llms(
    parts, client, server
):
    url, engine = server
    requests = []
    for i in range(16):
        text = TEXTS[i % len(TEXTS)]
        if i % 2:
            requests.append([image_message(text, png_data_url((20 * i, 255 - 10 * i, 90)))])
        else:
            requests.append(user(text))
    solo = [ask(client, m).choices[0].message.content for m in requests]
    for i in range(0, 16, 2):
        assert solo[i] == base_answer(parts, requests[i][0]["content"])[0]

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        async def one(messages):
            stream = await aclient.chat.completions.create(
                model=MODEL_ID, messages=messages, temperature=0, max_tokens=10, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(m) for m in requests))
        finally:
            await aclient.close()

    before = engine.stats.largest_batch
    together = asyncio.run(run_all())
    assert together == solo
    assert engine.stats.largest_batch > 1 and engine.stats.largest_batch >= before
    # LoRA matters for these prompts: with the adapters on, the text answers would differ.
    model, processor, base = parts
    ids = processor.tokenizer("what is red", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(
            model.language_model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3
        )


BAD_REQUESTS = [
    ("malformed json", b'{"model": "tiny-eve", "messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("missing messages", {"model": MODEL_ID}, 400, "messages"),
    ("empty messages", {"model": MODEL_ID, "messages": []}, 400, "messages"),
    (
        "unknown role",
        {"model": MODEL_ID, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    ("unknown model", {"model": "gpt-9", "messages": user("x")}, 404, "model"),
    (
        "not an image",
        {"model": MODEL_ID, "messages": [image_message("x", "data:image/png;base64,aGVsbG8gd29ybGQ=")]},
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "truncated base64",
        {"model": MODEL_ID, "messages": [image_message("x", png_data_url()[:-7])]},
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "local path",
        {"model": MODEL_ID, "messages": [image_message("x", "/etc/passwd")]},
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "remote url not enabled",
        {"model": MODEL_ID, "messages": [image_message("x", "http://127.0.0.1/a.png")]},
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "image too large",
        {"model": MODEL_ID, "messages": [image_message("x", png_data_url(size=7000))]},
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "too many images",
        {"model": MODEL_ID, "messages": [image_message("a"), image_message("b"), image_message("c")]},
        400,
        "messages",
    ),
    ("prompt longer than the context", {"model": MODEL_ID, "messages": user("red " * 300)}, 400, "messages"),
    (
        "max_tokens beyond the context",
        {"model": MODEL_ID, "messages": user("x"), "max_tokens": 1000},
        400,
        "max_tokens",
    ),
    ("n > 1", {"model": MODEL_ID, "messages": user("x"), "n": 2}, 400, "n"),
    (
        "temperature out of range",
        {"model": MODEL_ID, "messages": user("x"), "temperature": 3},
        400,
        "temperature",
    ),
    ("seed too large", {"model": MODEL_ID, "messages": user("x"), "seed": 2**64}, 400, "seed"),
    ("seed too small", {"model": MODEL_ID, "messages": user("x"), "seed": -(2**63) - 1}, 400, "seed"),
    ("five stops", {"model": MODEL_ID, "messages": user("x"), "stop": list("abcde")}, 400, "stop"),
    (
        "image marker typed beside an image",
        {"model": MODEL_ID, "messages": [image_message("<image> what")]},
        400,
        "messages[0].content",
    ),
]


@pytest.mark.parametrize("name,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    client, server, name, body, status, param
):
    url = server[0] + "/v1/chat/completions"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        response = httpx.post(url, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert "Traceback" not in response.text
    assert ask(client, user("red"), max_tokens=2).choices[0].message.content is not None


def test_sdk_raises_the_mapped_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=user("x"))
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=user("x"), n=3)
    assert err.value.param == "n"


def test_models_health_and_page(server):
    url, _ = server
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL_ID
    assert httpx.get(url + f"/v1/models/{MODEL_ID}").json()["id"] == MODEL_ID
    missing = httpx.get(url + "/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(url + "/health").json()["status"] == "ok"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert httpx.get(url + "/nowhere").json()["error"]["type"] == "not_found_error"


def test_a_client_that_goes_away_stops_its_generation(server):
    url, engine = server
    cancelled = engine.stats.cancelled
    body = {"model": MODEL_ID, "messages": user("what"), "stream": True, "temperature": 0, "max_tokens": 240}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # the first piece of text: leave
    deadline = time.monotonic() + 20
    while engine.stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats.cancelled == cancelled + 1
    assert engine.stats.running == 0


def test_a_full_queue_answers_503_at_once(parts):
    """An engine that is not running: the queue of one fills, the next request is refused at once, before
    its image is decoded."""
    from eve_vlm.serve.engine import Engine
    from eve_vlm.serve.prompt import PromptBuilder
    from eve_vlm.serve.server import create_app

    class CountingBuilder(PromptBuilder):
        calls = 0

        def prepare(self, request):
            self.calls += 1
            return super().prepare(request)

    model, processor, _ = parts
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=1, max_queue=1))
    builder = CountingBuilder(processor, PromptLimits(context=256))
    app = create_app(engine, builder, MODEL_ID)

    # The first request waits in the queue (nothing decodes it); the second is refused with 503 quickly.
    async def both():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            body = {"model": MODEL_ID, "messages": user("red")}
            waiting = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            while engine.queued == 0:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            with_image = {"model": MODEL_ID, "messages": [image_message("what")]}
            refused = await http.post("/v1/chat/completions", json=with_image)
            elapsed = time.monotonic() - started
            waiting.cancel()
            return refused, elapsed

    refused, elapsed = asyncio.run(both())
    assert refused.status_code == 503 and elapsed < 2
    assert builder.calls == 1  # the refused request was not prepared
    assert refused.json()["error"]["type"] == "server_error"
    health = asyncio.run(_get(app, "/health"))
    assert health.status_code == 503


async def _get(app, path):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        return await http.get(path)


def test_a_stopped_engine_answers_503_and_health_says_so(parts):
    from eve_vlm.serve.engine import Engine
    from eve_vlm.serve.prompt import PromptBuilder
    from eve_vlm.serve.server import create_app

    model, processor, _ = parts
    engine = Engine(model, processor.tokenizer, EngineConfig()).start()
    engine.stop()
    app = create_app(engine, PromptBuilder(processor, PromptLimits(context=256)), MODEL_ID)

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": user("red")})

    refused = asyncio.run(post())
    assert refused.status_code == 503 and "restart" in refused.json()["error"]["message"]
    assert asyncio.run(_get(app, "/health")).status_code == 503
