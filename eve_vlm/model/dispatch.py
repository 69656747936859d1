"""Dispatch of routed tokens to their experts, and the routing statistics of one EVF call.

`dispatch` groups the kept assignments by expert, runs each expert once on its tokens and puts the weighted
outputs back in token order; `dispatch_all_kept` is its top-1, nothing-dropped case (eval mode);
`routing_stats` counts assignments per modality and expert. `ElasticVisionFFN` (evf.py) calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["RoutingStats", "dispatch", "dispatch_all_kept", "routing_stats"]


@dataclass
class RoutingStats:
    """Routing statistics of one EVF forward (detached tensors on the input's device); padding positions are
    not counted.

    Attributes:
        routed_image: [E] long, image-token assignments per chosen expert (before capacity).
        routed_text: [E] long, text-token assignments per chosen expert (before capacity).
        kept_image: [E] long, image-token assignments the expert processed.
        kept_text: [E] long, text-token assignments the expert processed.
        capacity: Per-expert capacity applied; where no limit applies (`modality`, or a batch without
            image tokens) it is the number of assignments.
        entropy: 0-dim fp32 mean router entropy over tokens (nats); 0 when the router did not run.
    """

    routed_image: Tensor
    routed_text: Tensor
    kept_image: Tensor
    kept_text: Tensor
    capacity: int
    entropy: Tensor

    @property
    def dropped_image(self) -> Tensor:
        """[E] image-token assignments dropped for lack of capacity."""
        return self.routed_image - self.kept_image

    @property
    def dropped_text(self) -> Tensor:
        """[E] text-token assignments dropped for lack of capacity."""
        return self.routed_text - self.kept_text

    def plus_language_only(self, other: RoutingStats) -> RoutingStats:
        """These statistics plus those of sequences that took the language-only path (`other`)."""
        return RoutingStats(
            self.routed_image + other.routed_image,
            self.routed_text + other.routed_text,
            self.kept_image + other.kept_image,
            self.kept_text + other.kept_text,
            self.capacity,
            self.entropy,
        )

    @property
    def tokens_per_expert(self) -> Tensor:
        """[E] assignments per chosen expert, image and text together."""
        return self.routed_image + self.routed_text


def dispatch(
    experts: Sequence[nn.Module], x: Tensor, expert_idx: Tensor, keep: Tensor | None, weights: Tensor | None
) -> Tensor:
    """Group the kept assignments (`keep` None: all) by expert with one stable argsort, gather their tokens
    once, run each expert on its slice, and gather `weight * output` back to token order (dropped
    assignments read a zero row; `weights` None: every weight is 1, nothing is multiplied). Returns [S, D] in
    the input dtype.

    One token with one expert (a decoding step of one sequence) runs that expert directly: no sort, no
    count, no copy.

    The way back is a gather with the inverse permutation rather than `index_add_`: the same result
    and cost order, but CPU `index_add_` slows down badly when the cores are shared."""
    num_tokens, top_k = expert_idx.shape
    if num_tokens == 1 and top_k == 1 and keep is None:
        out = experts[int(expert_idx)](x.unsqueeze(0)).squeeze(0)  # bf16 under autocast
        return out.to(x.dtype) if weights is None else out * weights.to(x.dtype)
    if keep is None and top_k == 1:
        return dispatch_all_kept(experts, x, expert_idx[:, 0], None if weights is None else weights[:, 0])
    if weights is None:
        weights = x.new_ones(expert_idx.shape)
    bucket = expert_idx if keep is None else torch.where(keep, expert_idx, len(experts))
    bucket = bucket.reshape(-1)  # (S*K,), dropped -> E
    order = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=len(experts) + 1).tolist()  # the one host sync
    num_kept = num_tokens * top_k - counts[-1]
    kept = order[:num_kept]
    x_sorted = x.index_select(0, kept // top_k)  # (N_kept, D)
    w_sorted = weights.reshape(-1).index_select(0, kept).to(x.dtype)[:, None]
    pieces = [
        expert(xs.unsqueeze(0)).squeeze(0) * ws
        for expert, xs, ws in zip(
            experts, x_sorted.split(counts[:-1]), w_sorted.split(counts[:-1]), strict=True
        )
        if len(xs)
    ]
    pieces.append(x.new_zeros(1, x.shape[1]))  # row N_kept: what dropped assignments receive
    position = torch.full_like(order, num_kept)
    position[kept] = torch.arange(num_kept, device=order.device)  # (S*K,) row of each assignment
    out = torch.cat(pieces).index_select(0, position)  # (S*K, D)
    return out if top_k == 1 else out.view(num_tokens, top_k, -1).sum(dim=1)


def dispatch_all_kept(
    experts: Sequence[nn.Module], x: Tensor, chosen: Tensor, weights: Tensor | None
) -> Tensor:
    """`dispatch` for top-1 routing with nothing dropped (eval mode): every token has exactly one expert,
    so each expert's weighted output (`weights` None: the output as it is) is copied straight to its tokens'
    rows (one sort and one count, no concatenation, no gather back). The experts see the same token groups,
    in the same order."""
    order = torch.argsort(chosen, stable=True)
    counts = torch.bincount(chosen, minlength=len(experts)).tolist()  # the one host sync
    out = torch.empty_like(x)
    for expert, rows in zip(experts, order.split(counts), strict=True):
        if len(rows):
            y = expert(x.index_select(0, rows).unsqueeze(0)).squeeze(0).to(x.dtype)  # bf16 under autocast
            if weights is not None:
                y = y * weights.index_select(0, rows).to(x.dtype)[:, None]
            out.index_copy_(0, rows, y)
    return out


def routing_stats(
    expert_idx: Tensor,
    keep: Tensor | None,
    image_mask: Tensor,
    num_experts: int,
    capacity: int,
    probs: Tensor,
) -> RoutingStats:
    """Count assignments per (modality, expert), routed and kept (`keep` None: all), with one bincount each."""
    with torch.no_grad():
        bucket = expert_idx + num_experts * (~image_mask)[:, None]  # image: e, text: E + e
        routed = torch.bincount(bucket.reshape(-1), minlength=2 * num_experts)
        if keep is None:  # every assignment kept
            kept = routed
        else:
            kept_bucket = torch.where(keep, bucket, 2 * num_experts)
            kept = torch.bincount(kept_bucket.reshape(-1), minlength=2 * num_experts + 1)
        entropy = torch.special.entr(probs).sum(dim=-1).mean()
    e = num_experts
    return RoutingStats(routed[:e], routed[e:], kept[:e], kept[e : 2 * e], capacity, entropy.detach())
