"""The `eve` command: `eve demo`, `eve train RECIPE [key=value ...]`, `eve export`, `eve inspect MODEL_DIR`,
`eve chat`, `eve serve MODEL_DIR`."""

from __future__ import annotations

import argparse
import json
import sys

from eve_vlm.assets import add_prepare_parser
from eve_vlm.errors import EveError, user_message
from eve_vlm.eval.cli import add_eval_parser
from eve_vlm.quickstart import add_quickstart_parser
from eve_vlm.serve.chat import add_chat_parser
from eve_vlm.serve.command import add_serve_parser


def _inspect(args: argparse.Namespace) -> None:
    from transformers import AutoModelForImageTextToText

    import eve_vlm  # noqa: F401  (registers the Auto classes)
    from eve_vlm.model.folder import check_eve_folder
    from eve_vlm.model.params import parameter_counts

    check_eve_folder(args.model_dir)
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


def _train(args: argparse.Namespace) -> None:
    from eve_vlm.train.recipe import load_recipe
    from eve_vlm.train.stages import run_stage

    run_stage(load_recipe(args.recipe, args.overrides))


def _export(args: argparse.Namespace) -> None:
    import eve_vlm  # noqa: F401
    from eve_vlm.model import EveForConditionalGeneration, EveProcessor
    from eve_vlm.model.folder import check_eve_folder

    check_eve_folder(args.model_dir)
    model = EveForConditionalGeneration.from_pretrained(args.model_dir)
    if args.merge:
        merged = model.merge_lora()
        print(f"merged {merged} LoRA layer(s) into dense weights")
    model.save_pretrained(args.out)
    EveProcessor.from_pretrained(args.model_dir).save_pretrained(args.out)
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eve", description="Small VLMs with Elastic Vision FFNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the model path end to end on tiny random parts")
    p.add_argument("--out", default="runs/demo", help="where to save the demo model")
    p.set_defaults(func=_demo)
    p = sub.add_parser("train", help="run one training stage from a YAML recipe")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart/stage1.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=10")
    p.set_defaults(func=_train)
    p = sub.add_parser("export", help="write a model folder, optionally with LoRA merged into dense weights")
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--merge", action="store_true", help="merge LoRA adapters (text path then changes)")
    p.set_defaults(func=_export)
    add_chat_parser(sub)
    add_serve_parser(sub)
    add_eval_parser(sub)
    add_prepare_parser(sub)
    add_quickstart_parser(sub)
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
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
