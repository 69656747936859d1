"""Routing analysis of the EVF layers under every token-allocation policy (the Eve paper's Fig. 3).

What is measured: image rows are batched as in training (the whole conversation rendered with the chat
template, teacher-forced, right padded by `EveCollator`; padding takes the language FFN and is never routed or
counted, as in training), and
the model is run once per allocation policy (`rts, position, bpr, gbpr, img_gbpr, modality`) with every EVF
switched to it (`ElasticVisionFFN.set_allocation`). For each EVF layer, summed over the batches:

- routed / kept / dropped assignments per expert, for image and for text tokens (kept + dropped = routed);
- the share of image (text) tokens routed to each expert, and the share kept there;
- "successful routing" (the paper's Fig. 3): the share of tokens actually processed by the expert they chose,
  i.e. kept / routed, for each modality; the drop rate is its complement;
- the mean router entropy (nats), weighted by the tokens of each batch.

Capacity: by default the **training** capacity factor. The model stays in eval mode (no dropout) and each EVF's
`eval_capacity_factor` is set to its `capacity_factor` for the run (restored afterwards), so the capacity is
exactly the one training applies to a micro-batch of the same size. `capacity="eval"` keeps the eval factor
(2.0 by default, which with E=2 drops nothing). The `rts` policy draws from torch's global RNG inside a
`fork_rng` block seeded with `seed`, so its draws repeat and the caller's RNG is untouched.

Plots (matplotlib, Agg backend): per-layer bars of kept and dropped shares per expert for the model's own
policy, and the Fig. 3 grid (first, middle and last EVF layer x policy: share of image and text tokens routed
to the vision experts, and the share kept by the expert it chose).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from tqdm.auto import tqdm

from eve_vlm.data.collator import EveCollator
from eve_vlm.data.conversations import ConversationEncoder
from eve_vlm.errors import ConfigError, DataError
from eve_vlm.model.allocation import ALLOCATION_POLICIES

__all__ = [
    "POLICIES",
    "evaluate_routing",
    "plot_routing",
    "routing_batches",
    "routing_examples",
    "summarize_counts",
]

POLICIES = tuple(ALLOCATION_POLICIES)
CAPACITIES = ("train", "eval")


def routing_examples(model, processor, rows: list, *, max_length: int = 2048) -> list[dict]:
    """The image rows encoded as in training (text-only rows are left out: they are never routed).

    Args:
        rows: `ConversationRow`s or `VQARow`s (their `.row` is used).

    Returns:
        `{"input_ids", "labels", "image"}` per image row, in row order.

    Raises:
        DataError: naming the row, when a row does not encode.
    """
    encoder = ConversationEncoder(
        processor.tokenizer,
        image_token=processor.image_token,
        image_token_id=model.config.image_token_id,
        num_image_tokens=model.config.num_image_tokens,
        max_length=max_length,
        system_prompt=processor.system_prompt,
    )
    examples = []
    for row in rows:
        row = getattr(row, "row", row)
        if row.image is not None:
            ex = encoder.encode(row)
            examples.append({"input_ids": ex.input_ids, "labels": ex.labels, "image": ex.image})
    return examples


def routing_batches(processor, examples: list[dict], *, batch_size: int = 4) -> Iterator[dict]:
    """Collated training-style batches (right padded by `EveCollator`, images loaded batch by batch).

    Yields:
        `input_ids`, `labels`, `attention_mask`, `pixel_values`.
    """
    pad_id = processor.tokenizer.pad_token_id
    collator = EveCollator(
        pad_id if pad_id is not None else processor.tokenizer.eos_token_id, processor.load_images
    )
    for chunk in _chunks(examples, batch_size):
        yield collator(chunk)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@contextmanager
def allocation_and_capacity(model, policy: str, capacity: str):
    """Every EVF switched to `policy` (and to its training capacity factor with `capacity="train"`)."""
    evfs = list(model.evf_layers.values())
    saved = [(evf.allocation, evf.eval_capacity_factor) for evf in evfs]
    try:
        for evf in evfs:
            evf.set_allocation(policy)
            if capacity == "train":
                evf.eval_capacity_factor = evf.capacity_factor
        yield
    finally:
        for evf, (allocation, factor) in zip(evfs, saved, strict=True):
            evf.set_allocation(allocation)
            evf.eval_capacity_factor = factor


def _zero_counts(num_experts: int) -> dict:
    keys = ("routed_image", "kept_image", "routed_text", "kept_text")
    return {
        **{k: torch.zeros(num_experts, dtype=torch.long) for k in keys},
        "entropy_sum": 0.0,
        "entropy_w": 0,
    }


def summarize_counts(counts: dict) -> dict:
    """Shares, success and drop rates of one layer from its summed counts (lists indexed by expert)."""
    out = {}
    for m in ("image", "text"):
        routed, kept = counts[f"routed_{m}"], counts[f"kept_{m}"]
        total, total_kept = int(routed.sum()), int(kept.sum())
        out[f"routed_{m}"] = routed.tolist()
        out[f"kept_{m}"] = kept.tolist()
        out[f"dropped_{m}"] = (routed - kept).tolist()
        out[f"share_routed_{m}"] = [int(r) / total if total else 0.0 for r in routed]
        out[f"share_kept_{m}"] = [int(k) / total if total else 0.0 for k in kept]
        out[f"success_{m}"] = total_kept / total if total else 1.0
        out[f"drop_rate_{m}"] = 1.0 - out[f"success_{m}"]
        out[f"vision_routed_{m}"] = sum(out[f"share_routed_{m}"][1:])
        out[f"vision_kept_{m}"] = sum(out[f"share_kept_{m}"][1:])
    out["entropy"] = counts["entropy_sum"] / counts["entropy_w"] if counts["entropy_w"] else 0.0
    return out


@torch.no_grad()
def _run_policy(
    model, batches: Callable[[], Iterator[dict]], policy: str, capacity: str, seed: int, progress: bool
) -> dict:
    layers = model.evf_layers
    counts = {i: _zero_counts(evf.num_experts) for i, evf in layers.items()}
    device = model.device
    with allocation_and_capacity(model, policy, capacity), torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in tqdm(batches(), desc=f"routing {policy}", disable=not progress):
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            routing = model(**inputs, output_routing=True).routing
            for i, stats in routing.items():
                c = counts[i]
                for key in ("routed_image", "kept_image", "routed_text", "kept_text"):
                    c[key] += getattr(stats, key).cpu()
                weight = int(stats.tokens_per_expert.sum())
                c["entropy_sum"] += float(stats.entropy) * weight
                c["entropy_w"] += weight
    return {str(i): summarize_counts(c) for i, c in counts.items()}


def evaluate_routing(
    model,
    processor,
    rows: list,
    *,
    policies: tuple[str, ...] | list[str] = POLICIES,
    capacity: str = "train",
    batch_size: int = 4,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Routing statistics of every EVF layer under each allocation policy.

    Args:
        model: An `EveForConditionalGeneration` with EVF layers (kept in eval mode).
        processor: Its `EveProcessor`.
        rows: `ConversationRow`s or `VQARow`s; only those with an image are used.
        policies: Allocation policies to compare.
        capacity: "train" (each EVF's training capacity factor) or "eval".
        batch_size: Rows per forward (the capacity is computed over a batch, as in training).
        limit: Use only the first `limit` image rows.
        seed: Seed of the `rts` policy's draws.
        progress: Show progress bars.

    Returns:
        `{"policy" (the model's own), "capacity", "capacity_factor", "rows", "tokens": {"image", "text",
        "padding"}, "layers": [...], "num_experts", "policies": {policy: {layer (str): summarize_counts(...)}}}`.
        Padding positions are not routed and not in the counts (`tokens["padding"]` says how many there were).

    Raises:
        ConfigError: the model has no EVF layer, or an unknown policy or capacity.
        DataError: no row has an image.
    """
    layers = model.evf_layers
    if not layers:
        raise ConfigError("The model has no Elastic Vision FFN layers; routing needs a stage-3 (EVF) model.")
    if capacity not in CAPACITIES:
        raise ConfigError(f"capacity={capacity!r}; use one of {CAPACITIES}.")
    unknown = [p for p in policies if p not in ALLOCATION_POLICIES]
    if unknown:
        raise ConfigError(f"Unknown allocation policies {unknown}; choose from {list(POLICIES)}.")
    image_rows = [r for r in rows if getattr(r, "image", None) is not None]
    image_rows = image_rows[:limit] if limit is not None else image_rows
    if not image_rows:
        raise DataError("No row has an image, so no token is routed; give an eval file with image rows.")
    model.eval()
    examples = routing_examples(model, processor, image_rows)
    make_batches = partial(routing_batches, processor, examples, batch_size=batch_size)
    per_policy = {p: _run_policy(model, make_batches, p, capacity, seed, progress) for p in policies}
    lengths = [len(ex["input_ids"]) for ex in examples]
    image_tokens = sum(ex["input_ids"].count(model.config.image_token_id) for ex in examples)
    padded = sum(max(chunk) * len(chunk) for chunk in _chunks(lengths, batch_size))
    tokens = {"image": image_tokens, "text": sum(lengths) - image_tokens, "padding": padded - sum(lengths)}
    first = next(iter(layers.values()))
    return {
        "policy": first.allocation,
        "capacity": capacity,
        "capacity_factor": first.capacity_factor if capacity == "train" else first.eval_capacity_factor,
        "rows": len(image_rows),
        "tokens": tokens,
        "layers": sorted(layers),
        "num_experts": first.num_experts,
        "policies": per_policy,
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(metrics: dict, path: str, policy: str | None = None) -> str:
    """Per-layer bars for one policy: kept and dropped share of image and of text tokens per expert."""
    plt = _pyplot()
    policy = policy or metrics["policy"]
    if policy not in metrics["policies"]:
        policy = next(iter(metrics["policies"]))
    per_layer = metrics["policies"][policy]
    layers = list(per_layer)
    experts = metrics["num_experts"]
    fig, axes = plt.subplots(1, 2, figsize=(5 + 0.6 * len(layers) * experts, 3.6), sharey=True)
    width = 0.8 / experts
    for ax, modality in zip(axes, ("image", "text"), strict=True):
        for e in range(experts):
            xs = [k + (e - (experts - 1) / 2) * width for k in range(len(layers))]
            kept = [per_layer[layer][f"share_kept_{modality}"][e] for layer in layers]
            routed = [per_layer[layer][f"share_routed_{modality}"][e] for layer in layers]
            name = "language" if e == 0 else f"vision {e}"
            ax.bar(xs, kept, width, label=f"{name} kept", color=f"C{e}")
            dropped = [r - k for r, k in zip(routed, kept, strict=True)]
            ax.bar(xs, dropped, width, bottom=kept, label=f"{name} dropped", color=f"C{e}", alpha=0.35)
        ax.set_xticks(range(len(layers)), [f"L{layer}" for layer in layers])
        ax.set_title(f"{modality} tokens")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("EVF layer")
    axes[0].set_ylabel("share of tokens")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Routing per layer ({policy}, {metrics['capacity']} capacity)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_policies(metrics: dict, path: str) -> str:
    """The paper's Fig. 3 layout: first, middle and last EVF layer x policy; for image and for text tokens, the
    share routed to the vision experts and the share kept by the expert it chose (successful routing)."""
    plt = _pyplot()
    layers = [str(x) for x in metrics["layers"]]
    picked = list(dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]))
    policies = list(metrics["policies"])
    series = [
        ("vision_routed_image", "image: routed to vision", "C1", 1.0),
        ("success_image", "image: kept (successful)", "C1", 0.45),
        ("vision_routed_text", "text: routed to vision", "C0", 1.0),
        ("success_text", "text: kept (successful)", "C0", 0.45),
    ]
    fig, axes = plt.subplots(1, len(picked), figsize=(4.2 * len(picked), 3.8), sharey=True, squeeze=False)
    width = 0.2
    for ax, layer in zip(axes[0], picked, strict=True):
        for s, (key, label, color, alpha) in enumerate(series):
            xs = [k + (s - 1.5) * width for k in range(len(policies))]
            values = [metrics["policies"][p][layer][key] for p in policies]
            ax.bar(xs, values, width, label=label, color=color, alpha=alpha)
        ax.set_xticks(range(len(policies)), policies, rotation=30, fontsize=8)
        ax.set_title(f"EVF layer {layer}")
        ax.set_ylim(0, 1.15)
    axes[0][0].set_ylabel("share of tokens")
    axes[0][-1].legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(f"Successful routing by allocation policy ({metrics['capacity']} capacity)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing(metrics: dict, out_dir: str | os.PathLike, prefix: str = "") -> list[str]:
    """Writes `routing_layers.png` and `routing_policies.png` (with `prefix`) into `out_dir`; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    return [
        plot_layers(metrics, os.path.join(out_dir, f"{prefix}routing_layers.png")),
        plot_policies(metrics, os.path.join(out_dir, f"{prefix}routing_policies.png")),
    ]
