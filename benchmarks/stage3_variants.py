"""Stage-3 recipe variants against the recipe, from the stage 2s of several quickstarts, scored on held-out
training images (not on the test split).

Stage 3's gain over stage 2 depends on the stage 2 it starts from (README, "The same command on another CPU"),
so a change to stage 3's recipe is judged here from several stage 2s at once: the `stage2` of each `--quickstart`
folder given (made by `eve quickstart`, with or without `--seed`). For each stage 2 and each `--variant`, stage 3
is trained with `recipes/quickstart/stage3.yaml`, that quickstart's stage-3 seed and the variant's overrides, on
the caption turns less the last `--holdout` training images (by file number); then the model captions those
held-out images as the quickstart's describe-first evaluation does (`CAPTION_PROMPT`, greedy, `DESCRIBE_TOKENS`
new tokens, bf16 autocast, batches of `VQA_BATCH`), and each caption is scored on whether it names the image's
colour and its shape (from the image's own caption in `captions.json`). Stage 2 is scored the same way once per
quickstart. The test split is not used: the recipe chosen from these lines is then measured by `eve quickstart`.
Each stage 2 trains each variant once, so a variant whose effect is smaller than the spread between two
trainings of one recipe (data order alone moved colour reading by about 3 points on easy-VQA;
`benchmarks/README.md`) is not ranked by it: train from more stage 2s, or measure the survivors on the test.

    python benchmarks/stage3_variants.py --quickstart runs/quickstart runs/quickstart-seed2 \\
        --variant recipe= --variant detached=evf.detach_router_input=true \\
        --variant b16='training.per_device_train_batch_size=16' > variants.jsonl

A variant is `NAME=OVERRIDE;OVERRIDE...` (recipe overrides as `eve train` takes them; `NAME=` alone is the recipe
itself). Output (stdout; the trainer's logs go to stderr): one JSON line per stage 2 and per trained model
(captions naming the right colour, shape and both, in %, with counts, training seconds), then one summary line
per variant: the mean over the stage 2s and, for each variant but the first (the reference: give the recipe
first), the mean difference to the first from the same stage 2 in the share of images whose caption names both
right, with the standard error across stage 2s. Trained models go to
`--out/<quickstart folder name>/<variant>`; one already there (its `model.safetensors` written) is scored again,
not retrained, when it was trained from that variant's recipe (another model there is refused, exit 2). Timing is the machine's: run nothing else meanwhile.

`--test` measures the survivors on the test split instead: each variant trains on every caption turn (the
quickstart's data, no hold-out), at the quickstart's stage-3 seed, and is asked the quickstart's easy-VQA
questions as `eve quickstart` asks them (the record's question count, describe-first, bf16 autocast, batches
of `VQA_BATCH`). Each line gives its accuracy (per question type too) and its paired difference on the same
questions to the quickstart's stage 2, stage 3 (the recipe at that seed) and control, read from their records;
the summary gives each variant's mean over the stage 2s of each difference with its standard error across stage
2s. No recipe variant is needed there: the quickstart's stage 3 is the recipe.

    python benchmarks/stage3_variants.py --test --quickstart runs/quickstart runs/quickstart-seed2 \\
        runs/quickstart-seed3 --variant b16='training.per_device_train_batch_size=16' > test.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eve_vlm.assets import prepare  # noqa: E402
from eve_vlm.data.builtin.easy_vqa import CAPTION_PROMPT, COLORS, SHAPES  # noqa: E402
from eve_vlm.eval.cli import load_model_and_processor  # noqa: E402
from eve_vlm.eval.vqa import describe_images, paired_difference  # noqa: E402
from eve_vlm.quickstart import (  # noqa: E402
    DESCRIBE_TOKENS,
    RECORD,
    VQA_BATCH,
    Evaluator,
    Run,
    recipe_record,
    recipes_dir,
    stage_overrides,
    trained_summary,
    vqa_settings,
)
from eve_vlm.train.recipe import load_recipe  # noqa: E402
from eve_vlm.train.stages import run_stage  # noqa: E402


def refuse(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(2)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`NAME=OVERRIDE;OVERRIDE...` -> (name, overrides); exits 2 on a malformed one."""
    name, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name == "stage2":
        refuse(
            f"--variant {text!r}: write NAME=OVERRIDE;OVERRIDE... (NAME of letters, digits, _ . -; not stage2, "
            "which names the stage 2 lines)."
        )
    return name, [o.strip() for o in rest.split(";") if o.strip()]


