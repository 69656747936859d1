"""Language ability next to the base LLM: text perplexity and multiple-choice accuracy, with deltas.

What is measured, for the Eve model and for its base LLM in the same run:

- **Perplexity** of text files: each text is tokenised on its own and cut into non-overlapping chunks of
  `chunk_len` tokens; every token of a chunk but its first is predicted from the chunk's earlier tokens.
  `perplexity = exp(sum NLL / tokens)` over all predicted tokens (counted exactly, padding excluded).
- **Multiple choice** by log-likelihood, as lm-evaluation-harness scores `output_type: multiple_choice`
  (`lm_eval/api/model.py` `_encode_pair`, `HFLM._loglikelihood_tokens`): context
  `"Question: {question}\\nAnswer:"`, continuation `" " + choice`; the continuation tokens are those of the
  whole string past the context's tokens; score = summed log-probability of the continuation tokens; the
  prediction is the argmax. `acc_norm` divides each score by the choice's length in characters (lm-eval's
  `acc_norm`).

Text-only inputs reach the Eve model as `model(input_ids=..., attention_mask=...)` with no `pixel_values`, so
the elastic path runs (LoRA off, every EVF on its language FFN); an Eve model's deltas must be exactly 0.

The base is a transformers causal LM loaded with `AutoModelForCausalLM`: `--base DIR`, or by default the base
LLM recorded in the model's config at stage 1 (`EveConfig.base_language_model`: its folder and the sha256 of
its weights, checked before use). It is never the Eve model's own language model: a model whose text path
really changed (a full-LLM stage 2) would then be compared with itself. Both are scored with the Eve processor's
`text_tokenizer`: the base LLM's own, without the `<image>` placeholder, so a literal "<image>" in a text stays
text.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from eve_vlm.errors import ConfigError, DataError

__all__ = [
    "MC_PROMPT",
    "encode_choice",
    "evaluate_language",
    "load_mc_items",
    "load_recorded_base",
    "load_texts",
    "mc_accuracy",
    "mc_loglikelihoods",
    "perplexity",
    "score_language",
]

MC_PROMPT = "Question: {question}\nAnswer:"
MC_TARGET_DELIMITER = " "


def load_recorded_base(model: nn.Module) -> tuple[nn.Module, str]:
    """The base LLM recorded in an Eve model's config at stage 1, loaded after checking its weights' sha256, on
    the model's device and at its dtype.

    Returns:
        `(base causal LM in eval mode, its description)`.

    Raises:
        ConfigError: Nothing is recorded, the folder is gone, or its weights changed since stage 1; the message
            says to pass the base explicitly (`--base DIR`).
    """
    from transformers import AutoModelForCausalLM

    from eve_vlm.assets import weights_sha256
    from eve_vlm.device import placement_like

    recorded = getattr(getattr(model, "config", None), "base_language_model", None)
    if not recorded:
        raise ConfigError(
            f"{type(model).__name__} records no base LLM (models built by `eve train` stage 1 do); pass the base "
            "LLM folder with --base DIR (Python: base=AutoModelForCausalLM.from_pretrained(DIR))."
        )
    path = Path(recorded["path"])
    if not path.is_dir():
        raise ConfigError(
            f"The base LLM recorded at stage 1, {path}, does not exist here; pass its folder with --base DIR."
        )
    if weights_sha256(path) != recorded["sha256"]:
        raise ConfigError(
            f"The weights in {path} changed since stage 1 recorded them (sha256 differs), so it is not the base "
            "this model was built from; pass the right folder with --base DIR."
        )
    base = AutoModelForCausalLM.from_pretrained(path, **placement_like(model)).eval()
    return base, f"{path} (recorded at stage 1)"


def load_texts(path: str | os.PathLike) -> list[str]:
    """A `.txt` file (one text) or a `.jsonl` file with a `text` field per line.

    Raises:
        DataError: naming the file (and line), when it is missing, empty, or a line is malformed.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"Text file {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            texts = [f.read()]
        else:
            texts = []
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}, line {line}: malformed JSON ({e.msg} at column {e.colno})."
                    ) from e
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}, line {line}: each line must be an object with a string 'text'.")
                texts.append(record["text"])
    if not any(t.strip() for t in texts):
        raise DataError(f"Text file {path} holds no text.")
    return texts


