"""`eve quickstart`: the whole Eve pipeline on real pretrained parts, on a laptop-class CPU.

1. `eve prepare` (idempotent): SmolLM2-135M-Instruct, DINOv2-S, easy-VQA, the language-evaluation sets.
2. Stages 1 -> 2 -> 3 with `recipes/quickstart/stage{1,2,3}.yaml`, each followed by an evaluation:
   easy-VQA test accuracy, text perplexity and multiple-choice accuracy next to the base LLM's (the delta
   must be 0.000: the elastic guarantee), and after stage 3 the routing of every EVF layer under each
   allocation policy.
3. With `--with-baseline`: a LLaVA-style stage 2 that trains the full LLM (no LoRA) from the same stage 1,
   evaluated the same way, so the report shows the language delta the Eve recipe avoids.
4. `runs/quickstart/report.md` (+ `metrics.json`, PNG plots): one row per model, and the wall time per step.

A stage whose model and evaluation a previous run left in the output folder, made from the same recipe and
evaluation settings, is reused rather than redone (and so is everything before it), so an interrupted run
continues where it stopped and `eve quickstart --with-baseline` after `eve quickstart` only adds the baseline.
Delete the output folder to start over.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from eve_vlm.assets import prepare
from eve_vlm.errors import ConfigError

STAGES = (1, 2, 3)
RECORD = "quickstart_record.json"
DEPENDS_ON = {"stage1": None, "stage2": "stage1", "stage3": "stage2", "baseline": "stage1"}
LANGUAGE_BATCH = 8  # sequences per forward when scoring perplexity and multiple choice


def recipes_dir() -> Path:
    """The repository's `recipes/` folder (next to the package in a source checkout)."""
    path = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"
    if not path.is_dir():
        raise ConfigError(f"{path} not found: run eve quickstart from a source checkout (pip install -e .).")
    return path


def stage_overrides(stage: int, out: Path, smoke: bool, init_from: Path | None = None) -> list[str]:
    """Recipe overrides that put a stage's output under `out` (and shrink it for a smoke run)."""
    overrides = [f"training.output_dir={out / f'stage{stage}'}"]
    if stage > 1:
        overrides.append(f"model.init_from={init_from or out / f'stage{stage - 1}'}")
    if smoke:
        overrides += ["training.max_steps=3", "training.save_steps=0", "training.logging_steps=1"]
    return overrides


def baseline_overrides(out: Path, smoke: bool) -> list[str]:
    """Stage 2 the LLaVA way: the full LLM trains, no LoRA."""
    overrides = stage_overrides(2, out, smoke) + [
        f"training.output_dir={out / 'baseline'}",
        "lora=null",
        "trainable=[{pattern: '^projector\\.'}, {pattern: '^language_model\\.'}]",
        "training.learning_rate=5.0e-5",
    ]
    return overrides


class Evaluator:
    """Evaluates saved models on the quickstart sets, computing the base LLM once."""

    def __init__(self, paths: dict, vqa_limit: int, mc_limit: int, text_chars: int, routing_limit: int):
        from eve_vlm.eval.language import load_mc_items, load_texts
        from eve_vlm.eval.vqa import load_vqa_rows

        rows = load_vqa_rows(str(paths["easy_vqa_test"]), None)
        step = max(1, len(rows) // vqa_limit)
        self.vqa_rows = rows[::step][:vqa_limit]  # spread over the whole test split
        text = "\n".join(load_texts(str(paths["lang_text"])))
        self.texts = [text[: text.rfind("\n", 0, text_chars) if len(text) > text_chars else len(text)]]
        self.mc = load_mc_items(str(paths["lang_mc"]))[:mc_limit]
        self.routing_limit = routing_limit
        self.base_dir = str(paths["llm"])
        self.base_scores: dict | None = None

    def base_language_scores(self, tokenizer) -> dict:
        """The base LLM's text and MC scores, computed on first use (every model shares the tokenizer)."""
        from transformers import AutoModelForCausalLM

        from eve_vlm.eval.language import score_language

        if self.base_scores is None:
            base = AutoModelForCausalLM.from_pretrained(self.base_dir).eval()
            self.base_scores = score_language(
                base, tokenizer, self.texts, {"wordnet_mc": self.mc}, batch_size=LANGUAGE_BATCH
            )
        return self.base_scores

    def __call__(self, model_dir: Path, out: Path, routing: bool = False) -> tuple[dict, list[str]]:
        from eve_vlm.eval.cli import load_model_and_processor
        from eve_vlm.eval.language import evaluate_language
        from eve_vlm.eval.routing import evaluate_routing, plot_routing
        from eve_vlm.eval.vqa import evaluate_vqa

        model, processor = load_model_and_processor(str(model_dir))
        vqa = evaluate_vqa(model, processor, self.vqa_rows, batch_size=16, max_new_tokens=4, progress=True)
        vqa.pop("predictions", None)
        language = evaluate_language(
            model,
            processor.tokenizer,
            self.texts,
            {"wordnet_mc": self.mc},
            base_scores=self.base_language_scores(processor.tokenizer),
            base_name="SmolLM2-135M-Instruct",
            batch_size=LANGUAGE_BATCH,
        )
        metrics, plots = {"vqa": vqa, "language": language}, []
        if routing and model.evf_layers:
            metrics["routing"] = evaluate_routing(
                model, processor, self.vqa_rows, limit=self.routing_limit, batch_size=8, progress=False
            )
            plots = plot_routing(metrics["routing"], out, prefix=f"{model_dir.name}_")
        return metrics, plots


def load_record(model_dir: Path, key: dict) -> dict | None:
    """The record of a finished stage in `model_dir` when it was made with the same `key` (recipe and
    evaluation settings), else None."""
    from eve_vlm.train.stages import DONE_MARKER

    path = model_dir / RECORD
    if not (path.is_file() and (model_dir / DONE_MARKER).is_file()):
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def save_record(model_dir: Path, record: dict) -> None:
    """Writes a stage's record atomically, after its model and evaluation are complete."""
    tmp = model_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, model_dir / RECORD)