def words(caption: str, vocabulary: tuple[str, ...]) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", caption.lower()) if w in vocabulary]


def split_captions(captions_file: Path, holdout: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): the held-out ones are the last `holdout` images by file number."""
    rows = json.loads(captions_file.read_text())

    def number(row: dict) -> int:
        return int(re.search(r"(\d+)\.\w+$", row["image"]).group(1))

    rows.sort(key=number)
    if not 0 < holdout < len(rows):
        refuse(f"--holdout {holdout}: must lie between 1 and {len(rows) - 1} ({captions_file}).")
    return rows[:-holdout], rows[-holdout:]


def truth(row: dict) -> tuple[str | None, str | None]:
    """The colour and shape the row's caption ("A blue triangle.") names; None for one it leaves out (some
    captions are "A circle." or "A red shape.": the training questions of that image did not name it)."""
    caption = row["conversations"][1]["value"]
    return (words(caption, COLORS) or [None])[0], (words(caption, SHAPES) or [None])[0]


def score(model_dir: Path, held_out: list[dict], folder: Path) -> dict:
    """Share of held-out images whose caption names the right colour, shape, and both (in %, with counts), of
    the images whose colour, shape, or both are known."""
    # the loader returns the model in eval mode, and generation runs without grad
    model, processor = load_model_and_processor(str(model_dir), device="cpu")
    paths = [str(folder / row["image"]) for row in held_out]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        captions = describe_images(
            model, processor, paths, CAPTION_PROMPT, batch_size=VQA_BATCH, max_new_tokens=DESCRIBE_TOKENS
        )
    right: dict[str, list[bool]] = {"colour": [], "shape": [], "both": []}
    for row, path in zip(held_out, paths, strict=True):
        colour, shape = truth(row)
        said = captions[path]
        colour_right = words(said, COLORS)[:1] == [colour]
        shape_right = words(said, SHAPES)[:1] == [shape]
        if colour is not None:
            right["colour"].append(colour_right)
        if shape is not None:
            right["shape"].append(shape_right)
        if colour is not None and shape is not None:
            right["both"].append(colour_right and shape_right)
    return {
        **{f"{k}_images": len(v) for k, v in right.items()},
        **{f"{k}_right": sum(v) for k, v in right.items()},
        **{f"{k}_pct": round(100 * sum(v) / len(v), 2) for k, v in right.items()},
    }


def summary(lines: list[dict], names: list[str]) -> list[dict]:
    """Per variant: mean % over the stage 2s and the paired difference to the first variant (in % of the
    held-out images whose caption names both right), with the standard error across stage 2s."""
    out = []
    for name in names:
        mine = {line["quickstart"]: line for line in lines if line["model"] == name}
        row = {
            "variant": name,
            "stage2s": len(mine),
            **{
                f"{k}_pct_mean": round(statistics.fmean(line[f"{k}_pct"] for line in mine.values()), 2)
                for k in ("colour", "shape", "both")
            },
        }
        if name != names[0]:
            first = {line["quickstart"]: line for line in lines if line["model"] == names[0]}
            diffs = [mine[q]["both_pct"] - first[q]["both_pct"] for q in mine if q in first]
            row[f"both_minus_{names[0]}"] = round(statistics.fmean(diffs), 2) if diffs else None
            row["se_across_stage2s"] = (
                round(statistics.stdev(diffs) / len(diffs) ** 0.5, 2) if len(diffs) > 1 else None
            )
        out.append(row)
    return out


AGAINST = ("stage2", "stage3", "control")


def records_on_test(qs: Path) -> tuple[dict[str, dict], int]:
    """The VQA results of a quickstart's stage 2, stage 3 and control (with their predictions) and the question
    count they were asked; exits 2 when one is missing or was asked otherwise than `eve quickstart` asks now."""
    vqa: dict[str, dict] = {}
    limit = None
    for name in AGAINST:
        path = qs / name / RECORD
        if not path.is_file():
            refuse(f"{path} not found: run `eve quickstart --out {qs}` first.")
        record = json.loads(path.read_text())
        asked = record["key"].get("eval", {})
        limit = asked.get("vqa") if limit is None else limit
        if not isinstance(limit, int) or {k: asked.get(k) for k in vqa_settings(limit)} != vqa_settings(
            limit
        ):
            refuse(
                f"{path}: its easy-VQA questions were asked otherwise than `eve quickstart` asks them now "
                f"({vqa_settings(limit if isinstance(limit, int) else 0)}): run `eve quickstart --out {qs}` again."
            )
        vqa[name] = record["metrics"]["vqa"]
        if name == "stage3":
            trained = record["key"]["recipe"]
    recipe = load_recipe(
        recipes_dir() / "stage3.yaml",
        [*stage_overrides(3, qs, False), f"training.seed={trained['training']['seed']}"],
    )
    if trained != recipe_record(recipe):  # its differences would not be to the recipe
        refuse(
            f"{qs / 'stage3'} was trained from another stage-3 recipe than the current one: run "
            f"`eve quickstart --out {qs}` again (with the --seed it was made with)."
        )
    return vqa, limit


def line_on_test(quickstart: str, name: str, result: dict, records: dict[str, dict]) -> dict:
    """One variant's test line: accuracy, per type, and paired differences to the quickstart's models."""
    line = {
        "quickstart": quickstart,
        "model": name,
        "accuracy": round(result["accuracy"], 3),
        "by_type": {kind: round(v["accuracy"], 2) for kind, v in result["by_type"].items()},
    }
    for other, record in records.items():
        d = paired_difference(result["predictions"], record["predictions"])
        line[f"minus_{other}"] = {
            "difference": round(d["difference"], 3),
            "se": round(d["stderr"], 3),
            "questions": d["questions"],
        }
    return line


def summary_on_test(lines: list[dict], names: list[str]) -> list[dict]:
    """Per variant: the mean over the stage 2s of its paired difference to each of the quickstart's models,
    with the standard error across stage 2s."""
    out = []
    for name in names:
        mine = [line for line in lines if line["model"] == name]
        row: dict = {"variant": name, "stage2s": len(mine)}
        for other in AGAINST:
            diffs = [line[f"minus_{other}"]["difference"] for line in mine]
            row[f"minus_{other}"] = {
                "mean": round(statistics.fmean(diffs), 3),
                "se_across_stage2s": round(statistics.stdev(diffs) / len(diffs) ** 0.5, 3)
                if len(diffs) > 1
                else None,
            }
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", nargs="+", default=["runs/quickstart"], help="finished quickstarts")
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDE;OVERRIDE...")
    parser.add_argument("--holdout", type=int, default=600, help="training images held out of stage 3")
    parser.add_argument(
        "--out",
        help="where the models go (default: runs/stage3_variants, with --test runs/stage3_variants_test)",
    )
    parser.add_argument(
        "--test",
        action="store_true",
        help="train on every caption turn and ask the quickstart's test questions",
    )
    args = parser.parse_args()
    variants = dict(parse_variant(v) for v in args.variant or ["recipe="])
    if len(variants) != len(args.variant or ["recipe="]):
        refuse("--variant: each NAME may appear once.")
    folders = [Path(q).resolve() for q in args.quickstart]
    if len({f.name for f in folders}) != len(folders):
        refuse("--quickstart: the folders' names must differ (they name the output folders).")
    for qs in folders:
        for name in ("stage2", "stage3"):
            if not (qs / name / RECORD).is_file():
                refuse(f"{qs / name / RECORD} not found: run `eve quickstart --out {qs}` first.")
    if args.holdout < 1:
        refuse(f"--holdout {args.holdout}: hold out at least one training image.")
    if args.test:
        variants_on_test(folders, variants, Path(args.out or "runs/stage3_variants_test").resolve())
        return
    paths = prepare(log=lambda *_: None)["paths"]
    captions_file = Path(paths["easy_vqa_captions"])
    folder = captions_file.parent
    train_rows, held_out = split_captions(captions_file, args.holdout)
    out = Path(args.out or "runs/stage3_variants").resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / f"captions-less-last-{args.holdout}.json"
    train_file.write_text(json.dumps(train_rows))
    data = f"data.sources=[{{path: '{train_file}', image_folder: '{folder}'}}]"

    lines: list[dict] = []

    def emit(line: dict) -> None:
        lines.append(line)
        print(json.dumps(line), flush=True)

    for qs in folders:
        seed = stage3_seed(qs)
        emit({"quickstart": qs.name, "model": "stage2", **score(qs / "stage2", held_out, folder)})
        for name, overrides in variants.items():
            model_dir = out / qs.name / name
            seconds = train_variant(qs, seed, [data, *overrides], model_dir)
            emit(
                {
                    "quickstart": qs.name,
                    "model": name,
                    "overrides": overrides,
                    "seed": seed,
                    "train_s": seconds,
                    **score(model_dir, held_out, folder),
                }
            )
    for row in summary(lines, list(variants)):
        print(json.dumps(row), flush=True)


def stage3_seed(qs: Path) -> int:
    return json.loads((qs / "stage3" / RECORD).read_text())["key"]["recipe"]["training"]["seed"]


def train_variant(qs: Path, seed: int, overrides: list[str], model_dir: Path) -> float | None:
    """Trains stage 3 from `qs`'s stage 2 at `seed` with `overrides` into `model_dir` and returns the seconds
    it took; None when a model trained from this very recipe is there already (it is scored again, not
    retrained). Exits 2 when the folder holds a model trained from another recipe (another variant, mode or
    stage-3 recipe), which would otherwise be scored under this variant's name."""
    recipe = load_recipe(
        recipes_dir() / "stage3.yaml",
        [
            *stage_overrides(3, qs, False),
            f"training.seed={seed}",
            *overrides,
            f"training.output_dir={model_dir}",
        ],
    )
    if (model_dir / "model.safetensors").is_file():
        if trained_summary(model_dir, recipe_record(recipe)) is None:
            refuse(
                f"{model_dir} holds a model trained from another recipe than this variant's: pass another --out "
                "(or remove that folder to train it again)."
            )
        return None
    start = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        run_stage(recipe, log=lambda *_: None)
    return round(time.time() - start, 1)


def variants_on_test(folders: list[Path], variants: dict[str, list[str]], out: Path) -> None:
    """`--test`: every variant from every stage 2, on the quickstart's test questions."""
    records = {qs: records_on_test(qs) for qs in folders}  # refuses before anything trains
    paths = prepare(log=lambda *_: None)["paths"]
    evaluators: dict[int, Evaluator] = {}
    lines: list[dict] = []
    for qs in folders:
        vqa, limit = records[qs]
        seed = stage3_seed(qs)
        for name, overrides in variants.items():
            model_dir = out / qs.name / name
            seconds = train_variant(qs, seed, overrides, model_dir)
            if limit not in evaluators:
                evaluators[limit] = Evaluator(paths, limit, 1, 1, 1)
            metrics, _ = evaluators[limit](Run(name, 3, (), None, language=False), model_dir, out)
            line = line_on_test(qs.name, name, metrics["vqa"], vqa)
            line.update(overrides=overrides, seed=seed, train_s=seconds)
            lines.append(line)
            print(json.dumps(line), flush=True)
    for row in summary_on_test(lines, list(variants)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
