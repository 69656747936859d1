"""How well trained models read an easy-VQA shape's colour, against what the vision features hold.

Most questions the quickstart's models still get wrong are about colour, and each describe-first answer
follows the model's own caption. So this measures, on the first `--images` easy-VQA test images whose colour
a test question names (sorted by file name):
- per model folder given (default `runs/quickstart/stage2` and `runs/quickstart/stage3`, made by
  `eve quickstart`): whether its caption (`CAPTION_PROMPT`, greedy, `DESCRIBE_TOKENS` new tokens, bf16
  autocast, eval mode, as the quickstart evaluates) names the right colour, and the right shape for the
  images a shape question names; the most frequent wrong colours;
- a linear colour probe on the frozen vision tower of the first model: multinomial logistic regression (L2,
  full-batch L-BFGS on standardised features) fitted on `--probe-train` captioned training images and scored
  on the same test images, on the mean and max over patches of the tower's hidden states at several layers
  (the one the model uses included), and on its projected image tokens (the LLM's input, flattened). A probe
  reads what is linearly there; a model above it reads more than a linear map does, one far below it leaves
  information unread.

Usage (after `eve quickstart`; one process, `--threads` CPU threads):

    .venv/bin/python benchmarks/colour_reading.py [MODEL_DIR ...] [--images 600] [--probe-train 2000]

Output: one JSON line per model, then one per probed feature.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eve_vlm.assets import require_assets  # noqa: E402
from eve_vlm.data.builtin.easy_vqa import CAPTION_PROMPT, COLORS  # noqa: E402
from eve_vlm.errors import EveError  # noqa: E402
from eve_vlm.eval.cli import load_model_and_processor  # noqa: E402
from eve_vlm.eval.vqa import _open_rgb, describe_images  # noqa: E402
from eve_vlm.quickstart import DESCRIBE_TOKENS, VQA_BATCH  # noqa: E402

PROBE_LAYERS = (1, 4, 8)  # besides the layer the model uses


def truth_by_image(test_file: Path, limit: int) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The first `limit` test images with a known colour (sorted), and each image's colour and shape as the
    test questions give them ("What is the red shape?" names both)."""
    colour, shape = {}, {}
    folder = test_file.parent
    for row in json.loads(test_file.read_text()):
        image, answer = str(folder / row["image"]), row["answers"][0]
        if row["question_type"] == "color":
            colour[image] = answer
        elif row["question_type"] == "shape":
            shape[image] = answer
            named = re.search(r"What is the (\w+) shape", row["conversations"][0]["value"])
            if named and named.group(1) in COLORS:
                colour.setdefault(image, named.group(1))
    return sorted(colour)[:limit], colour, shape


def caption_scores(model_dir: str, images: list[str], colour: dict, shape: dict) -> dict:
    """Share of images whose caption names the right colour (and shape); the commonest colour misreadings."""
    model, processor = load_model_and_processor(model_dir, "cpu", None)
    start = time.time()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        captions = describe_images(
            model, processor, images, CAPTION_PROMPT, batch_size=VQA_BATCH, max_new_tokens=DESCRIBE_TOKENS
        )
    seconds = time.time() - start
    words = {image: re.findall(r"[a-z]+", captions[image].lower()) for image in images}
    right_colour = [colour[i] in words[i] for i in images]
    with_shape = [i for i in images if i in shape]
    wrong = collections.Counter(
        f"{colour[i]} -> {' '.join(w for w in words[i] if w in COLORS) or '(no colour)'}"
        for i, ok in zip(images, right_colour, strict=True)
        if not ok
    )
    return {
        "model": model_dir,
        "images": len(images),
        "colour_named": round(100.0 * sum(right_colour) / len(images), 2),
        "shape_images": len(with_shape),
        "shape_named": round(
            100.0 * sum(shape[i] in words[i] for i in with_shape) / max(1, len(with_shape)), 2
        ),
        "commonest_misreadings": wrong.most_common(6),
        "seconds": round(seconds, 1),
    }


def features(model, processor, images: list[str]) -> dict[str, torch.Tensor]:
    """Per image: mean and max over patches of the tower's hidden states at each probed layer (its prefix
    tokens, CLS or registers, left out), and the flattened projected image tokens."""
    encoder = model.vision_tower
    used = encoder.feature_layers[0]
    layers = {f"tower layer {k}": k for k in PROBE_LAYERS}
    layers[f"tower layer {used} (used)"] = used
    out = collections.defaultdict(list)
    for start in range(0, len(images), 64):
        batch = [_open_rgb(p) for p in images[start : start + 64]]
        pixels = processor.image_processor(batch, return_tensors="pt")["pixel_values"].to(model.dtype)
        with torch.no_grad():
            hidden = encoder.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            tokens = model.get_image_features(pixels)
        for name, layer in layers.items():
            patches = hidden[layer][:, hidden[layer].shape[1] - encoder.num_patches :]
            out[name].append(torch.cat([patches.mean(1), patches.amax(1)], dim=-1))
        out["projected image tokens"].append(tokens.flatten(1))
    return {name: torch.cat(parts).float() for name, parts in out.items()}


def probe(train_x, train_y, test_x, test_y, classes: int, l2: float = 1e-3) -> tuple[float, float]:
    """Train and test accuracy (%) of an L2-regularised multinomial logistic regression."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], classes)
    torch.nn.init.zeros_(linear.weight)  # a feature constant in training then stays at 0
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scores = [
            (linear(x).argmax(-1) == y).float().mean().item()
            for x, y in ((train_x, train_y), (test_x, test_y))
        ]
    return 100.0 * scores[0], 100.0 * scores[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["runs/quickstart/stage2", "runs/quickstart/stage3"])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--probe-train", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if min(args.images, args.probe_train, args.threads) < 1:
        parser.error("--images, --probe-train and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        for model_dir in args.models:
            if not (Path(model_dir) / "config.json").is_file():
                raise EveError(f"{model_dir} holds no trained model; run `eve quickstart` first.")
        paths = require_assets(keys=("easy_vqa_test", "easy_vqa_captions"))
    except EveError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    images, colour, shape = truth_by_image(Path(paths["easy_vqa_test"]), args.images)
    for model_dir in args.models:
        print(json.dumps(caption_scores(model_dir, images, colour, shape)), flush=True)

    folder = Path(paths["easy_vqa_captions"]).parent
    train = []  # captioned training images whose caption names a colour ("A triangle." does not)
    for row in json.loads(Path(paths["easy_vqa_captions"]).read_text()):
        named = [w for w in re.findall(r"[a-z]+", row["conversations"][1]["value"].lower()) if w in COLORS]
        if named and len(train) < args.probe_train:
            train.append((str(folder / row["image"]), named[0]))
    names = list(COLORS)
    model, processor = load_model_and_processor(args.models[0], "cpu", None)
    start = time.time()
    train_f = features(model, processor, [p for p, _ in train])
    test_f = features(model, processor, images)
    train_y = torch.tensor([names.index(c) for _, c in train])
    test_y = torch.tensor([names.index(colour[i]) for i in images])
    for name in train_f:
        fit, held_out = probe(train_f[name], train_y, test_f[name], test_y, len(names))
        line = {
            "probe": name,
            "model": args.models[0],
            "train_images": len(train),
            "test_images": len(images),
        }
        line |= {"train_acc": round(fit, 2), "test_acc": round(held_out, 2)}
        print(json.dumps(line), flush=True)
    print(json.dumps({"probe_seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
