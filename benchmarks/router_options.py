"""Do the stage-3 routers learn? The router options compared on the quickstart's real parts.

Trains `recipes/quickstart/stage3.yaml` from a saved stage 2 once per variant, for `--steps` optimizer steps
into a temporary folder (nothing is saved under `runs/`), in training mode as the recipe says (bf16
autocast, its capacity factor unless `--capacity-factor` is given, Img-GBPR, straight-through combine, switch
balance loss 0.01), then measures the routing of every EVF layer on `--rows` easy-VQA test questions (eval
mode, the model's own policy at the training capacity; padding positions are routed and counted as text, as
`eve eval routing` does) and prints one JSON line per variant: mean router entropy (nats), share of image and
of text tokens routed to the vision FFN, drop rates, the mean of the per-step training losses over the last
quarter of the steps and the seconds the training took.

Variants (the paper's plain router first; the other three are this project's options):

- `plain`: `evf.router_init=random` (N(0, 0.02)), the base learning rate, no routing loss;
- `router_lr`: the routers in their own optimizer group at `--router-lr`;
- `warm_start`: `evf.router_init=modality` (routers fitted on the image mask before step 1);
- `warm_start+loss`: the warm start, `--router-lr`, and `evf.modality_loss_coef=--loss-coef`.

    python benchmarks/router_options.py --init-from runs/quickstart/stage2 --steps 20 [--capacity-factor 1.5]

Needs the default parts (`eve prepare`). Run nothing else meanwhile: the seconds are the machine's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from eve_vlm.assets import require_assets
from eve_vlm.eval.routing import evaluate_routing
from eve_vlm.eval.vqa import load_vqa_rows
from eve_vlm.model import EveForConditionalGeneration, EveProcessor
from eve_vlm.train.recipe import load_recipe
from eve_vlm.train.stages import run_stage

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"
PLAIN = ["evf.router_init=random", "evf.router_lr=null", "evf.modality_loss_coef=0.0"]


def variants(router_lr: float, loss_coef: float) -> dict[str, list[str]]:
    return {
        "plain": PLAIN,
        "router_lr": [*PLAIN, f"evf.router_lr={router_lr}"],
        "warm_start": [*PLAIN, "evf.router_init=modality"],
        "warm_start+loss": [
            *PLAIN,
            "evf.router_init=modality",
            f"evf.router_lr={router_lr}",
            f"evf.modality_loss_coef={loss_coef}",
        ],
    }


def routing_summary(model_dir: str, rows: list) -> dict:
    model = EveForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = EveProcessor.from_pretrained(model_dir)
    own = next(iter(model.evf_layers.values())).allocation
    metrics = evaluate_routing(model, processor, rows, policies=(own,), batch_size=8, progress=False)
    layers = list(metrics["policies"][own].values())

    def mean(key: str) -> float:
        return round(sum(x[key] for x in layers) / len(layers), 4)

    keys = ("entropy", "vision_routed_image", "vision_routed_text", "drop_rate_image", "drop_rate_text")
    return {"policy": own, **{k: mean(k) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--init-from", required=True, help="a saved stage-2 model, e.g. runs/quickstart/stage2"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--rows", type=int, default=64, help="easy-VQA test questions for the routing figures"
    )
    parser.add_argument("--router-lr", type=float, default=1e-2)
    parser.add_argument("--loss-coef", type=float, default=0.01)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    parser.add_argument(
        "--capacity-factor", type=float, help="training capacity factor (default: the recipe's)"
    )
    args = parser.parse_args()
    rows = load_vqa_rows(str(require_assets()["easy_vqa_test"]), None)
    rows = rows[:: max(1, len(rows) // args.rows)][: args.rows]
    for name, extra in variants(args.router_lr, args.loss_coef).items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [
                f"model.init_from={Path(args.init_from).resolve()}",
                f"training.output_dir={tmp}",
                f"training.max_steps={args.steps}",
                "training.save_steps=0",
                "training.logging_steps=1",
                *extra,
            ]
            if args.capacity_factor is not None:
                overrides.append(f"evf.capacity_factor={args.capacity_factor}")
            recipe = load_recipe(RECIPES / "stage3.yaml", overrides)
            start = time.time()
            with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is JSON only
                summary = run_stage(recipe, log=lambda *a: None)
            seconds = time.time() - start
            losses = [loss for _, loss in summary["loss_history"]]
            tail = losses[-max(1, len(losses) // 4) :]
            line = {
                "variant": name,
                "steps": args.steps,
                "overrides": extra,
                **routing_summary(tmp, rows),
                "train_loss_last_quarter": round(sum(tail) / len(tail), 4),
                "train_seconds": round(seconds, 1),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
