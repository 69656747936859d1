"""Stage 3 against the longer-stage-2 control over training seeds, from one quickstart's stage 2.

The quickstart report compares one stage 3 with one control, each a single training run, with the standard
error of sampling questions; it says nothing of how much a second training run of either would move. This
trains the quickstart's stage 3 (`recipes/quickstart/stage3.yaml`) and its control (stage 2 continued on stage
3's data for as many steps; `control_overrides` in `eve_vlm/quickstart.py`) again with other `training.seed`
values, from the stage 2 of an earlier `eve quickstart`, and evaluates each on the quickstart's easy-VQA
questions (the same rows, bf16 autocast, greedy, as `eve quickstart`). The seed changes the order of the
training data and the batches the routers' warm start is fitted on (the vision FFNs start as copies of the
language FFNs whatever the seed). The quickstart's own stage 3 and control (the recipe's seed) are read from
their records and counted as one seed.

    python benchmarks/stage3_seeds.py --quickstart runs/quickstart --seeds 2 3 > seeds-2-3.jsonl
    python benchmarks/stage3_seeds.py --seeds 4 5 --previous seeds-2-3.jsonl > seeds-2-5.jsonl
    python benchmarks/stage3_seeds.py --seeds --previous seeds-2-5.jsonl      # only the summary again
    python benchmarks/stage3_seeds.py --quickstart runs/quickstart-seed2 --quickstart-seed 2 --seeds 4 5

`--quickstart-seed N` reads a quickstart run with `eve quickstart --seed N` (every stage at seed N; its stage 3 and
control count as seed N).

`--previous FILE` counts the seeds of an earlier output of this script (for the same quickstart) without training
them again: its line for the quickstart's own seed must equal this run's, and each seed may appear once.

Output (stdout; the trainer's logs go to stderr): one JSON line per seed, in seed order (accuracy of stage 3 and
control, overall and per question type, paired differences to each other and to stage 2 with the standard error
over questions), then one summary line (mean over seeds and the standard error of that mean across seeds).
Trained models go to `--out`. Needs the default parts (`eve prepare`) and a finished `eve quickstart` (only the
latter when no seed is trained); timing is the machine's: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eve_vlm.assets import prepare  # noqa: E402
from eve_vlm.eval.vqa import paired_difference  # noqa: E402
from eve_vlm.quickstart import (  # noqa: E402
    RECORD,
    Evaluator,
    Run,
    control_overrides,
    recipe_record,
    recipes_dir,
    stage_overrides,
    vqa_settings,
)
from eve_vlm.train.recipe import Recipe, load_recipe  # noqa: E402
from eve_vlm.train.stages import run_stage  # noqa: E402

MODELS = ("stage2", "control", "stage3")
# what a previous output's line for the quickstart's seed must share with this run's
COMPARED = ("seed", "stage2", "stage3", "control", "stage3-control", "stage3-stage2", "control-stage2")
DIFFERENCES = ("stage3-control", "stage3-stage2", "control-stage2")


def refuse(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(2)


def paired(a: dict, b: dict) -> dict:
    """Accuracy of VQA result `a` minus that of `b` on the same questions, with its standard error (points)."""
    d = paired_difference(a["predictions"], b["predictions"])
    return {"difference": round(d["difference"], 3), "se": round(d["stderr"], 3), "questions": d["questions"]}


def mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 3)


def spread(values: list[float]) -> float | None:
    """The standard error of the mean across seeds (None for one seed)."""
    return round(statistics.stdev(values) / len(values) ** 0.5, 3) if len(values) > 1 else None


def load_quickstart(folder: str, vqa_limit: int, seed: int | None = None) -> tuple[dict[str, dict], Recipe]:
    """The records of a finished quickstart's stage 2, control and stage 3, and stage 3's recipe; exits 2 when
    they cannot count as one seed of the current recipes (at every stage's `seed` where the quickstart was run
    with `--seed`), evaluated as the seeds added here would be."""
    qs = Path(folder).resolve()
    again = f"eve quickstart --out {folder}" + (f" --seed {seed}" if seed is not None else "")
    missing = [str(qs / name / RECORD) for name in MODELS if not (qs / name / RECORD).is_file()]
    if missing:
        refuse(f"{', '.join(missing)} not found: run `{again}` first.")
    records = {name: json.loads((qs / name / RECORD).read_text()) for name in MODELS}
    seeded = [f"training.seed={seed}"] if seed is not None else []
    stage3 = load_recipe(recipes_dir() / "stage3.yaml", [*stage_overrides(3, qs, False), *seeded])
    control = load_recipe(recipes_dir() / "stage2.yaml", [*control_overrides(qs, False, stage3), *seeded])
    stale = [
        name
        for name, recipe in (("stage3", stage3), ("control", control))
        if records[name]["key"]["recipe"] != recipe_record(recipe)
    ]
    if stale:  # its records would be counted as one seed of other recipes
        refuse(
            f"{', '.join(stale)} in {qs} were trained from other recipes than the current ones"
            + (f" at seed {seed}" if seed is not None else "")
            + f": run `{again}` again first, or pass the --quickstart-seed it was run with"
            + (" (none for the recipes' seeds)." if seed is not None else ".")
        )
    asked = vqa_settings(vqa_limit)  # how the seeds added here are evaluated; the records must match it
    other = [
        name
        for name, record in records.items()
        if {k: record["key"].get("eval", {}).get(k) for k in asked} != asked
    ]
    if other:  # left padding under bf16 can change a greedy answer with the batch size
        refuse(
            f"{', '.join(other)} in {qs} were evaluated otherwise than the seeds would be ({asked}): run "
            f"`{again}` again first, or pass the --vqa-limit it used."
        )
    return records, stage3


def seed_line(
    seed: int, stage2: dict, stage3: dict, control: dict, train_s: list[float] | None = None
) -> dict:
    """One seed's output line from the VQA results of stage 2, stage 3 and the control."""
    line = {
        "seed": seed,
        "stage2": round(stage2["accuracy"], 3),
        "stage3": round(stage3["accuracy"], 3),
        "control": round(control["accuracy"], 3),
        "stage3-control": paired(stage3, control),
        "stage3-stage2": paired(stage3, stage2),
        "control-stage2": paired(control, stage2),
        "by_type": {  # accuracy per question type, as the quickstart report gives it
            name: {kind: round(v["accuracy"], 2) for kind, v in result["by_type"].items()}
            for name, result in (("stage3", stage3), ("control", control))
        },
    }
    if train_s:
        line["train_s"] = [round(s) for s in train_s]
    return line


