"""`eve quickstart`: the whole Eve pipeline on real pretrained parts, on a laptop-class CPU.

1. `eve prepare` (idempotent): SmolLM2-135M-Instruct, DINOv2-S, easy-VQA, the language-evaluation sets.
2. Stages 1 -> 2 -> 3 with `recipes/quickstart/stage{1,2,3}.yaml`, and a **control**: stage 2 continued from
   its own result on stage 3's data, steps, batch, seed and learning-rate schedule (its own parameters and peak
   learning rate), so the report shows whether stage 3 beats simply training stage 2 longer on the same data.
   Each model is evaluated: easy-VQA test accuracy on
   the same `vqa_limit` questions (each asked after the model's own caption of its image, `Evaluator.vqa`;
   greedy, under bf16 autocast; with its standard error, and paired
   differences between models; stage 1, trained on captions only, gets no VQA evaluation), text perplexity
   and multiple-choice accuracy next to the base LLM's (the delta must be 0.000: the elastic guarantee; not
   for the control, whose text path is stage 2's), and
   after stage 3 the routing of every EVF layer under each allocation policy (at stage 3's training capacity,
   where with 2 experts and factor 2.0 nothing is dropped: only `modality` differs there).
3. With `--with-baseline`: a LLaVA-style stage 2 that trains the full LLM (no LoRA) from the same stage 1,
   evaluated the same way, so the report shows the language delta the Eve recipe avoids.
4. With `--ablation`: stage 3 trained once per token-allocation policy (`ABLATION_POLICIES`) from the same
   stage 2, at the paper code's training capacity factor (`ABLATION_CAPACITY`) for a quarter of stage 3's steps, on
   stage 2's conversations and batch (where an expert is asked for more than its capacity, so the policies differ in
   what they drop), with stage 3's recipe otherwise; each is evaluated on the same questions, with its routing
   under its own policy: the paper's Fig. 3 comparison, trained.
5. `runs/quickstart/report.md` (+ `metrics.json`, PNG plots): one row per model, and the wall time per step.

A model that a previous run left in the output folder, trained from the same recipe and finished after the
model it starts from (make's rule), is reused rather than retrained, and its evaluation too when the
evaluation settings are the same; so `eve quickstart --ablation` after `eve quickstart` only adds the
ablation. A training that was interrupted resumes from its last checkpoint; one whose recipe or parent changed
starts over (its old checkpoints are removed). Delete the output folder to start over entirely.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from eve_vlm.assets import prepare
from eve_vlm.data.builtin.easy_vqa import CAPTION_PROMPT
from eve_vlm.device import add_device_arguments
from eve_vlm.errors import ConfigError
from eve_vlm.quickstart_report import (
    ABLATION_POLICIES,
    ablation_rows,
    ablation_section,
    comparison_section,
    comparisons,
    timing_section,
    training_section,
)

if TYPE_CHECKING:
    from eve_vlm.train.recipe import Recipe

RECORD = "quickstart_record.json"
PENDING = "quickstart_training.json"  # the recipe of a training under way (an interrupted run resumes it)
LANGUAGE_BATCH = 8  # sequences per forward when scoring perplexity and multiple choice
VQA_BATCH = 64  # questions per generate call (32 and 64 gave the same accuracy on 500 questions)
VQA_BF16 = True  # greedy answers under bf16 autocast, as stages 2 and 3 train (about 2x faster on a CPU)
# easy-VQA is asked describe-first: each question follows the model's own caption of its image (the caption
# turn that opens every training conversation of stages 2 and 3; README, "Describe, then answer").
DESCRIBE_TOKENS = 16  # the captions are 3-4 words
# The capacity policies (rts, bpr, gbpr, img_gbpr) differ only in which tokens an expert over capacity drops,
# and the quickstart's stage 3 drops nothing (capacity factor 2.0 with 2 experts); `modality` routes by the
# image mask with no capacity limit. The ablation trains at the paper code's training capacity factor, for a
# quarter of stage 3's steps (24 of 96, as many as when stage 3 had 48), on stage 2's conversations, where the
# language FFN is asked for more than its capacity (the README states the wall time measured).
ABLATION_CAPACITY = 1.5
ABLATION_STEP_FRACTION = 0.25


@dataclass(frozen=True)
class Run:
    """One trained model of the quickstart: its recipe, what it is built from and how it is evaluated."""

    name: str
    stage: int
    overrides: tuple[str, ...]
    depends_on: str | None
    vqa: bool = True
    language: bool = True
    routing: Literal["all", "own"] | None = None  # every allocation policy, or the model's own
    folder: str = ""  # under the output folder; `name` when empty

    def __post_init__(self) -> None:
        if self.routing not in ("all", "own", None):
            raise ValueError(f"Run.routing={self.routing!r}: use 'all', 'own' or None")

    def model_dir(self, out: Path) -> Path:
        """Where the run's model, checkpoints and record live."""
        return out / (self.folder or self.name)


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
        overrides += [
            "training.max_steps=3",
            "training.save_steps=0",
            "training.logging_steps=1",
            "training.per_device_train_batch_size=4",
        ]
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


