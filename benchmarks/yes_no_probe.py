"""Can the default LLM learn easy-VQA's yes/no comparison when the image is given as text?

easy-VQA's yes/no questions ("Is there not a red shape?") are answered from their form alone by every quickstart
model (`docs/yes-no-from-image-tokens.md`). This probe asks whether the comparison itself is learnable by
the LLM at the quickstart's budget: SmolLM2-135M-Instruct (from `eve prepare`) with LoRA (r 16, alpha 32, every
linear layer) is trained in train mode on text prompts "The image shows a <colour> <shape>.\\n<question>" in its
chat template (empty system message), where the question is one of the yes/no questions of the easy-VQA test
split (88 of them), drawn uniformly, and the shape's colour and shape are drawn so that "yes" and "no" are
equally likely for every question: the question's text alone predicts nothing (`question_only`, the accuracy of
answering each held-out question with its majority answer in the training draws, is near 50%). The loss is the
cross-entropy of the answer token at the last position (logits of the whole vocabulary); accuracy is "yes"
against "no" logits on held-out prompts drawn the same way (eval mode, no gradients), before training and every
`--eval-every` steps. Nothing is dropped; no image is involved.

Output: one JSON line per evaluation (`step`, `loss` of the last batch, `accuracy`, `seconds` of training so far,
`machine`; the first line also `question_only`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eve_vlm.assets import asset_paths  # noqa: E402
from eve_vlm.data.builtin.easy_vqa import COLORS, SHAPES  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def answer(question: str, colour: str, shape: str) -> str:
    """The answer to an easy-VQA yes/no question about a `colour` `shape`."""
    words = re.findall(r"[a-z]+", question.lower())
    negated = "not" in words or "no" in words
    present = colour in words or shape in words
    return "yes" if present != negated else "no"


def sample(rng: random.Random, questions: list[str]) -> tuple[str, str]:
    """One prompt and its answer: a question drawn uniformly, then "yes" or "no" with equal probability, then
    a colour and shape that give that answer; so each question (and each form) is answered "yes" half of the
    time and the question alone predicts nothing."""
    question, wanted = rng.choice(questions), rng.choice(["yes", "no"])
    while True:
        colour, shape = rng.choice(COLORS), rng.choice(SHAPES)
        if answer(question, colour, shape) == wanted:
            return f"The image shows a {colour} {shape}.\n{question}", wanted


def question_only_accuracy(train: list[tuple[str, str]], held_out: list[tuple[str, str]]) -> float:
    """Accuracy on `held_out` of answering each question with its majority answer in `train` ("no" for a
    question `train` lacks): what the question's text alone scores, with no look at the image."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for prompt, said in train:
        counts[prompt.split("\n", 1)[1]][said] += 1
    right = sum((counts[p.split("\n", 1)[1]].most_common(1) or [("no", 0)])[0][0] == a for p, a in held_out)
    return 100.0 * right / len(held_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-items", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = asset_paths()
    rows = json.loads(Path(paths["easy_vqa_test"]).read_text())
    questions = sorted(
        {r["conversations"][0]["value"].split("\n", 1)[1] for r in rows if r["question_type"] == "yes-no"}
    )
    tokenizer = AutoTokenizer.from_pretrained(paths["llm"])
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(paths["llm"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    yes, no = tokenizer.encode("yes")[0], tokenizer.encode("no")[0]

    def encode(prompts: list[str]) -> dict:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "system", "content": ""}, {"role": "user", "content": p}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for p in prompts
        ]
        return tokenizer(texts, return_tensors="pt", padding=True)

    rng_test = random.Random(1)
    held_out = [sample(rng_test, questions) for _ in range(args.eval_items)]

    def accuracy() -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for start in range(0, len(held_out), 50):
                batch = held_out[start : start + 50]
                logits = model(**encode([p for p, _ in batch]), logits_to_keep=1).logits[:, -1]
                said = ["yes" if y > n else "no" for y, n in zip(logits[:, yes], logits[:, no], strict=True)]
                right += sum(s == a for s, (_, a) in zip(said, batch, strict=True))
        model.train()
        return 100.0 * right / len(held_out)

    machine = f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    rng = random.Random(0)
    train = [sample(rng, questions) for _ in range(args.steps * args.batch_size)]
    baseline = round(question_only_accuracy(train, held_out), 1)
    first = {"step": 0, "loss": None, "accuracy": accuracy(), "question_only": baseline, "seconds": 0.0}
    print(json.dumps({**first, "machine": machine}), flush=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    seconds = 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        batch = train[(step - 1) * args.batch_size : step * args.batch_size]
        logits = model(**encode([p for p, _ in batch]), logits_to_keep=1).logits[:, -1]
        target = torch.tensor([yes if a == "yes" else no for _, a in batch])
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds += time.perf_counter() - start
        if step % args.eval_every == 0:
            line = {
                "step": step,
                "loss": round(loss.item(), 3),
                "accuracy": accuracy(),
                "seconds": round(seconds),
            }
            print(json.dumps({**line, "machine": machine}), flush=True)


if __name__ == "__main__":
    main()
