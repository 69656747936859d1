"""Load on `eve serve`: N concurrent streaming clients (the `openai` package), batching on and off.

For each mode (batching on: `--max-batch-size` of the largest N; off: 1) the script starts `eve serve` on the
model folder as a subprocess, waits for /health, then for each N runs N clients that each send
`--requests` streamed chat requests one after another (greedy, `--max-tokens` new tokens, a text question
and, with --image, an image question in turn), and prints requests/s, output tokens/s (from the usage
chunks) and the p50/p95 time to first token. One JSON line per (mode, N) goes to --out when given.

    python benchmarks/serve_load.py runs/quickstart/stage3 --threads 4
    python benchmarks/serve_load.py runs/quickstart/stage3 --concurrency 1,4,16 --requests 4 --image
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import numpy as np
from openai import AsyncOpenAI
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_url() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(args, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "eve_vlm.cli", "serve", args.model_dir, "--port", str(port)]
    command += ["--max-batch-size", str(max_batch_size), "--max-queue", "1024", "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"eve serve exited with status {server.returncode}; run it by hand to see why")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("eve serve did not start within 300 s")


async def one_client(client, model, questions, args, ttfts, tokens):
    for i in range(args.requests):
        started = time.perf_counter()
        first = None
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": questions[i % len(questions)]}],
            temperature=0,
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                tokens.append(chunk.usage.completion_tokens)
        ttfts.append(first if first is not None else time.perf_counter() - started)


async def run_load(url: str, clients: int, args) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    questions: list = ["Describe a sunny day in one sentence."]
    if args.image:
        questions.append(
            [
                {"type": "image_url", "image_url": {"url": png_url()}},
                {"type": "text", "text": "What is this?"},
            ]
        )
    ttfts, tokens = [], []
    started = time.perf_counter()
    await asyncio.gather(*(one_client(client, model, questions, args, ttfts, tokens) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    await client.close()
    quantiles = statistics.quantiles(ttfts, n=20, method="inclusive") if len(ttfts) > 1 else ttfts * 19
    return {
        "clients": clients,
        "requests": len(ttfts),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(ttfts) / elapsed, 3),
        "output_tokens_per_s": round(sum(tokens) / elapsed, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p95_s": round(quantiles[18], 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image", action="store_true", help="alternate text and image questions")
    parser.add_argument("--threads", type=int, help="eve serve --threads")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", default="on,off", help="batching modes to run: on, off or both")
    parser.add_argument("--out", help="append one JSON line per result to this file")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model_dir):
        print(f"error: model folder {args.model_dir} does not exist", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.concurrency.split(",")]
    print(f"{'batching':>8} {'clients':>7} {'req/s':>8} {'out tok/s':>10} {'ttft p50':>9} {'ttft p95':>9}")
    for mode in args.modes.split(","):
        server, url = start_server(args, max(counts) if mode == "on" else 1)
        try:
            for clients in counts:
                result = {
                    "batching": mode,
                    "max_tokens": args.max_tokens,
                    **asyncio.run(run_load(url, clients, args)),
                }
                print(
                    f"{mode:>8} {clients:>7} {result['requests_per_s']:>8.2f} {result['output_tokens_per_s']:>10.1f} "
                    f"{result['ttft_p50_s']:>9.3f} {result['ttft_p95_s']:>9.3f}",
                    flush=True,
                )
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(result) + "\n")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
