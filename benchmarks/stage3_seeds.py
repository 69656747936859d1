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

    python benchmarks/stage3_seeds.py --quickstart runs/quickstart --seeds 2 3

Output: one JSON line per seed (accuracy of stage 3 and control, overall and per question type, paired
differences to each other and to stage 2 with the standard error over questions), then one summary line (mean
over seeds and the standard error of that mean across seeds). Trained models go to `--out`. Needs the default
parts (`eve prepare`) and a finished `eve quickstart`; timing is the machine's: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

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
from eve_vlm.train.recipe import load_recipe  # noqa: E402
from eve_vlm.train.stages import run_stage  # noqa: E402


def paired(a: dict, b: dict) -> dict:
    """Accuracy of VQA result `a` minus that of `b` on the same questions, with its standard error (points)."""
    d = paired_difference(a["predictions"], b["predictions"])
    return {"difference": round(d["difference"], 3), "se": round(d["stderr"], 3), "questions": d["questions"]}


def mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", default="runs/quickstart", help="folder of a finished eve quickstart")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 3], help="training seeds to add")
    parser.add_argument("--out", default="runs/stage3_seeds")
    parser.add_argument("--vqa-limit", type=int, default=2000)
    args = parser.parse_args()
    qs, out = Path(args.quickstart).resolve(), Path(args.out).resolve()
    missing = [
        str(qs / name / RECORD)
        for name in ("stage2", "control", "stage3")
        if not (qs / name / RECORD).is_file()
    ]
    if missing:
        print(
            f"{', '.join(missing)} not found: run `eve quickstart --out {args.quickstart}` first.",
            file=sys.stderr,
        )
        sys.exit(2)
    records = {name: json.loads((qs / name / RECORD).read_text()) for name in ("stage2", "control", "stage3")}
    stage2 = records["stage2"]["metrics"]["vqa"]
    stage3_recipe = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, qs, False))
    control_recipe = load_recipe(recipes_dir() / "stage2.yaml", control_overrides(qs, False, stage3_recipe))
    stale = [
        name
        for name, recipe in (("stage3", stage3_recipe), ("control", control_recipe))
        if records[name]["key"]["recipe"] != recipe_record(recipe)
    ]
    if stale:  # its records would be counted as one seed of other recipes
        print(
            f"{', '.join(stale)} in {qs} were trained from other recipes than the current ones: run "
            f"`eve quickstart --out {args.quickstart}` again first.",
            file=sys.stderr,
        )
        sys.exit(2)
    asked = vqa_settings(args.vqa_limit)  # how the seeds added here are evaluated; the records must match it
    other = [
        name
        for name, record in records.items()
        if {k: record["key"].get("eval", {}).get(k) for k in asked} != asked
    ]
    if other:  # left padding under bf16 can change a greedy answer with the batch size
        print(
            f"{', '.join(other)} in {qs} were evaluated otherwise than the seeds would be ({asked}): run "
            f"`eve quickstart --out {args.quickstart}` again first, or pass the --vqa-limit it used.",
            file=sys.stderr,
        )
        sys.exit(2)
    evaluate = Evaluator(prepare(log=lambda *_: None)["paths"], args.vqa_limit, 1, 1, 1)

    def train_and_score(name: str, stage: int, overrides: list[str]) -> tuple[dict, float]:
        model_dir = out / name
        recipe = load_recipe(
            recipes_dir() / f"stage{stage}.yaml", [*overrides, f"training.output_dir={model_dir}"]
        )
        start = time.time()
        run_stage(recipe, log=lambda *_: None)
        seconds = time.time() - start
        metrics, _ = evaluate(Run(name, stage, (), None, language=False), model_dir, out)
        return metrics["vqa"], seconds

    rows = [
        {
            "seed": stage3_recipe.training.seed,
            "stage3": records["stage3"]["metrics"]["vqa"],
            "control": records["control"]["metrics"]["vqa"],
        }
    ]
    for seed in args.seeds:
        stage3, s3_seconds = train_and_score(
            f"stage3-seed{seed}", 3, [*stage_overrides(3, qs, False), f"training.seed={seed}"]
        )
        control, c_seconds = train_and_score(
            f"control-seed{seed}", 2, [*control_overrides(qs, False, stage3_recipe), f"training.seed={seed}"]
        )
        rows.append({"seed": seed, "stage3": stage3, "control": control, "train_s": [s3_seconds, c_seconds]})
    summary: dict[str, list[float]] = {
        "stage3": [],
        "control": [],
        "stage3-control": [],
        "stage3-stage2": [],
        "control-stage2": [],
    }
    for row in rows:
        line = {
            "seed": row["seed"],
            "stage2": round(stage2["accuracy"], 3),
            "stage3": round(row["stage3"]["accuracy"], 3),
            "control": round(row["control"]["accuracy"], 3),
            "stage3-control": paired(row["stage3"], row["control"]),
            "stage3-stage2": paired(row["stage3"], stage2),
            "control-stage2": paired(row["control"], stage2),
            "by_type": {  # accuracy per question type, as the quickstart report gives it
                name: {kind: round(v["accuracy"], 2) for kind, v in row[name]["by_type"].items()}
                for name in ("stage3", "control")
            },
        }
        if "train_s" in row:
            line["train_s"] = [round(s) for s in row["train_s"]]
        print(json.dumps(line), flush=True)
        for key in ("stage3", "control"):
            summary[key].append(line[key])
        for key in ("stage3-control", "stage3-stage2", "control-stage2"):
            summary[key].append(line[key]["difference"])
    print(
        json.dumps(
            {
                "seeds": [row["seed"] for row in rows],
                **{
                    key: {"mean": mean(v), "se_across_seeds": round(statistics.stdev(v) / len(v) ** 0.5, 3)}
                    for key, v in summary.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
