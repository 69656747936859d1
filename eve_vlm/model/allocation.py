"""Token allocation: which routed tokens an expert actually processes when it is over capacity.

After the router has chosen experts (`assign_experts`), every expert serves at most `capacity` (token, choice)
assignments of the micro-batch (`expert_capacity`); the others are dropped from the expert branch and only the
residual stream carries them. A policy is a pure function

    policy(router_probs [S, E], expert_idx [S, K], image_mask [S], capacity, *, sequence_ids [S], generator)
        -> keep [S, K]

that computes a priority key (lower = served first) and calls one shared helper, `_keep_within_capacity`,
which keeps for each expert the `capacity` assignments with the smallest key. As in GShard, every first
choice (k=0) outranks every second choice (k=1), and so on; remaining ties go to the earlier flattened token.
The helper is a few stable sorts plus a cumulative count: O(S log S), no loop over tokens and no [S, E, C]
one-hot.

Shape letters: S routed tokens of the micro-batch (its sequences flattened, padding left out;
`sequence_ids` [S] names each token's sequence), E experts (expert 0 = language FFN), K experts chosen per
token (top_k).

Policies:
    - `rts`: random token selection, uniform random priority (DeepSpeed `moe/sharded_moe.py` top1gating,
      `use_rts=True`).
    - `position`: earlier tokens first (GShard, Lepikhin et al. 2020; DeepSpeed top2gating).
    - `bpr`: batch prioritized routing (V-MoE, Riquelme et al. 2021), per sequence [our reading]: within its
      sequence, each assignment is ranked by router confidence among the assignments of that sequence to the
      same expert and choice k; the key is that rank, ties broken by sequence index, so an expert serves
      every sequence's most confident token before any sequence's second most confident one.
    - `gbpr`: global BPR [ours: "G" = global]: highest router confidence first over all S tokens.
    - `img_gbpr`: GBPR where every image token outranks every text token of the same choice k [ours].
    - `modality`: no capacity limit, keep everything; the expert choice itself is hard routing by the image
      mask (`assign_experts`), as in CogVLM / Mono-InternVL. A baseline.

Router confidence of an assignment is the router probability of its expert.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from eve_vlm.errors import ConfigError

__all__ = ["ALLOCATION_POLICIES", "assign_experts", "expert_capacity", "get_policy"]


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Per-expert capacity `max(ceil(num_tokens / num_experts * capacity_factor), min_capacity)`.

    Args:
        num_tokens: Number of assignments to share out: S tokens for top-1, S * K for top-K routing.
        num_experts: E.
        capacity_factor: Slack over an even split (1.0 = exactly even).
        min_capacity: Lower bound.

    Returns:
        The number of assignments each expert may process.
    """
    return max(math.ceil(num_tokens / num_experts * capacity_factor), min_capacity)


def assign_experts(
    router_probs: Tensor, image_mask: Tensor, *, top_k: int, allocation: str
) -> tuple[Tensor, Tensor]:
    """Choose the experts of every token.

    Top-k of the router probabilities, except for `modality`: image tokens go to the most probable vision
    expert (1..E-1) and text tokens to the language expert 0, each with weight 1 (hard routing, whatever the
    combine mode).

    Args:
        router_probs: [S, E] fp32 router softmax probabilities.
        image_mask: [S] bool, True for image tokens.
        top_k: Experts per token (must be 1 for `modality`).
        allocation: Policy name.

    Returns:
        expert_idx [S, K] long (column 0 = first choice) and weights [S, K] fp32, the router probabilities of
        those experts (ones for `modality`).

    Raises:
        ConfigError: `modality` with top_k != 1.
    """
    if allocation == "modality":
        if top_k != 1:
            raise ConfigError(f"top_k={top_k} is not allowed with allocation='modality'; it needs top_k=1.")
        vision_idx = router_probs[:, 1:].argmax(dim=-1) + 1
        expert_idx = torch.where(image_mask, vision_idx, torch.zeros_like(vision_idx))[:, None]
        return expert_idx, torch.ones_like(expert_idx, dtype=router_probs.dtype)  # hard routing: weight 1
    weights, expert_idx = router_probs.topk(top_k, dim=-1)
    return expert_idx, weights