def load_mc_items(path: str | os.PathLike) -> list[dict]:
    """Multiple-choice items from JSONL: `{"question": str, "choices": [str, ...], "label": int}` per line.

    Raises:
        DataError: naming the file and line of a malformed item.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"Multiple-choice file {path} does not exist.")
    items = []
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line}: malformed JSON ({e.msg} at column {e.colno}).") from e
            ok = (
                isinstance(item, dict)
                and isinstance(item.get("question"), str)
                and isinstance(item.get("choices"), list)
                and len(item["choices"]) >= 2
                and all(isinstance(c, str) for c in item["choices"])
                and isinstance(item.get("label"), int)
                and 0 <= item["label"] < len(item["choices"])
            )
            if not ok:
                raise DataError(
                    f"{path}, line {line}: an item needs 'question' (string), 'choices' (2 or more strings) and "
                    "'label' (the index of the right choice)."
                )
            items.append(item)
    if not items:
        raise DataError(f"Multiple-choice file {path} holds no item.")
    return items


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _token_logprobs(model: nn.Module, sequences: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """For each sequence, the fp32 log-probability of tokens 1.. given the earlier ones: [len - 1] each."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T), right padded
    mask = torch.zeros_like(ids)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    logprobs = logits[:, :-1].float().log_softmax(dim=-1)
    picked = logprobs.gather(-1, ids[:, 1:].to(device)[..., None]).squeeze(-1).cpu()  # (B, T-1)
    return [picked[b, : len(s) - 1] for b, s in enumerate(sequences)]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    chunk_len: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Perplexity over non-overlapping `chunk_len`-token chunks of each text.

    Returns:
        `{"perplexity", "nll" (mean per token, nats), "tokens" (predicted tokens)}`.
    """
    chunks = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        chunks += [ids[i : i + chunk_len] for i in range(0, len(ids), chunk_len)]
    chunks = [c for c in chunks if len(c) > 1]
    if not chunks:
        raise DataError(f"The texts hold too few tokens for a perplexity (chunks of {chunk_len} tokens).")
    total, count = 0.0, 0
    for start in tqdm(range(0, len(chunks), batch_size), desc="perplexity", disable=not progress):
        for lp in _token_logprobs(model, chunks[start : start + batch_size], _pad_id(tokenizer)):
            total -= float(lp.double().sum())
            count += lp.numel()
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_choice(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing context spaces move to the continuation, and the continuation
    tokens are those of the whole string past the context's tokens. Where the tokenizer merges across the
    boundary (the whole string does not start with the context's tokens), the continuation is encoded on its
    own instead, so no context token is scored as part of a choice.

    Raises:
        ValueError: The continuation encodes to no token (it would score 0, the best possible score).
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    if whole[: len(context_ids)] == context_ids:
        continuation_ids = whole[len(context_ids) :]
    else:
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
    if not continuation_ids:
        raise ValueError(f"the choice {continuation!r} encodes to no token after its context")
    return context_ids, continuation_ids


@torch.no_grad()
def mc_loglikelihoods(
    model: nn.Module, tokenizer, items: list[dict], *, batch_size: int = 8, progress: bool = False
) -> list[list[float]]:
    """Summed log-probability of every choice's continuation given the item's question, per item.

    An item's context is `MC_PROMPT` around its `question`, or its own `context` string when it has one (a
    benchmark's published template, few-shot examples included).
    """
    requests = []  # (item index, context ids, continuation ids)
    for k, item in enumerate(items):
        context = item.get("context") or MC_PROMPT.format(question=item["question"])
        for choice in item["choices"]:
            try:
                requests.append((k, *encode_choice(tokenizer, context, MC_TARGET_DELIMITER + choice)))
            except ValueError as e:
                raise ValueError(f"multiple-choice item {k} ({item['question'][:60]!r}): {e}") from None
    scores: list[list[float]] = [[] for _ in items]
    for start in tqdm(range(0, len(requests), batch_size), desc="multiple choice", disable=not progress):
        batch = requests[start : start + batch_size]
        logprobs = _token_logprobs(model, [ctx + cont for _, ctx, cont in batch], _pad_id(tokenizer))
        for (k, _, cont), lp in zip(batch, logprobs, strict=True):
            scores[k].append(float(lp[len(lp) - len(cont) :].double().sum()))
    return scores


def mc_accuracy(items: list[dict], scores: list[list[float]]) -> dict:
    """`{"acc", "acc_norm", "items"}` (percentages) from per-choice log-likelihoods; `acc_norm` divides each
    log-likelihood by the choice's length in characters, as lm-eval's multiple-choice `acc_norm` does."""
    acc = norm = 0
    for item, s in zip(items, scores, strict=True):
        acc += max(range(len(s)), key=s.__getitem__) == item["label"]
        per_char = [v / max(1, len(c)) for v, c in zip(s, item["choices"], strict=True)]
        norm += max(range(len(s)), key=per_char.__getitem__) == item["label"]
    return {"acc": 100.0 * acc / len(items), "acc_norm": 100.0 * norm / len(items), "items": len(items)}


def _with_deltas(ours: dict, base: dict, keys: tuple[str, ...]) -> dict:
    out = {k: v for k, v in ours.items() if k not in keys}
    for k in keys:
        out[f"model_{k}"], out[f"base_{k}"], out[f"delta_{k}"] = ours[k], base[k], ours[k] - base[k]
    return out


def score_language(
    model: nn.Module,
    tokenizer,
    texts: list[str] | None,
    mc_items: list[dict] | dict[str, list[dict]] | None,
    *,
    chunk_len: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Scores one causal LM on the texts and multiple-choice sets.

    Returns:
        `{"text": perplexity(...) or None, "mc": {set name: mc_accuracy(...)}}`; a list of items is the set
        "mc". Pass it as `base_scores` to `evaluate_language` to compare several models with one base run.
    """
    model.eval()
    out: dict = {"text": None, "mc": {}}
    if texts:
        out["text"] = perplexity(
            model, tokenizer, texts, chunk_len=chunk_len, batch_size=batch_size, progress=progress
        )
    if isinstance(mc_items, list):
        mc_items = {"mc": mc_items}
    for name, items in (mc_items or {}).items():
        lls = mc_loglikelihoods(model, tokenizer, items, batch_size=batch_size, progress=progress)
        out["mc"][name] = mc_accuracy(items, lls)
    return out


