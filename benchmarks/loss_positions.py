"""Training step with the LM head at every position against only at the labelled positions.

A training forward with labels computes the LM head (vocabulary 49,152 x 576 for SmolLM2-135M) and the
cross-entropy only at the positions whose next token is a target in some row of the batch (`label_positions`
in `eve_vlm/model/modeling.py`); transformers' causal LMs, and LLaVA's training through them, compute every
position's logits. This times both on the same batches of a quickstart stage, in train mode: forward with
labels, backward, gradients cleared (no optimizer step), bf16 autocast as the stage's recipe says; the stage's
trainable parameters require gradients, the rest are frozen. "every" passes `logits_to_keep` as the tensor of
all positions (so the LM computes every logit and the loss is taken over them as transformers does); "labelled"
is the default path. The two are interleaved batch by batch; the losses are printed to show they agree.
Nothing is dropped: both see the whole sequence in every decoder layer.

    python benchmarks/loss_positions.py --stage 2 --init-from runs/quickstart/stage1
    python benchmarks/loss_positions.py --stage 1

Output: one JSON line (seconds per step for each, their ratio, positions kept, losses, machine). Needs the default
parts (`eve prepare`); timing is the machine's: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage_step import environment  # noqa: E402

from eve_vlm.model.modeling import label_positions  # noqa: E402
from eve_vlm.train.recipe import load_recipe  # noqa: E402
from eve_vlm.train.stages import build_dataset, build_model, collator  # noqa: E402
from eve_vlm.train.trainable import apply_trainable_rules  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2)
    parser.add_argument("--init-from", help="saved model stage 2 starts from (default: the recipe's)")
    parser.add_argument("--batches", type=int, default=4, help="batches, each timed once per round and path")
    parser.add_argument("--rounds", type=int, default=3, help="the first round is left out of the figures")
    args = parser.parse_args()
    overrides = [f"model.init_from={os.path.abspath(args.init_from)}"] if args.init_from else []
    recipe = load_recipe(RECIPES / f"stage{args.stage}.yaml", overrides)
    torch.manual_seed(0)
    model, processor = build_model(recipe)
    apply_trainable_rules(model, recipe.trainable, log=lambda *_: None)
    dataset = build_dataset(recipe, processor, model.config, log=lambda *_: None)
    collate = collator(processor, model.config)
    size = recipe.training.per_device_train_batch_size
    batches = [collate([dataset[i] for i in range(k * size, (k + 1) * size)]) for k in range(args.batches)]
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if recipe.training.bf16 else nullcontext()

    def step(batch: dict, every: bool) -> float:
        keep = torch.arange(batch["input_ids"].shape[1]) if every else 0
        start = time.perf_counter()
        with autocast:
            loss = model(**batch, logits_to_keep=keep).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        seconds[every].append(time.perf_counter() - start)
        return float(loss.detach())

    seconds: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        if round_ == 1:
            seconds = {True: [], False: []}
        for batch in batches:
            for every in (True, False):
                losses[every].append(step(batch, every))
    kept = [len(label_positions(b["labels"])[0]) for b in batches]
    every, labelled = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(
        json.dumps(
            {
                "stage": args.stage,
                "batch": size,
                "bf16": recipe.training.bf16,
                "sequence_lengths": [int(b["input_ids"].shape[1]) for b in batches],
                "positions_kept": kept,
                "s_per_step_every": round(every, 3),
                "s_per_step_labelled": round(labelled, 3),
                "labelled_over_every": round(labelled / every, 3),
                "max_loss_difference": max(
                    abs(a - b) for a, b in zip(losses[True], losses[False], strict=True)
                ),
                "rounds_timed": args.rounds - 1,
                **environment(),
            }
        )
    )


if __name__ == "__main__":
    main()
