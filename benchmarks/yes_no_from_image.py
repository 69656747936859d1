"""Does a quickstart stage 2 learn easy-VQA's yes/no comparison from the image when trained on it alone?

easy-VQA's yes/no questions, asked in one turn, were answered from their form by every quickstart model
(`docs/yes-no-from-image-tokens.md`). This continues the stage 2 of an earlier `eve quickstart` (its recipe,
`recipes/quickstart/stage2.yaml`: projector and LoRA, lr, batches, bf16 autocast) in train mode on the
single-question yes/no rows of easy-VQA's `train.json`, balanced per form (`balanced_yes_no`: each of the four
forms, plain or negated and colour or shape, is "yes" half of the time, so the question alone predicts nothing).
With `--caption-share`, that share of the rows (drawn among all; a row gets the caption only when its image's
questions reveal both its colour and its shape) also gets the image's caption as text after the image ("The
image shows a red circle."; with `--image-last`, before the question and the image after it), which the LLM can
compare with the question as text (`benchmarks/yes_no_probe.py`).
`--forms color` or `shape` trains on the questions of that kind only; `--lr` replaces the recipe's learning
rate; `--image-last` writes the image after the question instead of before it (in training and scoring), so
that the image tokens, which come first otherwise, can attend to the question (a causal LM's earlier tokens
never see later ones).

It then scores "yes" against "no" logits (eval mode, fp32, no gradients) on `--eval-items` yes/no questions of
the test split, as many from each of the eight cells (form x true answer), so the form alone scores 50%: from
the image alone (also per kind: the colour and the shape questions, 200 each by default), and, on those of
them whose image's caption is known, from the image with its caption written after it. `--eval-only` scores a
model trained by an earlier run of the same settings. Nothing is dropped.

    python benchmarks/yes_no_from_image.py --stage2 runs/quickstart/stage2 --steps 600
    python benchmarks/yes_no_from_image.py --stage2 runs/quickstart/stage2 --steps 300 --caption-share 0.5
    python benchmarks/yes_no_from_image.py --stage2 runs/quickstart/stage2 --steps 200 --image-last

Output: one JSON line (steps, caption share, learning rate, forms, whether the image is last, captioned training
rows, training seconds and the logged training losses as recorded next to the model, accuracy from the image,
overall and per kind, accuracy from the image and caption with the number of items it is over, the machine).
Trained models go to `--out`; timing is the machine's: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eve_vlm.assets import require_assets  # noqa: E402
from eve_vlm.data.builtin import easy_vqa  # noqa: E402
from eve_vlm.data.builtin.easy_vqa import VQA_INSTRUCTION, balanced_yes_no, caption_for, yes_no_form  # noqa: E402
from eve_vlm.errors import EveError  # noqa: E402
from eve_vlm.quickstart import recipes_dir  # noqa: E402
from eve_vlm.train.recipe import load_recipe  # noqa: E402
from eve_vlm.train.stages import run_stage  # noqa: E402

CAPTION_LEAD = "The image shows"  # + "a red circle.", after the image in a captioned row
IMAGE_FIRST = "<image>\n"  # how every human turn of easy-VQA's rows starts
FORMS = ("all", "color", "shape")


def question_of(row: dict) -> str:
    """The question of a one-question row, without the image placeholder and the one-word instruction."""
    return row["conversations"][0]["value"].split("\n", 1)[1].removesuffix(f" {VQA_INSTRUCTION}")


def answer_of(row: dict) -> str:
    return row["conversations"][1]["value"]


def facts_by_image(rows: list[dict]) -> dict[str, dict[str, str]]:
    """Each image's colour and shape, as its question/answer pairs reveal them, by image path."""
    return easy_vqa.facts_by_image(
        [question_of(r) for r in rows], [answer_of(r) for r in rows], [r["image"] for r in rows]
    )


def yes_no_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["question_type"] == "yes-no"]


