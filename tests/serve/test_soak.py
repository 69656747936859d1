"""Soak: 200 mixed good and bad requests, eight at a time, against one live server; every request gets its
answer or its error, and the process's resident memory stops growing after the warm-up."""

import concurrent.futures

import httpx
import pytest

psutil = pytest.importorskip("psutil", reason="psutil is not installed (the serve-test extra)")
pytest.importorskip("fastapi", reason="the serve extra is not installed")
from tiny_server import MODEL_ID, image_message, live_server, png_data_url, tiny_parts  # noqa: E402

from eve_vlm.serve.engine import EngineConfig  # noqa: E402

pytestmark = pytest.mark.slow


def request(i: int) -> tuple[dict | bytes, int]:
    """The i-th request of the soak and the status it must get."""
    kind = i % 8
    if kind == 0:
        return {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "what is red"}],
            "max_tokens": 6,
        }, 200
    if kind == 1:
        return {
            "model": MODEL_ID,
            "messages": [image_message("what", png_data_url((i % 255, 9, 9)))],
            "max_tokens": 6,
        }, 200
    if kind == 2:
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "blue"}],
            "max_tokens": 6,
            "stream": True,
        }
        return body, 200
    if kind == 3:
        return b"{not json", 400
    if kind == 4:
        return {"model": MODEL_ID, "messages": [image_message("x", "data:image/png;base64,AAAA")]}, 400
    if kind == 5:
        return {"model": "unknown", "messages": [{"role": "user", "content": "x"}]}, 404
    if kind == 6:
        return {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "n": 4}, 400
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "what"}],
        "temperature": 0.8,
        "seed": i,
    }, 200


def test_soak_200_mixed_requests(tmp_path):
    model, processor, _ = tiny_parts()
    process = psutil.Process()
    with live_server(model, processor, EngineConfig(max_batch_size=8, batch_wait_ms=5, max_queue=256)) as (
        url,
        engine,
    ):
        http = httpx.Client(timeout=120)

        def send(i):
            body, want = request(i)
            if isinstance(body, bytes):
                response = http.post(url + "/v1/chat/completions", content=body)
            else:
                response = http.post(url + "/v1/chat/completions", json=body)
            ok = response.status_code == want
            if want == 200 and ok:
                ok = (
                    ("data: [DONE]" in response.text)
                    if body.get("stream")
                    else bool(response.json()["choices"])
                )
            elif ok:
                ok = set(response.json()["error"]) == {"message", "type", "param", "code"}
            return i, ok

        rss = []
        results = {}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for start in range(0, 200, 50):
                for i, ok in pool.map(send, range(start, start + 50)):
                    results[i] = ok
                rss.append(process.memory_info().rss)
        http.close()
    assert sorted(results) == list(range(200))
    assert all(results.values()), [i for i, ok in results.items() if not ok]
    assert engine.stats.failed == 0
    # After the first 50 (warm-up: allocator pools, caches), memory stays flat within a small margin.
    growth = rss[-1] - rss[0]
    assert growth < 40 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 150 requests: {rss}"
