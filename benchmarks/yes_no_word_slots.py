"""Is the yes/no comparison learnt when the image slots hold words instead of image features?

`yes_no_from_image.py` finds that a quickstart's stage 2 does not learn easy-VQA's yes/no comparison ("Is
there a red shape?") from the image, while `yes_no_probe.py` finds it learnt against the caption as text. This
script asks what is missing between the two: it continues the same stage 2 (its LoRA, in train mode, bf16
autocast; the projector's output is replaced, so only LoRA trains) on the same balanced single-question yes/no
rows of `train.json`, with the 16 image slots filled (`--slots words`) by the LLM's input embeddings of the
image's colour and shape words, alternating (" red", " circle", " red", ...; each word's first token as
SmolLM2's tokenizer splits it with a leading space: one token for every colour and shape but " teal", which is
" te" + "al" and gets " te", the first token of " teal" in the question too), or (`--slots image`) by the
projected image features as usual. The loss is the cross-entropy of the answer token at the last prompt
position. Rows whose image's colour or shape its questions do not reveal are dropped (in training and
evaluation). Accuracy is "yes" against "no" logits (eval mode, no gradients) on the test questions of
`yes_no_from_image.evaluation_rows` (50 per form and true answer, so the form alone scores about 50%) that are kept,
before training and every `--eval-every` steps.

    python benchmarks/yes_no_word_slots.py --stage2 runs/quickstart/stage2 --steps 200 --slots words

Output: one JSON line per evaluation (`step`, `slots`, `loss` of the last training batch, `accuracy`, `items`, `seconds`
of training so far, `machine`). Timing is the machine's: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yes_no_from_image as base  # noqa: E402

from eve_vlm.assets import require_assets  # noqa: E402
from eve_vlm.errors import EveError  # noqa: E402

SLOTS = ("words", "image")


def word_slots(embeddings, ids: dict[str, int], facts: list[dict[str, str]], slots: int):
    """(N, slots, D) input embeddings of each image's colour and shape words, alternating."""
    import torch

    rows = []
    for fact in facts:
        pair = [embeddings[ids[fact["color"]]], embeddings[ids[fact["shape"]]]]
        rows.append(torch.stack([pair[k % 2] for k in range(slots)]))
    return torch.stack(rows)


def known(rows: list[dict], facts: dict) -> list[dict]:
    """The rows whose image's colour and shape are both known."""
    return [r for r in rows if {"color", "shape"} <= facts[r["image"]].keys()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage2", type=Path, default=Path("runs/quickstart/stage2"))
    parser.add_argument("--slots", choices=SLOTS, default="words")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 1 or args.eval_every < 1 or args.batch_size < 1:
        parser.error("--steps, --eval-every and --batch-size must be at least 1")
    import torch
    from transformers import AutoProcessor

    from eve_vlm.eval.vqa import _open_rgb
    from eve_vlm.model.modeling import EveForConditionalGeneration

    torch.set_num_threads(args.threads)
    try:
        if not (args.stage2 / "config.json").is_file():
            raise EveError(f"{args.stage2} holds no trained model; run `eve quickstart` first.")
        paths = require_assets(keys=("easy_vqa_train", "easy_vqa_test"))
    except EveError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    folder = Path(paths["easy_vqa_train"]).parent
    train_rows = json.loads(Path(paths["easy_vqa_train"]).read_text())
    test_rows = json.loads(Path(paths["easy_vqa_test"]).read_text())
    train_facts, test_facts = base.facts_by_image(train_rows), base.facts_by_image(test_rows)
    rows = known(base.balanced_rows(train_rows), train_facts)
    test = known(base.evaluation_rows(test_rows, 400), test_facts)

    processor = AutoProcessor.from_pretrained(args.stage2)
    processor.tokenizer.padding_side = "left"  # the last position of every row is the answer's
    tokenizer = processor.tokenizer
    model = EveForConditionalGeneration.from_pretrained(args.stage2, dtype=torch.float32)
    embeddings = model.get_input_embeddings().weight
    words = sorted({v for f in train_facts.values() for v in f.values()})
    ids = {w: tokenizer.encode(f" {w}", add_special_tokens=False)[0] for w in words}
    batch_facts: list[dict[str, str]] = []

    def replace_with_words(module, inputs, output):
        return word_slots(embeddings.detach(), ids, batch_facts, output.shape[1]).to(output.dtype)

    if args.slots == "words":
        model.projector.register_forward_hook(replace_with_words)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    yes, no = (tokenizer.encode(word, add_special_tokens=False)[0] for word in ("yes", "no"))

    def inputs(batch: list[dict], facts: dict):
        batch_facts[:] = [facts[r["image"]] for r in batch]
        texts = [processor.chat_prompt(r["conversations"][0]["value"]) for r in batch]
        images = [_open_rgb(str(folder / r["image"])) for r in batch]
        return processor(texts, images=images, padding=True)

    def accuracy() -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for first in range(0, len(test), 50):
                batch = test[first : first + 50]
                logits = model(**inputs(batch, test_facts), logits_to_keep=1).logits[:, -1]
                said = ["yes" if y > n else "no" for y, n in zip(logits[:, yes], logits[:, no], strict=True)]
                right += sum(s == base.answer_of(r) for s, r in zip(said, batch, strict=True))
        model.train()
        return round(100.0 * right / len(test), 2)

    machine = f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    report = {"slots": args.slots, "items": len(test), "machine": machine}
    print(json.dumps({"step": 0, "loss": None, "accuracy": accuracy(), "seconds": 0, **report}), flush=True)
    rng = random.Random(0)
    model.train()
    seconds = 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        batch = rng.sample(rows, args.batch_size)
        target = torch.tensor([yes if base.answer_of(r) == "yes" else no for r in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**inputs(batch, train_facts), logits_to_keep=1).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            line = {
                "step": step,
                "loss": round(loss.item(), 4),
                "accuracy": accuracy(),
                "seconds": round(seconds),
            }
            print(json.dumps({**line, **report}), flush=True)


if __name__ == "__main__":
    main()