def read_previous(path: str, first: dict, seeds: list[int]) -> list[dict]:
    """The per-seed lines of an earlier output of this script for the same quickstart (`first`: this run's line
    for its own seed), less that seed and the seeds this run trains again; exits 2 on any other output."""
    again = "pass an output of this script run on the same --quickstart folder, or leave --previous out"
    try:
        rows = [json.loads(text) for text in Path(path).read_text().splitlines() if text.strip()]
    except (OSError, json.JSONDecodeError) as err:
        refuse(f"--previous {path}: not readable as this script's JSON lines ({err}): {again}.")
    lines = [row for row in rows if isinstance(row, dict) and "seed" in row]  # the summary line has "seeds"
    own = [line for line in lines if line["seed"] == first["seed"]]
    if len(own) != 1:
        refuse(
            f"--previous {path}: {len(own)} lines for the quickstart's seed {first['seed']}, not 1: {again}."
        )
    differ = [
        f"{key}: {own[0].get(key)} there, {first[key]} here"
        for key in COMPARED
        if own[0].get(key) != first[key]
    ]
    if differ:
        refuse(
            f"--previous {path}: its line for seed {first['seed']} differs from this quickstart's "
            f"({'; '.join(differ)}): {again}."
        )
    seen = [line["seed"] for line in lines]
    twice = sorted({seed for seed in seen if seen.count(seed) > 1})
    if twice:
        refuse(f"--previous {path}: seeds {twice} appear more than once: keep one line per seed.")
    questions = first["stage3-stage2"]["questions"]
    other = [
        line["seed"]
        for line in lines
        if line.get("stage2") != first["stage2"]
        or line.get("stage3-stage2", {}).get("questions") != questions
    ]
    if other:
        refuse(
            f"--previous {path}: seeds {other} were scored against another stage 2 or question count: {again}."
        )
    return [line for line in lines if line["seed"] != first["seed"] and line["seed"] not in seeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", default="runs/quickstart", help="folder of a finished eve quickstart")
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[2, 3], help="training seeds to add (none: only summarise)"
    )
    parser.add_argument("--out", default="runs/stage3_seeds")
    parser.add_argument("--vqa-limit", type=int, default=2000)
    parser.add_argument(
        "--previous",
        help="an earlier output of this script, for the same quickstart: its seeds are counted too",
    )
    parser.add_argument(
        "--quickstart-seed",
        type=int,
        help="the --seed the quickstart was run with (default: none, the recipes' own seeds)",
    )
    args = parser.parse_args()
    records, stage3_recipe = load_quickstart(args.quickstart, args.vqa_limit, args.quickstart_seed)
    qs, out = Path(args.quickstart).resolve(), Path(args.out).resolve()
    own_seed = stage3_recipe.training.seed
    if own_seed in args.seeds:
        refuse(f"--seeds {own_seed}: the quickstart's own seed is counted already; pass other seeds.")
    stage2 = records["stage2"]["metrics"]["vqa"]
    first = seed_line(
        own_seed, stage2, records["stage3"]["metrics"]["vqa"], records["control"]["metrics"]["vqa"]
    )
    previous = read_previous(args.previous, first, args.seeds) if args.previous else []

    @functools.cache
    def evaluator() -> Evaluator:  # built when the first seed is trained (a summary alone needs no assets)
        return Evaluator(prepare(log=lambda *_: None)["paths"], args.vqa_limit, 1, 1, 1)

    def train_and_score(name: str, stage: int, overrides: list[str]) -> tuple[dict, float]:
        model_dir = out / name
        recipe = load_recipe(
            recipes_dir() / f"stage{stage}.yaml", [*overrides, f"training.output_dir={model_dir}"]
        )
        start = time.time()
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's logs: stdout is the output lines
            run_stage(recipe, log=lambda *_: None)
        seconds = time.time() - start
        metrics, _ = evaluator()(Run(name, stage, (), None, language=False), model_dir, out)
        return metrics["vqa"], seconds

    lines = [first, *previous]
    for seed in args.seeds:
        stage3, s3_seconds = train_and_score(
            f"stage3-seed{seed}", 3, [*stage_overrides(3, qs, False), f"training.seed={seed}"]
        )
        control, c_seconds = train_and_score(
            f"control-seed{seed}", 2, [*control_overrides(qs, False, stage3_recipe), f"training.seed={seed}"]
        )
        lines.append(seed_line(seed, stage2, stage3, control, [s3_seconds, c_seconds]))
        print(
            f"seed {seed}: stage 3 {stage3['accuracy']:.2f}, control {control['accuracy']:.2f}",
            file=sys.stderr,
        )
    lines.sort(key=lambda line: line["seed"])
    for line in lines:
        print(json.dumps(line), flush=True)
    summary = {key: [line[key] for line in lines] for key in ("stage3", "control")} | {
        key: [line[key]["difference"] for line in lines] for key in DIFFERENCES
    }
    seeds = [line["seed"] for line in lines]
    print(
        json.dumps(
            {
                "seeds": seeds,
                **{k: {"mean": mean(v), "se_across_seeds": spread(v)} for k, v in summary.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
