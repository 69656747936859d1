"""`eve eval vqa|language|routing|all|bench|score`: the evaluation commands (registered by `add_eval_parser`)."""

from __future__ import annotations

import argparse
import json
import os

from eve_vlm.device import add_device_arguments
from eve_vlm.errors import ConfigError, DataError

__all__ = ["add_eval_parser"]

# `eve_vlm.model.allocation.ALLOCATION_POLICIES`, spelled out so building the parser does not import torch
# (a test checks that they agree).
POLICIES = ("rts", "position", "bpr", "gbpr", "img_gbpr", "modality")


def load_model_and_processor(
    model_dir: str, device: str | None = None, dtype: str | None = None, quantize: str | None = None
):
    """An Eve model (eval mode) and its processor from a saved folder, on `device` at `dtype`, quantised or not
    (see `eve_vlm.serve.loading.load_model`: default the GPU when there is one, float32)."""
    from eve_vlm.serve.loading import load_model

    return load_model(model_dir, dtype, device, quantize)


def load_base(path: str, like) -> tuple:
    """The base causal LM in `path` (eval mode) on the device and at the dtype of the model `like`, so the
    language scores compare like with like; returns it and its description."""
    from transformers import AutoModelForCausalLM

    from eve_vlm.device import placement_like

    base = AutoModelForCausalLM.from_pretrained(path, **placement_like(like)).eval()
    return base, f"{path} (AutoModelForCausalLM)"


def _load(args: argparse.Namespace):
    return load_model_and_processor(args.model, args.device, args.dtype, args.quantize)