def _sizes(scores: dict) -> tuple:
    """What identifies the inputs `score_language` scored: text tokens and items per MC set."""
    text = scores.get("text")
    return text and text["tokens"], {name: acc["items"] for name, acc in scores.get("mc", {}).items()}


def _check_same_sets(ours: dict, base_scores: dict) -> None:
    """`base_scores` must come from the same texts and items as `ours` (token and item counts agree)."""
    if _sizes(ours) != _sizes(base_scores):
        raise ConfigError(
            "base_scores were not computed on the same texts and multiple-choice sets (text tokens, items "
            f"per set: {_sizes(ours)} vs {_sizes(base_scores)}); score the base with score_language on the "
            "same inputs and chunk length."
        )


def evaluate_language(
    model: nn.Module,
    tokenizer,
    texts: list[str] | None,
    mc_items: list[dict] | dict[str, list[dict]] | None,
    base: nn.Module | None = None,
    *,
    chunk_len: int = 512,
    batch_size: int = 8,
    base_name: str | None = None,
    base_scores: dict | None = None,
    progress: bool = False,
) -> dict:
    """Scores the model and its base LLM on the same texts and items; reports each delta (model - base).

    Args:
        model: An `EveForConditionalGeneration` (or any causal LM taking `input_ids`, `attention_mask`).
        tokenizer: The tokenizer for both.
        texts: Texts for perplexity, or None.
        mc_items: Multiple-choice items, or several named sets (`{"piqa": [...], ...}`), or None.
        base: The base causal LM; None = the one recorded in the model's config (`load_recorded_base`). Not
            used when `base_scores` is given.
        chunk_len: Tokens per perplexity chunk.
        batch_size: Sequences per forward.
        base_name: How the base is described in the report (default: what it is).
        base_scores: The base's `score_language` result on the same texts, items and chunk length, to
            compare several models with one scoring of the base.
        progress: Show progress bars.

    Returns:
        `{"base": description, "text": {"tokens", "model_perplexity", "base_perplexity", "delta_perplexity",
        "model_nll", ...} or None, "mc": {set name: {"items", "model_acc", "base_acc", "delta_acc",
        "model_acc_norm", ...}}}`.

    Raises:
        ConfigError: `base` and `base_scores` are None and the model records no usable base LLM
            (`load_recorded_base`); `base_scores` come from other texts or sets.
    """
    if base_scores is None and base is None:
        base, recorded_name = load_recorded_base(model)
        base_name = base_name or recorded_name
    kw = dict(chunk_len=chunk_len, batch_size=batch_size, progress=progress)
    ours = score_language(model, tokenizer, texts, mc_items, **kw)
    if base_scores is None:
        base_scores = score_language(base, tokenizer, texts, mc_items, **kw)
        base_name = base_name or type(base).__name__
    _check_same_sets(ours, base_scores)
    out: dict = {"base": base_name or "precomputed base scores", "text": None, "mc": {}}
    if ours["text"] is not None:
        out["text"] = _with_deltas(ours["text"], base_scores["text"], ("perplexity", "nll"))
    for name, acc in ours["mc"].items():
        out["mc"][name] = _with_deltas(acc, base_scores["mc"][name], ("acc", "acc_norm"))
    return out