def recipe_record(recipe: Recipe) -> dict:
    """A recipe as its run's record keeps it (JSON types), to compare with the recipe a record was made from."""
    return json.loads(json.dumps(asdict(recipe)))


def data_overrides(recipe: Recipe) -> list[str]:
    """Recipe overrides that give another stage `recipe`'s data: its sources, template and length."""
    d = recipe.data
    return [
        "data.sources=" + json.dumps([asdict(s) for s in d.sources]),
        f"data.template={d.template}",
        f"data.max_length={d.max_length}",
    ]


def control_overrides(out: Path, smoke: bool, stage3: Recipe) -> list[str]:
    """Stage 2 continued from its own result on stage 3's data, steps, batch (and accumulation), seed and
    learning-rate schedule (warm-up and decay), with stage 2's peak learning rate and trainable parameters
    (projector and LoRA): the same extra training as stage 3, spent on stage 2's parameters instead of the vision
    FFNs. (Stage 2's system prompt is kept; it is the one stage 3 inherits.) Its checkpoint interval is stage 3's,
    so an interrupted control resumes as stage 3 does."""
    t = stage3.training
    return stage_overrides(2, out, smoke, init_from=out / "stage2") + [
        f"training.output_dir={out / 'control'}",
        f"training.max_steps={t.max_steps}",
        f"training.warmup_ratio={t.warmup_ratio}",
        f"training.lr_scheduler_type={t.lr_scheduler_type}",
        f"training.per_device_train_batch_size={t.per_device_train_batch_size}",
        f"training.gradient_accumulation_steps={t.gradient_accumulation_steps}",
        f"training.seed={t.seed}",
        f"training.save_steps={t.save_steps}",
        *data_overrides(stage3),
    ]


def ablation_overrides(out: Path, smoke: bool, policy: str, stage3: Recipe, stage2: Recipe) -> list[str]:
    """Stage 3 with another allocation policy, at `ABLATION_CAPACITY`, for a fraction of its steps, on stage 2's
    conversations (sources, template, length and batch): there an image is 16 of about 130 tokens, so once the
    routers split by modality the language FFN is asked for more than its capacity and each policy has to
    choose which tokens to drop. (In stage 3's own caption turns text is about 64% of the tokens, under the 75%
    capacity: the four capacity policies would train identically there.)"""
    steps = max(1, round(stage3.training.max_steps * ABLATION_STEP_FRACTION))
    conversations = [
        *data_overrides(stage2),
        f"training.per_device_train_batch_size={stage2.training.per_device_train_batch_size}",
    ]
    return (
        conversations
        + stage_overrides(3, out, smoke)
        + [  # a smoke run's batch comes last
            f"training.output_dir={out / 'ablation' / policy}",
            f"evf.allocation={policy}",
            f"evf.capacity_factor={ABLATION_CAPACITY}",
            f"training.max_steps={steps}",
        ]
    )