def _write_json(data: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_describe_options(args) -> None:
    if args.describe_first is not None and not args.describe_first.strip():
        raise ConfigError("--describe-first is empty: give the prompt the model replies to about each image.")
    if args.describe_tokens < 1:
        raise ConfigError(f"--describe-tokens {args.describe_tokens}: give a number of tokens of at least 1.")


def _run_vqa(args, model, processor, out_dir: str) -> dict:
    from eve_vlm.eval.vqa import evaluate_vqa, load_vqa_rows

    rows = load_vqa_rows(args.data, args.images, limit=args.limit)
    result = evaluate_vqa(
        model,
        processor,
        rows,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt_suffix=args.prompt_suffix,
        describe_first=args.describe_first,
        describe_tokens=args.describe_tokens,
        progress=not args.quiet,
    )
    predictions = result.pop("predictions")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vqa_predictions.jsonl"), "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    _write_json(result, os.path.join(out_dir, "vqa_metrics.json"))
    return result


def _run_language(args, model, processor, out_dir: str | None) -> dict:
    from eve_vlm.eval.language import evaluate_language, load_mc_items, load_texts

    if not args.text and not args.mc:
        raise DataError("Nothing to evaluate: give --text FILE and/or --mc FILE.")
    texts = [t for path in args.text or [] for t in load_texts(path)]
    mc = {os.path.splitext(os.path.basename(p))[0]: load_mc_items(p) for p in args.mc or []}
    base, base_name = load_base(args.base, model) if args.base else (None, None)
    result = evaluate_language(
        model,
        processor.text_tokenizer,
        texts,
        mc,
        base,
        chunk_len=args.chunk_len,
        batch_size=args.batch_size,
        base_name=base_name,
        progress=not args.quiet,
    )
    if out_dir:
        _write_json(result, os.path.join(out_dir, "language_metrics.json"))
    return result


def _run_routing(args, model, processor, out_dir: str) -> tuple[dict, list[str]]:
    from eve_vlm.eval.routing import evaluate_routing, plot_routing
    from eve_vlm.eval.vqa import load_vqa_rows

    rows = load_vqa_rows(args.data, args.images)
    result = evaluate_routing(
        model,
        processor,
        rows,
        policies=args.policies,
        capacity=args.capacity,
        batch_size=args.routing_batch_size,
        limit=args.limit,
        progress=not args.quiet,
    )
    _write_json(result, os.path.join(out_dir, "routing_metrics.json"))
    return result, plot_routing(result, out_dir)


def _vqa(args: argparse.Namespace) -> None:
    _check_describe_options(args)
    model, processor = _load(args)
    print(json.dumps(_run_vqa(args, model, processor, args.out), indent=2))


def _language(args: argparse.Namespace) -> None:
    model, processor = _load(args)
    print(json.dumps(_run_language(args, model, processor, args.out), indent=2))


def _routing(args: argparse.Namespace) -> None:
    model, processor = _load(args)
    result, plots = _run_routing(args, model, processor, args.out)
    print(json.dumps({"policies": list(result["policies"]), "plots": plots, "out": args.out}, indent=2))


def _all(args: argparse.Namespace) -> None:
    from eve_vlm.eval.report import write_report

    _check_describe_options(args)
    model, processor = _load(args)
    name = args.name or os.path.basename(os.path.normpath(args.model))
    args.data = args.vqa
    metrics = {"vqa": _run_vqa(args, model, processor, args.out)}
    if args.text or args.mc:
        metrics["language"] = _run_language(args, model, processor, args.out)
    plots = []
    if model.evf_layers:
        metrics["routing"], plots = _run_routing(args, model, processor, args.out)
    report = write_report({name: metrics}, args.out, {name: plots})
    print(f"wrote {report} and {os.path.join(args.out, 'metrics.json')}")


def _bench(args: argparse.Namespace) -> None:
    from eve_vlm.eval.bench import paper_suite
    from eve_vlm.eval.bench.base import require_dir
    from eve_vlm.eval.bench.run import run_bench

    require_dir(
        args.data_root, "the benchmarks in LLaVA's playground/data/eval layout (gqa/, scienceqa/, ...)"
    )
    model, processor = _load(args)
    base, base_name = load_base(args.base, model) if args.base else (None, None)
    report = run_bench(
        paper_suite(),
        model,
        processor,
        data_root=args.data_root,
        out=args.out,
        name=args.name or os.path.basename(os.path.normpath(args.model)),
        benches=args.bench,
        base=base,
        base_name=base_name,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        progress=not args.quiet,
    )
    print(f"wrote {report} and {os.path.join(args.out, 'metrics.json')}")


def _score(args: argparse.Namespace) -> None:
    from eve_vlm.eval.bench import paper_suite
    from eve_vlm.eval.bench.run import score_bench

    print(json.dumps(score_bench(paper_suite(), args.bench, args.predictions, args.data_root), indent=2))


def _add_bench_parsers(sub) -> None:
    p = sub.add_parser("bench", help="the paper's benchmarks: answers files, scores, the paper's table")
    p.add_argument("--suite", default="paper", choices=("paper",), help="benchmark suite")
    p.add_argument("--data-root", required=True, help="folder laid out like LLaVA's playground/data/eval")
    p.add_argument("--model", required=True, help="saved Eve model folder (model + processor)")
    p.add_argument("--out", default="runs/bench", help="output folder (answers/, report.md, metrics.json)")
    p.add_argument("--bench", action="append", help="run only this benchmark (repeatable; default: all nine)")
    p.add_argument("--base", default=None, help="base LLM folder (default: the one recorded at stage 1)")
    p.add_argument("--name", default=None, help="model name in the table (default: the folder name)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="cap on LLaVA's answer lengths (128/1024)"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_arguments(p)
    p.set_defaults(func=_bench)
    p = sub.add_parser("score", help="score a LLaVA answers file of one benchmark (no model loaded)")
    p.add_argument("--bench", required=True, help="gqa, sqa_img, textvqa, pope, mme or mmbench")
    p.add_argument(
        "--predictions", required=True, help="answers file (JSON lines: question_id, prompt, text)"
    )
    p.add_argument("--data-root", required=True, help="folder laid out like LLaVA's playground/data/eval")
    p.set_defaults(func=_score)


def _common(p: argparse.ArgumentParser, *, data: bool = True, out_default: str | None = "runs/eval") -> None:
    p.add_argument("--model", required=True, help="saved Eve model folder (model + processor)")
    if data:
        p.add_argument("--data", required=True, help="LLaVA-format eval file (.json or .jsonl)")
        p.add_argument(
            "--images", default=None, help="folder of the rows' images (default: the file's folder)"
        )
    p.add_argument("--out", default=out_default, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_arguments(p)


def _vqa_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer in tokens")
    p.add_argument("--prompt-suffix", default=None, help="text appended to every question on a new line")
    p.add_argument(
        "--describe-first",
        default=None,
        metavar="PROMPT",
        help="ask each question after the model's own reply to PROMPT about the image, e.g. "
        "'Describe the image in a few words.' (the quickstart's protocol for easy-VQA)",
    )
    p.add_argument("--describe-tokens", type=int, default=32, help="longest description in tokens")


def _language_options(p: argparse.ArgumentParser, batch: bool = True) -> None:
    p.add_argument(
        "--base",
        default=None,
        help="base LLM folder (default: the one recorded in the model at stage 1, checked by sha256)",
    )
    p.add_argument("--text", action="append", help="text file for perplexity (.txt, or .jsonl with 'text')")
    p.add_argument(
        "--mc", action="append", help="multiple-choice JSONL (question, choices, label); repeatable"
    )
    p.add_argument("--chunk-len", type=int, default=512, help="tokens per perplexity chunk")
    if batch:
        p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")


def _routing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policies", nargs="+", default=list(POLICIES), choices=POLICIES, help="allocation policies to run"
    )
    p.add_argument(
        "--capacity",
        default="train",
        choices=("train", "eval"),
        help="capacity factor: each EVF's training one (default) or its eval one",
    )
    p.add_argument(
        "--routing-batch-size", type=int, default=4, help="rows per forward (capacity is per batch)"
    )


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `eve eval vqa|language|routing|all` on the `eve` command's subparsers."""
    parser = subparsers.add_parser(
        "eval", help="evaluate a model: VQA, language vs base LLM, routing, report"
    )
    sub = parser.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("vqa", help="VQA accuracy (VQAv2 normalisation) with predictions JSONL")
    _common(p)
    _vqa_options(p)
    p.set_defaults(func=_vqa)

    p = sub.add_parser("language", help="perplexity and multiple-choice accuracy, model vs base LLM")
    _common(p, data=False, out_default=None)
    _language_options(p)
    p.set_defaults(func=_language)

    p = sub.add_parser("routing", help="EVF routing per layer and allocation policy, with plots")
    _common(p)
    _routing_options(p)
    p.set_defaults(func=_routing)

    p = sub.add_parser("all", help="VQA + language + routing, then report.md and metrics.json")
    p.add_argument("--model", required=True, help="saved Eve model folder (model + processor)")
    p.add_argument("--vqa", required=True, help="LLaVA-format VQA eval file")
    p.add_argument("--images", default=None, help="folder of the rows' images (default: the file's folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=None, help="model name in the report (default: the folder name)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_arguments(p)
    _vqa_options(p)
    _language_options(p, batch=False)
    _routing_options(p)
    p.set_defaults(func=_all)
    _add_bench_parsers(sub)
    return parser