def _rank_within_groups(groups: Tensor, keys: tuple[Tensor, ...]) -> Tensor:
    """0-based rank of each element inside its group, ordered by `keys` lexicographically (first key most
    significant), remaining ties by index. groups: [N] long >= 0; keys: [N] each. Returns [N] long."""
    order = torch.arange(groups.numel(), device=groups.device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    order = order[torch.sort(groups[order], stable=True).indices]
    sorted_groups = groups[order]
    counts = torch.bincount(sorted_groups)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[sorted_groups]
    return rank


def _keep_within_capacity(expert_idx: Tensor, capacity: int, *keys: Tensor) -> Tensor:
    """For each expert keep the `capacity` assignments with the smallest (k, *keys, token index).

    Args:
        expert_idx: [S, K] long chosen experts.
        capacity: Assignments each expert may keep.
        *keys: [S, K] priority keys, most significant first; lower = served first.

    Returns:
        keep [S, K] bool.
    """
    num_tokens, top_k = expert_idx.shape
    choice = torch.arange(top_k, device=expert_idx.device).expand(num_tokens, top_k)
    flat_keys = (choice.reshape(-1), *(key.reshape(-1) for key in keys))
    rank = _rank_within_groups(expert_idx.reshape(-1), flat_keys)
    return (rank < capacity).view(num_tokens, top_k)


def _confidence(router_probs: Tensor, expert_idx: Tensor) -> Tensor:
    return router_probs.gather(1, expert_idx)


def _rts(router_probs, expert_idx, image_mask, capacity, *, sequence_ids, generator=None):
    device = generator.device if generator is not None else expert_idx.device
    priority = torch.rand(expert_idx.shape, generator=generator, device=device).to(expert_idx.device)
    return _keep_within_capacity(expert_idx, capacity, priority)


def _position(router_probs, expert_idx, image_mask, capacity, *, sequence_ids, generator=None):
    return _keep_within_capacity(expert_idx, capacity)  # ties are broken by token index


def _bpr(router_probs, expert_idx, image_mask, capacity, *, sequence_ids, generator=None):
    num_tokens, top_k = expert_idx.shape
    num_experts = router_probs.shape[-1]
    seq = sequence_ids.to(expert_idx.device)[:, None]
    choice = torch.arange(top_k, device=expert_idx.device)
    group = (seq * num_experts + expert_idx) * top_k + choice
    neg_conf = -_confidence(router_probs, expert_idx)
    rank_in_seq = _rank_within_groups(group.reshape(-1), (neg_conf.reshape(-1),)).view(num_tokens, top_k)
    return _keep_within_capacity(expert_idx, capacity, rank_in_seq)  # equal ranks: earlier sequence first


def _gbpr(router_probs, expert_idx, image_mask, capacity, *, sequence_ids, generator=None):
    return _keep_within_capacity(expert_idx, capacity, -_confidence(router_probs, expert_idx))


def _img_gbpr(router_probs, expert_idx, image_mask, capacity, *, sequence_ids, generator=None):
    is_text = (~image_mask)[:, None].expand_as(expert_idx).to(torch.uint8)
    return _keep_within_capacity(expert_idx, capacity, is_text, -_confidence(router_probs, expert_idx))


def _modality(router_probs, expert_idx, image_mask, capacity, *, sequence_ids, generator=None):
    return torch.ones_like(expert_idx, dtype=torch.bool)


ALLOCATION_POLICIES: dict[str, Callable[..., Tensor]] = {
    "rts": _rts,
    "position": _position,
    "bpr": _bpr,
    "gbpr": _gbpr,
    "img_gbpr": _img_gbpr,
    "modality": _modality,
}
"""Policy name -> `policy(router_probs, expert_idx, image_mask, capacity, *, sequence_ids, generator) -> keep`."""


def get_policy(name: str) -> Callable[..., Tensor]:
    """Look up an allocation policy by name.

    Raises:
        ConfigError: Unknown name; the message lists the known ones.
    """
    try:
        return ALLOCATION_POLICIES[name]
    except KeyError:
        raise ConfigError(
            f"allocation={name!r} is unknown; choose one of {sorted(ALLOCATION_POLICIES)}."
        ) from None
