"""What bf16 and int8 inference on a CPU cost in answers and in the text path, on a trained model.

The model (default `runs/quickstart/stage3`, made by `eve quickstart`) is loaded once per variant and evaluated
as the quickstart evaluates it, on the quickstart's sets (`eve prepare`):
- `fp32`: float32 weights and compute;
- `bf16_autocast`: float32 weights, generation under bf16 autocast (the quickstart report's setting);
- `bf16`: `--dtype bfloat16` (bf16 weights; the EVF routers stay fp32);
- `int8`: `--quantize int8` (dynamic int8 linear layers, `eve_vlm/quantize.py`).
Per variant: easy-VQA accuracy (`Evaluator.vqa`: greedy, 4 new tokens, batches of `VQA_BATCH`, each question
after the model's own caption of its image) on `--vqa-limit` test questions spread over the test split, with
its standard error, and the paired difference to the first variant listed (`fp32` by default) on the same
questions with its standard error; wall time of that VQA run (eval mode, one process, `--threads`); the text
path's perplexity on the held-out fortunes text and its WordNet multiple-choice accuracy, each with its delta
against the base LLM in float32 (the elastic guarantee makes that delta 0 for fp32; a quantised text path is
no longer the base LLM's).

Usage (after `eve quickstart`):

    .venv/bin/python benchmarks/precision_accuracy.py [MODEL_DIR] [--vqa-limit 1000] [--variants fp32,int8]

Output: one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eve_vlm.assets import asset_paths  # noqa: E402
from eve_vlm.quickstart import LANGUAGE_BATCH, Evaluator  # noqa: E402

VARIANTS = {  # name: (dtype, quantize, bf16 autocast)
    "fp32": (None, None, False),
    "bf16_autocast": (None, None, True),
    "bf16": ("bfloat16", None, False),
    "int8": (None, "int8", False),
}


def paired(scores: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-question differences, in points."""
    diffs = [100.0 * (a - b) for a, b in zip(scores, reference, strict=True)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="runs/quickstart/stage3")
    parser.add_argument("--vqa-limit", type=int, default=1000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from eve_vlm.eval.language import evaluate_language, score_language
    from eve_vlm.serve.loading import load_model

    evaluator = Evaluator(asset_paths(), args.vqa_limit, mc_limit=100, text_chars=20000, routing_limit=8)
    base_scores = None
    reference = None

    def language_sets(processor):
        """The tokenizer, texts and multiple-choice sets every language score here is computed on."""
        return processor.text_tokenizer, evaluator.texts, {"wordnet_mc": evaluator.mc}

    for name in args.variants.split(","):
        dtype, quantize, autocast = VARIANTS[name]
        model, processor = load_model(args.model, dtype, "cpu", quantize)
        if base_scores is None:  # the base LLM in float32 on the CPU, whatever the variant
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(evaluator.base_dir, dtype=torch.float32).eval()
            base_scores = score_language(base, *language_sets(processor), batch_size=LANGUAGE_BATCH)
            del base
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
        start = time.perf_counter()
        with context:
            vqa = evaluator.vqa(model, processor, progress=False)
        seconds = time.perf_counter() - start
        scores = [p["accuracy"] for p in vqa.pop("predictions")]
        reference = reference if reference is not None else (name, scores)
        language = evaluate_language(
            model,
            *language_sets(processor),
            base_scores=base_scores,
            base_name=f"{evaluator.base_dir} (float32)",
            batch_size=LANGUAGE_BATCH,
        )
        diff, diff_se = paired(scores, reference[1])
        line = {
            "variant": name,
            "model": args.model,
            "questions": vqa["questions"],
            "accuracy": round(vqa["accuracy"], 2),
            "accuracy_stderr": round(vqa["accuracy_stderr"], 2),
            "by_type": {k: round(v["accuracy"], 1) for k, v in vqa["by_type"].items()},
            f"minus_{reference[0]}": round(diff, 2),
            f"minus_{reference[0]}_stderr": round(diff_se, 2),
            "vqa_seconds": round(seconds, 1),
            "language": language,
            "threads": args.threads,
            "torch": torch.__version__,
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
