"""Batched, resumable greedy generation of a benchmark's answers into a LLaVA answers file.

Questions already in the answers file are skipped, so an interrupted run continues where it stopped; every
batch is appended and flushed as soon as it is generated. Batches never mix questions with and without an
image and group questions of similar length (little left padding; padding positions are excluded from
routing). Decoding is greedy with the KV cache, as LLaVA's scripts (`--temperature 0`). The prompt is the
question with `<image>` before it (LLaVA: `<image>\\n{question}`), rendered with the model's own chat template
and system prompt (`EveProcessor.chat_prompt`).
"""

from __future__ import annotations

import json
import os
import uuid

import torch
from tqdm.auto import tqdm

from eve_vlm.eval.bench.answers import answers_row, read_finished
from eve_vlm.eval.bench.base import Question
from eve_vlm.eval.vqa import stop_token_ids

__all__ = ["generate_benchmark_answers"]


def _batches(questions: list[Question], batch_size: int) -> list[list[Question]]:
    out = []
    for flag in (True, False):
        group = [q for q in questions if q.has_image == flag]
        group.sort(key=lambda q: (q.max_new_tokens, len(q.prompt)))
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            by_budget: dict[int, list[Question]] = {}
            for q in chunk:
                by_budget.setdefault(q.max_new_tokens, []).append(q)
            out.extend(by_budget.values())
    return out


@torch.no_grad()
def generate_benchmark_answers(
    model,
    processor,
    questions: list[Question],
    answers_file: str,
    *,
    model_id: str,
    batch_size: int = 8,
    desc: str = "bench",
    progress: bool = True,
) -> int:
    """Appends the answers to the questions not yet in `answers_file`.

    Args:
        model: An `EveForConditionalGeneration` in eval mode.
        processor: Its `EveProcessor`.
        questions: The benchmark's questions.
        answers_file: The LLaVA answers file (created, or continued).
        model_id: Written into every row.
        batch_size: Questions per generate call.
        desc: Progress-bar label.
        progress: Show a progress bar (with rate and ETA).

    Returns:
        How many answers were generated in this call.
    """
    os.makedirs(os.path.dirname(answers_file) or ".", exist_ok=True)
    done = read_finished(answers_file)
    todo = [q for q in questions if (str(q.question_id), q.prompt) not in done]
    tokenizer = processor.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    bar = tqdm(
        total=len(questions), initial=len(questions) - len(todo), desc=desc, unit="q", disable=not progress
    )
    generated = 0
    try:
        with open(answers_file, "a", encoding="utf-8") as f:
            for batch in _batches(todo, batch_size):
                texts = [
                    processor.chat_prompt(f"{processor.image_token}\n{q.prompt}" if q.has_image else q.prompt)
                    for q in batch
                ]
                images = [q.open_image() for q in batch if q.has_image]
                inputs = processor(texts, images=images or None, padding=True).to(model.device)
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
                out = model.generate(
                    **inputs,
                    max_new_tokens=batch[0].max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=pad_id,
                    eos_token_id=stop_ids or None,
                )
                new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (B, new)
                decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for q, text in zip(batch, decoded, strict=True):
                    # one line per answer: MME's and LLaVA's converters split files on newlines and tabs
                    clean = " ".join(text.split())
                    row = answers_row(q, clean, model_id, uuid.uuid4().hex)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                generated += len(batch)
                bar.update(len(batch))
    finally:
        tokenizer.padding_side = padding_side
        bar.close()
    return generated