def run_quickstart(
    out: str = "runs/quickstart",
    *,
    with_baseline: bool = False,
    smoke: bool = False,
    vqa_limit: int = 500,
    mc_limit: int = 100,
    text_chars: int = 20000,
    routing_limit: int = 64,
    log=print,
) -> Path:
    """Runs the pipeline and returns the report path."""
    from eve_vlm.eval.report import write_report
    from eve_vlm.train.recipe import load_recipe
    from eve_vlm.train.stages import run_stage

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.time()
    paths = prepare(log=log)["paths"]
    timings["prepare"] = time.time() - start
    if smoke:
        vqa_limit, mc_limit, text_chars, routing_limit = 16, 8, 2000, 8
    evaluate = Evaluator(paths, vqa_limit, mc_limit, text_chars, routing_limit)
    metrics: dict[str, dict] = {}
    plots: dict[str, list[str]] = {}
    runs = [(f"stage{s}", s, stage_overrides(s, out_dir, smoke)) for s in STAGES]
    if with_baseline:
        runs.append(("baseline", 2, baseline_overrides(out_dir, smoke)))
    settings = {"vqa": vqa_limit, "mc": mc_limit, "text_chars": text_chars, "routing": routing_limit}
    redone: set[str] = set()
    reused: list[str] = []
    for name, stage, overrides in runs:
        recipe = load_recipe(recipes_dir() / f"stage{stage}.yaml", overrides)
        key = json.loads(json.dumps({"recipe": asdict(recipe), "eval": settings}))
        record = None if DEPENDS_ON[name] in redone else load_record(out_dir / name, key)
        if record is not None:
            log(f"== {name}: reusing the model and evaluation of an earlier run in {out_dir / name} ==")
            metrics[name], plots[name] = record["metrics"], record["plots"]
            timings.update(record["timings"])
            reused.append(name)
            continue
        redone.add(name)
        t0 = time.time()
        log(f"== {name}: training ==")
        run_stage(recipe, log=log)
        stage_timings = {f"{name} train": time.time() - t0}
        t0 = time.time()
        log(f"== {name}: evaluating ==")
        metrics[name], plots[name] = evaluate(out_dir / name, out_dir, routing=(stage == 3))
        stage_timings[f"{name} eval"] = time.time() - t0
        timings.update(stage_timings)
        record = {"key": key, "metrics": metrics[name], "plots": plots[name], "timings": stage_timings}
        save_record(out_dir / name, record)
    timings["total"] = sum(timings.values())
    report = write_report(metrics, out_dir, plots)
    with open(report, "a", encoding="utf-8") as f:
        f.write(timing_section(timings, smoke, reused))
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    log(f"report: {report}")
    return Path(report)


def timing_section(timings: dict[str, float], smoke: bool, reused: list[str] | None = None) -> str:
    """The wall-time table appended to the report (`total` is the sum of the steps)."""
    import platform

    import torch
    import transformers

    lines = [
        "",
        "## Wall time",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}"
        + (" (smoke run: a few steps per stage)." if smoke else "."),
        "",
    ]
    if reused:
        lines += [
            f"Reused from an earlier run in this folder, with the times measured then: {', '.join(reused)}.",
            "",
        ]
    lines += [
        "| step | seconds | minutes |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v:.0f} | {v / 60:.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def add_quickstart_parser(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="prepare, train stages 1-3 on real parts, evaluate, report")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--with-baseline", action="store_true", help="also train a full-LLM stage 2 (LLaVA-style)")
    p.add_argument("--smoke", action="store_true", help="a few steps per stage and tiny evaluations")
    p.add_argument("--vqa-limit", type=int, default=500, help="easy-VQA test questions evaluated")
    p.set_defaults(
        func=lambda a: run_quickstart(
            a.out, with_baseline=a.with_baseline, smoke=a.smoke, vqa_limit=a.vqa_limit
        )
    )
