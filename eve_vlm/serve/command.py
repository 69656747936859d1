"""The `eve serve` command line. It imports nothing of the `serve` extra, so every other `eve` command works
without it; `eve serve` (and the interactive `eve chat`) without it exits with a message naming the extra."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from eve_vlm.device import add_device_arguments
from eve_vlm.errors import MissingDependencyError

SERVE_EXTRA = ("pydantic", "fastapi", "uvicorn")


def require_serve_extra(command: str = "eve serve", modules: tuple[str, ...] = SERVE_EXTRA) -> None:
    """Raises `MissingDependencyError` naming the `serve` extra when one of `modules` cannot be imported."""
    for name in modules:
        try:
            import_module(name)
        except ImportError:
            raise MissingDependencyError(
                f"{command} needs the serve extra ({name} is not installed): pip install -e '.[serve]'"
            ) from None


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a saved model with an OpenAI-compatible chat API and web page"
    )
    p.add_argument("model_dir", help="model folder (e.g. runs/quickstart/stage3)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    add_device_arguments(p)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    p.add_argument("--served-model-name", help="the model id clients use (default: the folder's name)")
    p.add_argument(
        "--max-batch-size", type=int, default=8, help="requests decoded together (1 = no batching)"
    )
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="wait for batch-mates after a request")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    p.add_argument("--max-images", type=int, default=4, help="images per conversation")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    p.set_defaults(func=_run)


def _run(args) -> None:
    require_serve_extra()
    import uvicorn

    from eve_vlm.errors import ConfigError
    from eve_vlm.serve.engine import EngineConfig
    from eve_vlm.serve.loading import load_model, set_threads
    from eve_vlm.serve.media import ImageLimits
    from eve_vlm.serve.prompt import PromptLimits
    from eve_vlm.serve.server import build_server

    set_threads(args.threads)
    try:
        engine_config = EngineConfig(args.max_batch_size, args.batch_wait_ms, args.max_queue)
    except ValueError as err:
        raise ConfigError(f"{err} (--max-batch-size, --batch-wait-ms, --max-queue)") from None
    for option in ("max_images", "default_max_tokens"):
        if getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be at least 1.")
    model, processor = load_model(args.model_dir, args.dtype, args.device, args.quantize)
    limits = PromptLimits(
        max_images=args.max_images,
        context=int(model.config.text_config.max_position_embeddings),
        default_max_tokens=args.default_max_tokens,
        images=ImageLimits(allow_remote=args.allow_remote_images),
    )
    name = args.served_model_name or Path(args.model_dir).resolve().name
    app, engine = build_server(model, processor, name, engine_config, limits)
    try:
        print(f"serving {name} on http://{args.host}:{args.port} (chat page at /, API at /v1)")
        uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="info")
    finally:
        engine.stop()
