"""The `eve` command: `eve demo`, `eve inspect MODEL_DIR`."""

from __future__ import annotations

import argparse
import json
import sys

from eve_vlm.errors import EveError


def _inspect(args: argparse.Namespace) -> None:
    from transformers import AutoModelForImageTextToText

    import eve_vlm  # noqa: F401  (registers the Auto classes)
    from eve_vlm.model.params import parameter_counts

    model = AutoModelForImageTextToText.from_pretrained(args.model_dir)
    cfg = model.config
    counts = parameter_counts(model)
    info = {
        "model_dir": args.model_dir,
        "language_model": cfg.text_config.model_type,
        "vision_tower": cfg.vision_config.model_type,
        "projector": cfg.projector_type,
        "image_size": cfg.image_size,
        "image_tokens_per_image": cfg.num_image_tokens,
        "evf": cfg.evf,
        "parameters": counts.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key != "parameters":
            print(f"{key:>24}: {value}")
    for key, value in counts.to_dict().items():
        print(f"{key:>24}: {value:,}")


def _demo(args: argparse.Namespace) -> None:
    from eve_vlm.demo import run_demo

    run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eve", description="Small VLMs with Elastic Vision FFNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the model path end to end on tiny random parts")
    p.add_argument("--out", default="runs/demo", help="where to save the demo model")
    p.set_defaults(func=_demo)
    p = sub.add_parser("inspect", help="print a saved model's structure and parameter counts")
    p.add_argument("model_dir")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
