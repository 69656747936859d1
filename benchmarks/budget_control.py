"""A control with stage 3's parameter budget: the same FFNs trained in place, from one quickstart's stage 2.

The quickstart's control trains stage 2's projector and LoRA (6.45M parameters) on stage 3's data; stage 3
trains the projector, the routers and a vision copy of the FFN in every EVF layer (42.92M). This control trains,
on the same data, steps, batch, seed and learning rate as stage 3, the projector and the FFN weights of the same
layers in place (`mlp.{gate,up,down}_proj.base_layer`, stage 2's LoRA on them kept frozen): 41.38M, about stage
3's budget, without the router and the copy. The FFNs are shared with text, so text-only requests no longer run the
base LLM; the language evaluation (the quickstart's, next to the base LLM) measures by how much.

    python benchmarks/budget_control.py --quickstart runs/quickstart [--learning-rate 5e-5 --out NEW_FOLDER]

Output: one JSON line (easy-VQA accuracy overall and per type, paired differences to stage 2, stage 3 and the
control with their standard error over questions, language scores and deltas, trained parameters, train
seconds). The model goes to `--out`, which must be new or empty (a training there would resume). Needs the default parts (`eve prepare`) and a finished `eve quickstart`
(its records must be of the current recipes: `stage3_seeds.py`'s checks); run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # stage3_seeds, when loaded from elsewhere

from stage3_seeds import load_quickstart, paired, refuse  # noqa: E402

from eve_vlm.assets import prepare  # noqa: E402
from eve_vlm.model.configuration import resolve_placement  # noqa: E402
from eve_vlm.quickstart import Evaluator, Run, control_overrides, recipes_dir  # noqa: E402
from eve_vlm.train.recipe import Recipe, load_recipe  # noqa: E402
from eve_vlm.train.stages import DONE_MARKER, run_stage  # noqa: E402

MC_LIMIT, TEXT_CHARS = 100, 20000  # the quickstart's language evaluation (`run_quickstart`'s defaults)


def budget_overrides(
    qs: Path, stage3: Recipe, num_layers: int, out: Path, learning_rate: float | None = None
) -> list[str]:
    """The quickstart's control (stage 2 continued on stage 3's data, steps, batch and seed), training the
    projector and the FFNs of stage 3's EVF layers in place, at stage 3's learning rate (or `learning_rate`)."""
    layers = "|".join(str(i) for i in resolve_placement(stage3.evf.placement, num_layers))
    ffns = rf"\.layers\.({layers})\.mlp\.(gate|up|down)_proj\.base_layer\."
    trainable = [{"pattern": r"^projector\."}, {"pattern": ffns}]
    return [
        *control_overrides(qs, False, stage3),
        "trainable=" + json.dumps(trainable),
        f"training.learning_rate={stage3.training.learning_rate if learning_rate is None else learning_rate}",
        f"training.output_dir={out}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", default="runs/quickstart", help="folder of a finished eve quickstart")
    parser.add_argument("--out", default="runs/budget_control")
    parser.add_argument("--vqa-limit", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, help="default: stage 3's")
    args = parser.parse_args()
    records, stage3 = load_quickstart(args.quickstart, args.vqa_limit)
    qs, out = Path(args.quickstart).resolve(), Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):  # a training there would resume it, whatever the learning rate
        refuse(f"--out {out} is not empty: pass a new folder for each run (or delete it).")
    config = json.loads((qs / "stage2" / "config.json").read_text())
    overrides = budget_overrides(
        qs, stage3, config["text_config"]["num_hidden_layers"], out, args.learning_rate
    )
    recipe = load_recipe(recipes_dir() / "stage2.yaml", overrides)
    start = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's logs: stdout is the result line
        run_stage(recipe, log=print)
    seconds = time.time() - start
    evaluate = Evaluator(prepare(log=lambda *_: None)["paths"], args.vqa_limit, MC_LIMIT, TEXT_CHARS, 1)
    metrics, _ = evaluate(Run("budget-control", 2, (), None), out, out)
    vqa = metrics["vqa"]
    trained = json.loads((out / DONE_MARKER).read_text())["trainable"]
    result = {
        "learning_rate": recipe.training.learning_rate,
        "accuracy": round(vqa["accuracy"], 3),
        "by_type": {kind: round(v["accuracy"], 2) for kind, v in vqa["by_type"].items()},
        **{
            f"budget-{name}": paired(vqa, records[name]["metrics"]["vqa"])
            for name in ("stage2", "stage3", "control")
        },
        "language": metrics["language"],
        "trained_parameters": {pattern: count for pattern, (_, count) in trained.items()},
        "train_s": round(seconds),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
