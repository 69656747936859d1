"""Does a quickstart stage 2 learn easy-VQA's yes/no comparison from the image when trained on it alone?

easy-VQA's yes/no questions are answered from their form by every quickstart model (README, "Why the total
stays below 87%"). This continues the stage 2 of an earlier `eve quickstart` (its recipe,
`recipes/quickstart/stage2.yaml`: projector and LoRA, lr, batches, bf16 autocast) in train mode on the
single-question yes/no rows of easy-VQA's `train.json`, balanced per form (`balanced_yes_no`: each of the four
forms, plain or negated and colour or shape, is "yes" half of the time, so the question alone predicts nothing).
With `--caption-share` that share of the rows also gets the image's caption as text after the image ("The image
shows a red circle."), which the LLM can compare with the question as text (`benchmarks/yes_no_probe.py`).

It then scores "yes" against "no" logits (eval mode, fp32, no gradients) on `--eval-items` yes/no questions of
the test split, balanced per form the same way: from the image alone, and from the image with its caption
written after it. Nothing is dropped.

    python benchmarks/yes_no_from_image.py --stage2 runs/quickstart/stage2 --steps 600
    python benchmarks/yes_no_from_image.py --stage2 runs/quickstart/stage2 --steps 300 --caption-share 0.5

Output: one JSON line (steps, caption share, training seconds, the logged training losses, accuracy from the
image and from the image with its caption, `form_only`: each form answered with its majority answer among the
test items, the machine). Trained models go to `--out`; timing is the machine's: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eve_vlm.assets import prepare  # noqa: E402
from eve_vlm.data.builtin.easy_vqa import balanced_yes_no, image_facts, yes_no_form  # noqa: E402
from eve_vlm.quickstart import recipes_dir  # noqa: E402
from eve_vlm.train.recipe import load_recipe  # noqa: E402
from eve_vlm.train.stages import run_stage  # noqa: E402


def question_of(row: dict) -> str:
    """The question of a one-question row, without the image placeholder and the one-word instruction."""
    return row["conversations"][0]["value"].split("\n", 1)[1].split(" Answer with")[0]


def facts_by_image(rows: list[dict]) -> dict[str, dict[str, str]]:
    """Each image's colour and shape, as its question/answer pairs reveal them."""
    pairs = defaultdict(list)
    for row in rows:
        pairs[row["image"]].append((question_of(row), row["conversations"][1]["value"]))
    return {image: image_facts(p) for image, p in pairs.items()}


def balanced_rows(rows: list[dict]) -> list[dict]:
    """The yes/no rows, balanced per form."""
    yes_no = [r for r in rows if r["question_type"] == "yes-no"]
    keep = balanced_yes_no([question_of(r) for r in yes_no], [r["conversations"][1]["value"] for r in yes_no])
    return [yes_no[k] for k in keep]


def with_caption(row: dict, facts: dict[str, str], folder: Path) -> dict:
    """The row with an absolute image path and, when `facts` has both, the caption after the image."""
    human = row["conversations"][0]["value"]
    if "color" in facts and "shape" in facts:
        human = human.replace(
            "<image>\n", f"<image>\nThe image shows a {facts['color']} {facts['shape']}.\n", 1
        )
    return {
        **row,
        "image": str(folder / row["image"]),
        "conversations": [{**row["conversations"][0], "value": human}, row["conversations"][1]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage2", type=Path, default=Path("runs/quickstart/stage2"))
    parser.add_argument("--out", type=Path, default=Path("runs/yes_no_from_image"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--caption-share", type=float, default=0.0)
    parser.add_argument("--eval-items", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from eve_vlm.model.modeling import EveForConditionalGeneration

    torch.set_num_threads(args.threads)
    if not (args.stage2 / "config.json").is_file():
        print(f"error: {args.stage2} holds no trained model; run `eve quickstart` first.", file=sys.stderr)
        raise SystemExit(2)
    paths = prepare(log=lambda *_: None)["paths"]
    folder = Path(paths["easy_vqa_train"]).parent
    train_rows = json.loads(Path(paths["easy_vqa_train"]).read_text())
    test_rows = json.loads(Path(paths["easy_vqa_test"]).read_text())
    facts = {**facts_by_image(train_rows), **facts_by_image(test_rows)}

    rng = random.Random(0)
    rows = [
        with_caption(r, facts[r["image"]] if rng.random() < args.caption_share else {}, folder)
        for r in balanced_rows(train_rows)
    ]
    run = args.out / f"steps{args.steps}-caption{args.caption_share:g}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "rows.json").write_text(json.dumps(rows))
    recipe = load_recipe(
        recipes_dir() / "stage2.yaml",
        [
            f"model.init_from={args.stage2.resolve()}",
            f"data.sources=[{{path: {run / 'rows.json'}}}]",
            f"training.output_dir={run / 'model'}",
            f"training.max_steps={args.steps}",
            "training.save_steps=0",
        ],
    )
    start = time.perf_counter()
    summary = run_stage(recipe, log=lambda *_: None)
    seconds = time.perf_counter() - start

    test = balanced_rows(test_rows)
    random.Random(1).shuffle(test)
    test = test[: args.eval_items]
    processor = AutoProcessor.from_pretrained(run / "model")
    processor.tokenizer.padding_side = "left"
    model = EveForConditionalGeneration.from_pretrained(run / "model").eval()
    yes, no = (processor.tokenizer.encode(word)[0] for word in ("yes", "no"))

    def accuracy(captioned: bool) -> float:
        right = 0
        with torch.no_grad():
            for first in range(0, len(test), 50):
                batch = test[first : first + 50]
                texts = [
                    processor.chat_prompt(
                        with_caption(r, facts[r["image"]] if captioned else {}, folder)["conversations"][0][
                            "value"
                        ]
                    )
                    for r in batch
                ]
                images = [Image.open(folder / r["image"]).convert("RGB") for r in batch]
                logits = model(**processor(texts, images=images, padding=True), logits_to_keep=1).logits[
                    :, -1
                ]
                said = ["yes" if y > n else "no" for y, n in zip(logits[:, yes], logits[:, no], strict=True)]
                right += sum(s == r["conversations"][1]["value"] for s, r in zip(said, batch, strict=True))
        return round(100.0 * right / len(test), 2)

    forms = defaultdict(lambda: defaultdict(int))
    for r in test:
        forms[yes_no_form(question_of(r))][r["conversations"][1]["value"]] += 1
    question_only = round(100.0 * sum(max(c.values()) for c in forms.values()) / len(test), 2)
    line = {
        "steps": args.steps,
        "caption_share": args.caption_share,
        "train_s": round(seconds),
        "loss_history": [[step, round(loss, 3)] for step, loss in summary["loss_history"]],
        "accuracy_image": accuracy(False),
        "accuracy_image_and_caption": accuracy(True),
        "form_only": question_only,
        "eval_items": len(test),
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
