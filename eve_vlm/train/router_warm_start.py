"""Modality-aware router warm start for stage 3 [ours, not the paper's].

Why: right after EVF insertion the vision FFN is a copy of the language FFN, so the two experts compute the
same thing and nothing tells a router which one a token should take; with the paper's N(0, 0.02) router and
a balance loss that pulls towards an even split, the routers stay at entropy ln 2 (a fixed random split of
hidden-state space) for the few dozen steps of a short stage 3.

What: before stage 3 trains, the EVF inputs (the post-attention-norm hidden states) of a few training
micro-batches are captured with forward pre-hooks (no gradient, eval mode, padding left out), and each
layer's router `Linear(D, E, bias=False)` is fitted on them by full-batch logistic regression towards soft
targets: image tokens put probability `confidence` on the vision experts (shared evenly among them), text
tokens put `confidence` on the language FFN. Image tokens then start on the vision FFN and text tokens on the
language FFN, and training moves them from there (the fitted router is an ordinary trainable weight).

Soft targets keep the fitted logits finite, so the routers are confident (entropy about 0.33 nats at 0.9)
but not saturated, and the combine weight's gradient still reaches them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = ["capture_evf_inputs", "fit_router", "warm_start_routers"]


@torch.no_grad()
def capture_evf_inputs(model, batches: Iterable[dict]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Runs `batches` through `model` (eval mode, no gradient) and returns, per EVF layer, the fp32 inputs of
    its non-padding tokens [N, D] and their image mask [N] bool."""
    evfs = model.evf_layers
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in evfs}
    keep: list[torch.Tensor | None] = [None]  # the current batch's non-padding positions, (B, T) bool

    def hook(layer_idx):
        def capture(module, args):
            (hidden,), inputs = args, module.bound_inputs
            if inputs is None:
                raise RuntimeError(f"EVF layer {layer_idx} was called without its routing inputs")
            image_mask = inputs.image_mask
            valid = keep[0] if keep[0] is not None else torch.ones_like(image_mask, dtype=torch.bool)
            captured[layer_idx].append((hidden[valid].float().cpu(), image_mask[valid].bool().cpu()))

        return capture

    handles = [evf.register_forward_pre_hook(hook(i)) for i, evf in evfs.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            mask = batch.get("attention_mask")
            keep[0] = mask.bool() if mask is not None else None
            batch.pop("labels", None)
            model(**batch, output_routing=True)  # binds the routing inputs for text-only batches too
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {
        i: (torch.cat([h for h, _ in parts]), torch.cat([m for _, m in parts]))
        for i, parts in captured.items()
    }


def fit_router(
    weight: torch.Tensor,  # (E, D)
    hidden: torch.Tensor,  # (N, D) fp32
    image_mask: torch.Tensor,  # (N,) bool
    *,
    confidence: float = 0.9,
    steps: int = 200,
    lr: float = 0.05,
) -> torch.Tensor:
    """The router weight fitted (from `weight`) towards the modality soft targets; returns a new (E, D)
    fp32 tensor. Full-batch Adam on the cross-entropy with soft targets."""
    num_experts = weight.shape[0]
    target_text = torch.full((num_experts,), (1 - confidence) / (num_experts - 1))
    target_text[0] = confidence
    target_image = torch.full((num_experts,), confidence / (num_experts - 1))
    target_image[0] = 1 - confidence
    targets = torch.where(image_mask[:, None], target_image, target_text)  # (N, E)
    # Class-balanced: image tokens are usually a minority of a conversation's tokens.
    n_image = image_mask.sum().clamp(min=1)
    n_text = (~image_mask).sum().clamp(min=1)
    token_weight = torch.where(image_mask, 0.5 / n_image, 0.5 / n_text)
    w = weight.detach().float().cpu().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            log_probs = F.log_softmax(hidden @ w.t(), dim=-1)
            loss = -((targets * log_probs).sum(dim=-1) * token_weight).sum()
            loss.backward()
            optimizer.step()
    return w.detach()


def warm_start_routers(
    model, batches: Iterable[dict], *, confidence: float = 0.9, log=print
) -> dict[int, dict]:
    """Fits every EVF router of `model` on the modality of the tokens of `batches`, in place.

    Returns:
        Per layer: `image_to_vision` and `text_to_vision` (share of tokens whose top-1 is a vision expert) and
        `entropy` (mean router entropy, nats) on the captured tokens after the fit.
    """
    inputs = capture_evf_inputs(model, batches)
    report = {}
    for layer_idx, evf in model.evf_layers.items():
        hidden, image_mask = inputs[layer_idx]
        fitted = fit_router(evf.router.weight, hidden, image_mask, confidence=confidence)
        with torch.no_grad():
            evf.router.weight.copy_(fitted.to(evf.router.weight))
            probs = (hidden @ fitted.t()).softmax(dim=-1)
            to_vision = probs.argmax(dim=-1) > 0
        report[layer_idx] = {
            "image_to_vision": float(to_vision[image_mask].float().mean()) if image_mask.any() else 0.0,
            "text_to_vision": float(to_vision[~image_mask].float().mean()) if (~image_mask).any() else 0.0,
            "entropy": float(torch.special.entr(probs).sum(dim=-1).mean()),
        }
    if report:
        n = len(report)
        log(
            "router warm start: "
            f"{sum(r['image_to_vision'] for r in report.values()) / n:.1%} of image tokens and "
            f"{sum(r['text_to_vision'] for r in report.values()) / n:.1%} of text tokens to the vision FFN, "
            f"mean entropy {sum(r['entropy'] for r in report.values()) / n:.3f} nats "
            f"({n} layers, {len(hidden)} tokens)"
        )
    return report
