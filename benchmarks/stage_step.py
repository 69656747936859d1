"""Seconds per optimizer step of a quickstart stage, through the real training path (`run_stage`).

Runs `recipes/quickstart/stage{N}.yaml` for `--steps` steps into a temporary folder (nothing is saved under
`runs/`) and times each step with a `TrainerCallback` (step begin -> step end: data collation of the next
batch is outside the window, forward, backward and optimizer step inside). Prints the median and minimum over
the steps after `--warmup`, with the torch and transformers versions, so two installs can be compared on the
same machine. Stages 2 and 3 start from a saved model: `--init-from runs/quickstart/stage1` (or stage2).

    python benchmarks/stage_step.py --stage 1 --steps 12
    python benchmarks/stage_step.py --stage 3 --init-from runs/quickstart/stage2 --steps 8

Needs the default parts (`eve prepare`). Timing is the machine's: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

from eve_vlm.train.recipe import load_recipe
from eve_vlm.train.stages import run_stage

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def environment() -> dict:
    """The versions and machine a timing was taken with, for a benchmark's JSON line."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=1)
    parser.add_argument("--init-from", help="saved model the stage starts from (stages 2 and 3)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    args = parser.parse_args()
    if args.stage > 1 and not args.init_from:
        parser.error(f"stage {args.stage} starts from a saved model: give --init-from")
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"training.output_dir={out}",
            f"training.max_steps={args.steps}",
            "training.save_steps=0",
            f"training.logging_steps={args.steps}",
        ]
        if args.init_from:
            overrides.append(f"model.init_from={os.path.abspath(args.init_from)}")
        recipe = load_recipe(RECIPES / f"stage{args.stage}.yaml", overrides)
        timer = StepTimer()
        run_stage(recipe, log=lambda *_: None, callbacks=[timer])
    timed = timer.seconds[args.warmup :]
    print(
        json.dumps(
            {
                "stage": args.stage,
                "batch": recipe.training.per_device_train_batch_size,
                "steps_timed": len(timed),
                "s_per_step_median": round(statistics.median(timed), 3),
                "s_per_step_min": round(min(timed), 3),
                **environment(),
            }
        )
    )


if __name__ == "__main__":
    main()