def balanced_rows(rows: list[dict]) -> list[dict]:
    """The yes/no rows, balanced per form (`balanced_yes_no`)."""
    yes_no = yes_no_rows(rows)
    keep = balanced_yes_no([question_of(r) for r in yes_no], [answer_of(r) for r in yes_no])
    return [yes_no[k] for k in keep]


def evaluation_rows(rows: list[dict], items: int, seed: int = 1) -> list[dict]:
    """`items` // 8 yes/no rows from each cell (form x true answer), drawn with `seed`."""
    cells = defaultdict(list)
    for row in yes_no_rows(rows):
        cells[(yes_no_form(question_of(row)), answer_of(row))].append(row)
    rng = random.Random(seed)
    return [row for cell in sorted(cells) for row in rng.sample(cells[cell], items // 8)]


def captioned(row: dict, facts: dict[str, str]) -> dict | None:
    """The row with its image's caption written after the image, or None when the colour or shape is unknown."""
    if "color" not in facts or "shape" not in facts:
        return None
    human = row["conversations"][0]["value"].replace(
        IMAGE_FIRST, f"{IMAGE_FIRST}{CAPTION_LEAD} {caption_for(facts).lower()}\n", 1
    )
    return with_human(row, human)


def kind_of(row: dict) -> str:
    """`color` or `shape`: what a yes/no row asks about."""
    return yes_no_form(question_of(row))[1]


def image_last(text: str) -> str:
    """A human turn's text with the image moved from before the question to after it."""
    if not text.startswith(IMAGE_FIRST):
        raise ValueError(f"expected a human turn starting with {IMAGE_FIRST!r}, got {text[:40]!r}")
    return f"{text.removeprefix(IMAGE_FIRST)}\n<image>"


def with_human(row: dict, text: str) -> dict:
    """The row with its first (human) turn's text replaced."""
    return {**row, "conversations": [{**row["conversations"][0], "value": text}, *row["conversations"][1:]]}


def training_rows(
    rows: list[dict],
    facts: dict,
    folder: Path,
    caption_share: float,
    forms: str = "all",
    image_after_question: bool = False,
) -> list[dict]:
    """The balanced yes/no rows of `forms` (`all`, `color` or `shape` questions) with absolute image paths,
    `caption_share` of them drawn for a caption, the image after the question if `image_after_question`."""
    rng = random.Random(0)
    out = []
    for row in balanced_rows(rows):
        drawn = rng.random() < caption_share
        kind = kind_of(row)  # before a caption, which names a colour, is written into the question's turn
        row = (drawn and captioned(row, facts[row["image"]])) or row
        if forms != "all" and kind != forms:
            continue
        if image_after_question:
            row = with_human(row, image_last(row["conversations"][0]["value"]))
        out.append({**row, "image": str(folder / row["image"])})
    return out


def train(args, rows: list[dict], run: Path) -> None:
    (run / "rows.json").parent.mkdir(parents=True, exist_ok=True)
    (run / "rows.json").write_text(json.dumps(rows))
    recipe = load_recipe(
        recipes_dir() / "stage2.yaml",
        [
            f"model.init_from={args.stage2.resolve()}",
            f"data.sources={json.dumps([{'path': str(run / 'rows.json')}])}",
            f"training.output_dir={run / 'model'}",
            f"training.max_steps={args.steps}",
            "training.save_steps=0",
            *([f"training.learning_rate={args.lr}"] if args.lr is not None else []),
        ],
    )
    run_stage(recipe, log=lambda *_: None)


def scorer(model_dir: Path, folder: Path):
    """The model in `model_dir`, loaded once, as a function of `(row, human text)` items to the accuracy (%) of
    "yes" against "no" logits on them, in batches of 50."""
    import torch
    from transformers import AutoProcessor

    from eve_vlm.eval.vqa import _open_rgb
    from eve_vlm.model.modeling import EveForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"  # the last position of every row is the answer's
    model = EveForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    yes, no = (processor.tokenizer.encode(word)[0] for word in ("yes", "no"))

    def score(items: list[tuple[dict, str]]) -> float:
        right = 0
        with torch.no_grad():
            for first in range(0, len(items), 50):
                batch = items[first : first + 50]
                texts = [processor.chat_prompt(human) for _, human in batch]
                images = [_open_rgb(str(folder / row["image"])) for row, _ in batch]
                logits = model(**processor(texts, images=images, padding=True), logits_to_keep=1).logits[
                    :, -1
                ]
                said = ["yes" if y > n else "no" for y, n in zip(logits[:, yes], logits[:, no], strict=True)]
                right += sum(s == answer_of(row) for s, (row, _) in zip(said, batch, strict=True))
        return round(100.0 * right / len(items), 2)

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage2", type=Path, default=Path("runs/quickstart/stage2"))
    parser.add_argument("--out", type=Path, default=Path("runs/yes_no_from_image"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--caption-share", type=float, default=0.0)
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the stage 2 recipe's)"
    )
    parser.add_argument("--forms", choices=FORMS, default="all", help="train on these yes/no questions only")
    parser.add_argument(
        "--image-last", action="store_true", help="the image after the question, in training and scoring"
    )
    parser.add_argument("--eval-items", type=int, default=400)
    parser.add_argument("--eval-only", action="store_true", help="score the model of an earlier run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not 0.0 <= args.caption_share <= 1.0:
        parser.error("--caption-share must be between 0 and 1")
    if args.eval_items < 8 or args.steps < 1:
        parser.error("--eval-items must be at least 8 (one per cell) and --steps at least 1")
    import torch

    torch.set_num_threads(args.threads)
    run = args.out / (
        f"steps{args.steps}-caption{args.caption_share:g}"
        + (f"-lr{args.lr:g}" if args.lr is not None else "")
        + (f"-{args.forms}" if args.forms != "all" else "")
        + ("-image-last" if args.image_last else "")
    )
    try:
        if not (args.stage2 / "config.json").is_file():
            raise EveError(f"{args.stage2} holds no trained model; run `eve quickstart` first.")
        if args.eval_only and not (run / "model" / "config.json").is_file():
            raise EveError(f"{run / 'model'} holds no model; run without --eval-only first.")
        paths = require_assets(keys=("easy_vqa_train", "easy_vqa_test"))
        folder = Path(paths["easy_vqa_train"]).parent
        train_rows = json.loads(Path(paths["easy_vqa_train"]).read_text())
        test_rows = json.loads(Path(paths["easy_vqa_test"]).read_text())
        if not args.eval_only:
            rows = training_rows(
                train_rows,
                facts_by_image(train_rows),
                folder,
                args.caption_share,
                forms=args.forms,
                image_after_question=args.image_last,
            )
            train(args, rows, run)
        test = evaluation_rows(test_rows, args.eval_items)
        facts = facts_by_image(test_rows)
        placed = image_last if args.image_last else str
        from_image = [(r, placed(r["conversations"][0]["value"])) for r in test]
        with_caption = [
            (r, placed(c["conversations"][0]["value"]))
            for r in test
            if (c := captioned(r, facts[r["image"]]))
        ]
        summary = json.loads((run / "model" / "eve_training.json").read_text())
        score = scorer(run / "model", folder)
        line = {
            "steps": args.steps,
            "caption_share": args.caption_share,
            "lr": summary["recipe"]["training"]["learning_rate"],
            "forms": args.forms,
            "image_last": args.image_last,
            "captioned_train_rows": sum(
                CAPTION_LEAD in r["conversations"][0]["value"]
                for r in json.loads((run / "rows.json").read_text())
            ),
            "train_s": round(summary["seconds"]),
            "loss_history": [[step, round(loss, 3)] for step, loss in summary["loss_history"]],
            "accuracy_image": score(from_image),
            "accuracy_image_by_kind": {
                kind: score([item for item in from_image if kind_of(item[0]) == kind]) for kind in FORMS[1:]
            },
            "eval_items": len(test),
            "accuracy_image_and_caption": score(with_caption),
            "captioned_eval_items": len(with_caption),
            "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        }
    except EveError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
