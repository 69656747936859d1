"""Saved models scored on the whole easy-VQA test split, with the quickstart's protocol, paired.

The quickstart scores every model on 2,000 of the 9,673 test questions (one question in four, from the start of
the split) to stay within its time budget; the standard error of a paired difference there is about 0.35
points. This asks every question of the test split, the same way (describe-first, greedy, bf16 autocast,
batches of 64: `Evaluator.vqa` in `eve_vlm/quickstart.py`), of each model given, and prints the paired
differences between them with their standard error over questions. It also counts, for a model that has a
quickstart record, how many of the record's questions get the same answer here (batches are made of other
questions than in the quickstart, and under bf16 left padding can change a greedy answer). `--one-turn` asks
each question alone instead, as a user who asks the model directly does.

    python benchmarks/full_test_split.py runs/quickstart/stage2 runs/quickstart/control \\
        runs/quickstart/stage3 > full-test-split.jsonl

Output (stdout): one JSON line per model (accuracy overall and per question type, evaluation time, agreement
with its quickstart record), then one line per pair of models (the later one on the command line minus the
earlier one). Each model's predictions go to `--out/<folder name>.json`. Needs the default parts (`eve
prepare`); timing is the machine's: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eve_vlm.assets import prepare  # noqa: E402
from eve_vlm.eval.cli import load_model_and_processor  # noqa: E402
from eve_vlm.eval.vqa import paired_difference  # noqa: E402
from eve_vlm.quickstart import RECORD, VQA_BF16, Evaluator  # noqa: E402


def refuse(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(2)


def agreement(predictions: list[dict], model_dir: Path) -> dict | None:
    """How many of the questions in `model_dir`'s quickstart record get the same answer in `predictions`
    (None without a record)."""
    path = model_dir / RECORD
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())["metrics"].get("vqa", {}).get("predictions", [])
    here = {p["id"]: p["prediction"] for p in predictions}
    same = sum(here.get(p["id"]) == p["prediction"] for p in recorded)
    return {"questions": len(recorded), "same_answer": same}


def model_line(name: str, result: dict, seconds: float, agree: dict | None) -> dict:
    return {
        "model": name,
        "questions": result["questions"],
        "accuracy": round(result["accuracy"], 3),
        "se": round(result["accuracy_stderr"], 3),
        "by_type": {kind: round(v["accuracy"], 2) for kind, v in result["by_type"].items()},
        "eval_s": round(seconds),
        "quickstart_record": agree,
    }


def pair_line(later: str, earlier: str, results: dict[str, dict]) -> dict:
    d = paired_difference(results[later]["predictions"], results[earlier]["predictions"])
    return {
        "pair": f"{later}-{earlier}",
        "difference": round(d["difference"], 3),
        "se": round(d["stderr"], 3),
        "questions": d["questions"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="saved model folders (e.g. a quickstart's stage2, stage3)")
    parser.add_argument("--out", default="runs/full_test_split", help="folder for the predictions")
    parser.add_argument(
        "--questions",
        type=int,
        help="ask only this many, spread over the split as the quickstart's --vqa-limit spreads them "
        "(2000: the quickstart's own questions); default every question",
    )
    parser.add_argument(
        "--one-turn",
        action="store_true",
        help="ask each question in one turn, with no caption first (what a user who asks directly gets)",
    )
    args = parser.parse_args()
    folders = [Path(m).resolve() for m in args.models]
    missing = [str(f) for f in folders if not (f / "config.json").is_file()]
    if missing:
        refuse(
            f"{', '.join(missing)}: not a saved model folder (no config.json); pass the folders of trained models."
        )
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        refuse(f"models {names}: two folders share a name; their predictions would overwrite each other.")
    if args.questions is not None and args.questions < 1:
        refuse(f"--questions {args.questions}: ask at least one question.")
    paths = prepare(log=lambda *_: None)["paths"]
    evaluator = Evaluator(paths, vqa_limit=args.questions or 10**9, mc_limit=1, text_chars=1, routing_limit=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name, folder in zip(names, folders, strict=True):
        start = time.time()
        model, processor = load_model_and_processor(str(folder))
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=VQA_BF16):
            results[name] = evaluator.vqa(model, processor, describe_first=not args.one_turn)
        seconds = time.time() - start
        (out / f"{name}{'-one-turn' if args.one_turn else ''}.json").write_text(
            json.dumps(results[name]["predictions"])
        )
        agree = None if args.one_turn else agreement(results[name]["predictions"], folder)
        line = model_line(name, results[name], seconds, agree)
        print(json.dumps(line), flush=True)
    for earlier, later in combinations(names, 2):
        print(json.dumps(pair_line(later, earlier, results)), flush=True)


if __name__ == "__main__":
    main()