def plan_runs(
    out: Path, smoke: bool, with_baseline: bool, ablation: bool, seed: int | None = None
) -> list[Run]:
    """The models of one quickstart, in training order; `seed` replaces every recipe's training seed (the
    control and the ablation take stage 3's)."""
    from eve_vlm.train.recipe import load_recipe

    seeded = (f"training.seed={seed}",) if seed is not None else ()
    stage3 = load_recipe(recipes_dir() / "stage3.yaml", [*stage_overrides(3, out, smoke), *seeded])
    stage2 = load_recipe(recipes_dir() / "stage2.yaml", [*stage_overrides(2, out, smoke), *seeded])
    runs = [
        Run("stage1", 1, tuple(stage_overrides(1, out, smoke)), None, vqa=False),
        Run("stage2", 2, tuple(stage_overrides(2, out, smoke)), "stage1"),
        # The control's text path is stage 2's, the base LLM's by construction (its LoRA is off without an
        # image), so its language is not measured again: the quickstart's time goes to its VQA.
        Run("control", 2, tuple(control_overrides(out, smoke, stage3)), "stage2", language=False),
        Run("stage3", 3, tuple(stage_overrides(3, out, smoke)), "stage2", routing="own"),
    ]
    if with_baseline:
        runs.append(Run("baseline", 2, tuple(baseline_overrides(out, smoke)), "stage1"))
    if ablation:
        runs += [
            Run(
                f"ablation-{policy}",
                3,
                tuple(ablation_overrides(out, smoke, policy, stage3, stage2)),
                "stage2",
                language=False,
                routing="own",
                folder=f"ablation/{policy}",
            )
            for policy in ABLATION_POLICIES
        ]
    return [replace(run, overrides=run.overrides + seeded) for run in runs]


class Evaluator:
    """Evaluates saved models on the quickstart sets, computing the base LLM once."""

    def __init__(
        self,
        paths: dict,
        vqa_limit: int,
        mc_limit: int,
        text_chars: int,
        routing_limit: int,
        device: str | None = None,
        dtype: str | None = None,
    ):
        from eve_vlm.data.llava import DataSource, load_rows
        from eve_vlm.eval.language import load_mc_items, load_texts
        from eve_vlm.eval.vqa import load_vqa_rows

        rows = load_vqa_rows(str(paths["easy_vqa_test"]), None)
        step = max(1, len(rows) // vqa_limit)
        self.vqa_rows = rows[::step][:vqa_limit]  # spread over the whole test split
        # Routing is measured on stage 2's conversations (the caption turn, then up to 4 questions of every
        # type): capacity and drops depend on the image's share of the tokens, which is larger in a single test
        # question. Stage 3 trains on the caption turns alone (an image is about a third of their tokens).
        source = DataSource(str(paths["easy_vqa_dialogues"]), None, 1.0)
        dialogues = load_rows([source], check_images=False).rows
        self.routing_rows = dialogues[:: max(1, len(dialogues) // routing_limit)][:routing_limit]
        text = "\n".join(load_texts(str(paths["lang_text"])))
        self.texts = [text[: text.rfind("\n", 0, text_chars) if len(text) > text_chars else len(text)]]
        self.mc = load_mc_items(str(paths["lang_mc"]))[:mc_limit]
        self.routing_limit = routing_limit
        self.base_dir = str(paths["llm"])
        self.base_scores: dict | None = None
        self.device, self.dtype = device, dtype

    def base_language_scores(self, tokenizer, like) -> dict:
        """The base LLM's text and MC scores, computed on first use (every model shares the tokenizer), with the
        base on the device and at the dtype of the model `like`."""
        from eve_vlm.eval.cli import load_base
        from eve_vlm.eval.language import score_language

        if self.base_scores is None:
            base, _ = load_base(self.base_dir, like)
            self.base_scores = score_language(
                base, tokenizer, self.texts, {"wordnet_mc": self.mc}, batch_size=LANGUAGE_BATCH
            )
        return self.base_scores

    def __call__(self, run: Run, model_dir: Path, out: Path) -> tuple[dict, list[str]]:
        """`{"vqa" (with its `predictions`), "language", "routing"}` as `run` asks, and the plot paths."""
        import torch

        from eve_vlm.eval.cli import load_model_and_processor
        from eve_vlm.eval.language import evaluate_language

        model, processor = load_model_and_processor(str(model_dir), self.device, self.dtype)
        metrics, plots = {}, []
        if run.vqa:
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=VQA_BF16):
                metrics["vqa"] = self.vqa(model, processor)
        if run.language:
            metrics["language"] = evaluate_language(
                model,
                processor.text_tokenizer,
                self.texts,
                {"wordnet_mc": self.mc},
                base_scores=self.base_language_scores(processor.text_tokenizer, model),
                base_name="SmolLM2-135M-Instruct",
                batch_size=LANGUAGE_BATCH,
            )
        if run.routing and model.evf_layers:
            metrics["routing"], plots = self.routing(run, model, processor, model_dir, out)
        return metrics, plots

    def vqa(self, model, processor, progress: bool = True, describe_first: bool = True) -> dict:
        """easy-VQA on `vqa_rows` as the quickstart asks it: greedy, at most 4 new tokens, each question after
        the model's own caption of its image (`CAPTION_PROMPT`, at most `DESCRIBE_TOKENS`), or in one turn
        when `describe_first` is False."""
        from eve_vlm.eval.vqa import evaluate_vqa

        return evaluate_vqa(
            model,
            processor,
            self.vqa_rows,
            batch_size=VQA_BATCH,
            max_new_tokens=4,
            describe_first=CAPTION_PROMPT if describe_first else None,
            describe_tokens=DESCRIBE_TOKENS,
            progress=progress,
        )

    def routing(self, run: Run, model, processor, model_dir: Path, out: Path) -> tuple[dict, list[str]]:
        """Routing statistics on `routing_rows` in batches of 8 (as in `eve eval routing`): under every
        allocation policy with plots, or under the model's own policy."""
        from eve_vlm.eval.routing import POLICIES, evaluate_routing, plot_routing

        own = next(iter(model.evf_layers.values())).allocation
        metrics = evaluate_routing(
            model,
            processor,
            self.routing_rows,
            policies=POLICIES if run.routing == "all" else (own,),
            batch_size=8,
            progress=False,
        )
        plots = plot_routing(metrics, out, prefix=f"{model_dir.name}_") if run.routing == "all" else []
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


def trained_summary(model_dir: Path, recipe: dict) -> dict | None:
    """The training summary of a finished model in `model_dir` trained from exactly `recipe`, else None."""
    from eve_vlm.train.stages import DONE_MARKER

    try:
        summary = json.loads((model_dir / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("recipe") == recipe else None


def up_to_date(model_dir: Path, parent_dir: Path | None) -> bool:
    """Whether the model in `model_dir` was finished after the model it starts from (make's rule): a parent
    retrained since, in this run or an interrupted one, makes it stale."""
    from eve_vlm.train.stages import DONE_MARKER

    done = model_dir / DONE_MARKER
    if not done.is_file():
        return False
    return parent_dir is None or done.stat().st_mtime >= (parent_dir / DONE_MARKER).stat().st_mtime


def clear_for_training(model_dir: Path, recipe: dict, parent_dir: Path | None) -> None:
    """Removes what an earlier, different training left in `model_dir` (its checkpoints, which the stage would
    otherwise resume from, its finished marker and record), unless they belong to an interrupted training of
    the same recipe from the same parent; then notes the training under way in `PENDING`."""
    from eve_vlm.train.stages import DONE_MARKER

    pending = model_dir / PENDING
    try:
        same = json.loads(pending.read_text()) == recipe and (
            parent_dir is None or pending.stat().st_mtime >= (parent_dir / DONE_MARKER).stat().st_mtime
        )
    except (OSError, ValueError):
        same = False
    if not same:
        for checkpoint in model_dir.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        for name in (DONE_MARKER, RECORD):
            (model_dir / name).unlink(missing_ok=True)
        model_dir.mkdir(parents=True, exist_ok=True)
        pending.write_text(json.dumps(recipe))


def vqa_settings(vqa_limit: int) -> dict:
    """How the quickstart asks easy-VQA, as its records keep it: the question count, the describe-first prompt
    and its token budget, the batch size and bf16 (left padding under bf16 can change a greedy answer with the
    batch size). A record whose settings differ was scored otherwise."""
    return {
        "vqa": vqa_limit,
        "describe_first": CAPTION_PROMPT,
        "describe_tokens": DESCRIBE_TOKENS,
        "vqa_batch": VQA_BATCH,
        "vqa_bf16": VQA_BF16,
    }


def train_or_reuse(run: Run, out_dir: Path, settings: dict, evaluate: Evaluator, log=print) -> dict:
    """Trains and evaluates one run, or reuses what an earlier run left: the evaluation when the recipe and
    the evaluation settings match, the model alone when the recipe matches; nothing when the model is older
    than the one it starts from. Returns `{"metrics", "plots", "timings", "reused"}` (`reused`: a label for
    the report, or None)."""
    from eve_vlm.train.recipe import load_recipe
    from eve_vlm.train.stages import run_stage

    model_dir = run.model_dir(out_dir)
    parent_dir = out_dir / run.depends_on if run.depends_on else None
    recipe = load_recipe(recipes_dir() / f"stage{run.stage}.yaml", list(run.overrides))
    recipe_dict = recipe_record(recipe)
    evals = {"vqa": run.vqa, "language": run.language, "routing": run.routing}
    key = {
        "recipe": recipe_dict,
        "eval": {**settings, "parts": evals},
    }
    current = up_to_date(model_dir, parent_dir)
    record = load_record(model_dir, key) if current else None
    if record is not None:
        log(f"== {run.name}: reusing the model and evaluation of an earlier run in {model_dir} ==")
        return {**{k: record[k] for k in ("metrics", "plots", "timings")}, "reused": run.name}
    summary = trained_summary(model_dir, recipe_dict) if current else None
    if summary is not None:
        log(f"== {run.name}: reusing the model an earlier run trained in {model_dir} ==")
        timings = {f"{run.name} train": float(summary["seconds"])}
        reused = f"{run.name} (training)"
    else:
        clear_for_training(model_dir, recipe_dict, parent_dir)
        t0 = time.time()
        log(f"== {run.name}: training ==")
        run_stage(recipe, log=log)
        (model_dir / PENDING).unlink(missing_ok=True)
        timings = {f"{run.name} train": time.time() - t0}
        reused = None
    t0 = time.time()
    log(f"== {run.name}: evaluating ==")
    metrics, plots = evaluate(run, model_dir, out_dir)
    timings[f"{run.name} eval"] = time.time() - t0
    save_record(model_dir, {"key": key, "metrics": metrics, "plots": plots, "timings": timings})
    return {"metrics": metrics, "plots": plots, "timings": timings, "reused": reused}


def run_quickstart(
    out: str = "runs/quickstart",
    *,
    with_baseline: bool = False,
    ablation: bool = False,
    smoke: bool = False,
    vqa_limit: int = 2000,
    mc_limit: int = 100,
    text_chars: int = 20000,
    routing_limit: int = 64,
    device: str | None = None,
    dtype: str | None = None,
    seed: int | None = None,
    log=print,
) -> Path:
    """Runs the pipeline and returns the report path.

    Args:
        seed: Every stage's training seed instead of its recipe's (another training run of the whole job).
        device: Where the evaluations load each model (`eve_vlm/device.py`; default the GPU when there is
            one); training runs where transformers' Trainer puts it (the GPU when there is one).
        dtype: The dtype the evaluations load each model in (default float32).
    """
    from eve_vlm.eval.report import write_report
    from eve_vlm.train.stages import DONE_MARKER

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.time()
    paths = prepare(log=log)["paths"]
    timings["prepare"] = time.time() - start
    if smoke:
        vqa_limit, mc_limit, text_chars, routing_limit = 16, 8, 2000, 8
    evaluate = Evaluator(paths, vqa_limit, mc_limit, text_chars, routing_limit, device, dtype)
    metrics: dict[str, dict] = {}
    plots: dict[str, list[str]] = {}
    settings = {
        **vqa_settings(vqa_limit),
        "mc": mc_limit,
        "text_chars": text_chars,
        "routing": routing_limit,
        "routing_rows": "train_dialogues_described",
    }
    if dtype not in (None, "float32"):
        settings["dtype"] = dtype  # absent: float32, as in the records of runs before the option
    reused: list[str] = []
    runs = plan_runs(out_dir, smoke, with_baseline, ablation, seed)
    for run in runs:
        outcome = train_or_reuse(run, out_dir, settings, evaluate, log)
        metrics[run.name], plots[run.name] = outcome["metrics"], outcome["plots"]
        timings.update(outcome["timings"])
        if outcome["reused"]:
            reused.append(outcome["reused"])
    extra = sum(v for k, v in timings.items() if k.startswith("ablation-"))
    timings["total"] = sum(timings.values()) - extra
    if extra:
        timings["ablation (not in total)"] = extra
    pairs = comparisons(metrics)
    main = {n: m for n, m in metrics.items() if not n.startswith("ablation-")}
    trained = {  # the training summary of each model in the main table
        run.name: json.loads((run.model_dir(out_dir) / DONE_MARKER).read_text())
        for run in runs
        if run.name in main
    }
    report = write_report(main, out_dir, plots)
    with open(report, "a", encoding="utf-8") as f:
        f.write(training_section(trained))
        f.write(comparison_section(pairs))
        if ablation:
            f.write(ablation_section(metrics, timings, out_dir, ABLATION_CAPACITY, ABLATION_STEP_FRACTION))
        f.write(timing_section(timings, smoke, reused))
    summary_path = out_dir / "metrics.json"
    saved = json.loads(summary_path.read_text())
    saved["comparisons"] = pairs
    if ablation:
        saved["ablation"] = ablation_rows(metrics, timings)
    summary_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    log(f"report: {report}")
    return Path(report)


def add_quickstart_parser(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="prepare, train stages 1-3 on real parts, evaluate, report")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--with-baseline", action="store_true", help="also train a full-LLM stage 2 (LLaVA-style)")
    p.add_argument(
        "--ablation",
        action="store_true",
        help=f"also train stage 3 once per allocation policy ({', '.join(ABLATION_POLICIES)})",
    )
    p.add_argument("--smoke", action="store_true", help="a few steps per stage and tiny evaluations")
    p.add_argument("--vqa-limit", type=int, default=2000, help="easy-VQA test questions evaluated")
    p.add_argument(
        "--seed",
        type=int,
        help="every stage's training seed instead of its recipe's (another run of the whole job: use another --out)",
    )
    add_device_arguments(
        p, suffix="; for the evaluations (training goes where the Trainer puts it)", quantize=False
    )
    p.set_defaults(
        func=lambda a: run_quickstart(
            a.out,
            with_baseline=a.with_baseline,
            ablation=a.ablation,
            smoke=a.smoke,
            vqa_limit=a.vqa_limit,
            device=a.device,
            dtype=a.dtype,
            seed=a.seed,
        )
    )
