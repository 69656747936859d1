"""Token-allocation policies against slow, obviously-correct Python-loop references."""

import math

import pytest
import torch

from eve_vlm.errors import ConfigError
from eve_vlm.model.allocation import ALLOCATION_POLICIES, assign_experts, expert_capacity, get_policy

CAPACITY_POLICIES = ["rts", "position", "bpr", "gbpr", "img_gbpr"]


def _seq(probs, seq_len):
    """The sequence of each flattened token: sequences of `seq_len` tokens."""
    return torch.arange(probs.shape[0]) // seq_len


def _random_case(gen, *, num_experts, top_k, num_seqs, seq_len, image_share, ties=False):
    num_tokens = num_seqs * seq_len
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2
    probs = logits.softmax(dim=-1)
    if ties:  # coarse probabilities: many exact ties, exercising the tie-breaking rule
        probs = (probs * 4).round() / 4
    image_mask = torch.rand(num_tokens, generator=gen) < image_share
    expert_idx, _ = assign_experts(probs, image_mask, top_k=top_k, allocation="gbpr")
    return probs, expert_idx, image_mask


def _reference_keep(policy, probs, expert_idx, image_mask, capacity, seq_len, rand):
    """Per expert: list its (token, choice) assignments, sort by the policy's definition, keep `capacity`."""
    num_tokens, top_k = expert_idx.shape
    conf = {(s, k): probs[s, expert_idx[s, k]].item() for s in range(num_tokens) for k in range(top_k)}
    rank_in_seq = {}
    if policy == "bpr":
        groups = {}
        for s in range(num_tokens):
            for k in range(top_k):
                groups.setdefault((s // seq_len, expert_idx[s, k].item(), k), []).append((s, k))
        for members in groups.values():
            for rank, sk in enumerate(sorted(members, key=lambda sk: (-conf[sk], sk[0]))):
                rank_in_seq[sk] = rank
    sort_key = {
        "rts": lambda s, k: (k, rand[s, k].item(), s),
        "position": lambda s, k: (k, s),
        "bpr": lambda s, k: (k, rank_in_seq.get((s, k)), s // seq_len, s),
        "gbpr": lambda s, k: (k, -conf[(s, k)], s),
        "img_gbpr": lambda s, k: (k, not image_mask[s].item(), -conf[(s, k)], s),
    }[policy]
    keep = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    for e in range(probs.shape[1]):
        assigned = [(s, k) for s in range(num_tokens) for k in range(top_k) if expert_idx[s, k] == e]
        for s, k in sorted(assigned, key=lambda sk: sort_key(*sk))[:capacity]:
            keep[s, k] = True
    return keep


@pytest.mark.parametrize("policy", CAPACITY_POLICIES)
def test_policy_matches_reference(policy):
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        num_experts = [2, 3, 4][trial % 3]
        top_k = 1 + trial % 2
        num_seqs, seq_len = (
            int(torch.randint(1, 4, (1,), generator=gen)),
            int(torch.randint(1, 12, (1,), generator=gen)),
        )
        probs, expert_idx, image_mask = _random_case(
            gen,
            num_experts=num_experts,
            top_k=top_k,
            num_seqs=num_seqs,
            seq_len=seq_len,
            image_share=[0.0, 0.3, 0.7, 1.0][trial % 4],
            ties=trial % 5 == 0,
        )
        capacity = int(torch.randint(0, num_seqs * seq_len + 2, (1,), generator=gen))
        seed = 1000 + trial
        keep = ALLOCATION_POLICIES[policy](
            probs,
            expert_idx,
            image_mask,
            capacity,
            sequence_ids=_seq(probs, seq_len),
            generator=torch.Generator().manual_seed(seed),
        )
        rand = torch.rand(expert_idx.shape, generator=torch.Generator().manual_seed(seed))
        expected = _reference_keep(policy, probs, expert_idx, image_mask, capacity, seq_len, rand)
        assert torch.equal(keep, expected), (policy, trial)


@pytest.mark.parametrize("policy", CAPACITY_POLICIES)
def test_capacity_holds_exactly(policy):
    gen = torch.Generator().manual_seed(1)
    for num_experts, top_k, capacity in [(2, 1, 5), (3, 2, 7), (4, 2, 1), (4, 1, 0), (2, 2, 100)]:
        probs, expert_idx, image_mask = _random_case(
            gen, num_experts=num_experts, top_k=top_k, num_seqs=3, seq_len=10, image_share=0.5
        )
        keep = get_policy(policy)(
            probs, expert_idx, image_mask, capacity, sequence_ids=_seq(probs, 10), generator=gen
        )
        routed = torch.bincount(expert_idx.reshape(-1), minlength=num_experts)
        kept = torch.bincount(expert_idx[keep], minlength=num_experts)
        assert torch.equal(kept, routed.clamp(max=capacity))


@pytest.mark.parametrize("policy", [*CAPACITY_POLICIES, "modality"])
def test_nothing_dropped_with_two_experts_at_eval_capacity(policy):
    gen = torch.Generator().manual_seed(2)
    probs, expert_idx, image_mask = _random_case(
        gen, num_experts=2, top_k=1, num_seqs=4, seq_len=9, image_share=0.5
    )
    probs[:, 1] = 1.0  # even a fully unbalanced router fits: capacity = S
    probs[:, 0] = 0.0
    expert_idx, _ = assign_experts(probs, image_mask, top_k=1, allocation=policy)
    capacity = expert_capacity(expert_idx.numel(), 2, 2.0, 0)
    keep = get_policy(policy)(
        probs, expert_idx, image_mask, capacity, sequence_ids=_seq(probs, 9), generator=gen
    )
    assert keep.all()


def test_img_gbpr_serves_image_tokens_before_text_tokens():
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        top_k = 1 + trial % 2
        probs, expert_idx, image_mask = _random_case(
            gen, num_experts=2 + trial % 3, top_k=top_k, num_seqs=2, seq_len=16, image_share=0.4
        )
        capacity = int(torch.randint(0, 20, (1,), generator=gen))
        keep = get_policy("img_gbpr")(
            probs, expert_idx, image_mask, capacity, sequence_ids=_seq(probs, 16), generator=None
        )
        for k in range(top_k):  # within one choice level (first choices always outrank second choices)
            for e in range(probs.shape[1]):
                to_e = expert_idx[:, k] == e
                image_dropped = (to_e & image_mask & ~keep[:, k]).any()
                text_kept = (to_e & ~image_mask & keep[:, k]).any()
                assert not (image_dropped and text_kept)


def test_first_choices_outrank_second_choices():
    # token 0 picks (e0: 0.40, e1: 0.35); token 1 picks (e1: 0.50, e0: 0.41). Capacity 1 per expert: expert 0
    # serves token 0's first choice although token 1's second choice is more confident.
    probs = torch.tensor([[0.40, 0.35, 0.25], [0.41, 0.50, 0.09]])
    mask = torch.ones(2, dtype=torch.bool)
    expert_idx, _ = assign_experts(probs, mask, top_k=2, allocation="gbpr")
    assert expert_idx.tolist() == [[0, 1], [1, 0]]
    keep = get_policy("gbpr")(probs, expert_idx, mask, 1, sequence_ids=_seq(probs, 2), generator=None)
    assert keep.tolist() == [[True, False], [True, False]]


def test_bpr_serves_every_sequence_before_any_second_token():
    # 3 sequences of 4 tokens, all to expert 1; sequence 0 is the most confident everywhere.
    probs = torch.tensor(
        [[0.0, p] for p in [0.99, 0.98, 0.97, 0.96, 0.6, 0.5, 0.4, 0.3, 0.7, 0.2, 0.1, 0.05]]
    )
    expert_idx = torch.ones(12, 1, dtype=torch.long)
    mask = torch.ones(12, dtype=torch.bool)
    keep_bpr = get_policy("bpr")(probs, expert_idx, mask, 3, sequence_ids=_seq(probs, 4), generator=None)
    keep_gbpr = get_policy("gbpr")(probs, expert_idx, mask, 3, sequence_ids=_seq(probs, 4), generator=None)
    assert keep_bpr[:, 0].nonzero().flatten().tolist() == [0, 4, 8]
    assert keep_gbpr[:, 0].nonzero().flatten().tolist() == [0, 1, 2]


def test_rts_is_reproducible_with_a_seeded_generator():
    gen = torch.Generator().manual_seed(4)
    probs, expert_idx, mask = _random_case(
        gen, num_experts=2, top_k=1, num_seqs=4, seq_len=16, image_share=0.5
    )
    runs = [
        get_policy("rts")(
            probs,
            expert_idx,
            mask,
            10,
            sequence_ids=_seq(probs, 16),
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_modality_routes_image_to_a_vision_expert_and_text_to_expert_zero():
    gen = torch.Generator().manual_seed(5)
    for num_experts in (2, 3, 4):
        probs = torch.randn(40, num_experts, generator=gen).softmax(-1)
        probs[:5, 0] = 5.0  # the language expert being most probable must not matter
        mask = torch.rand(40, generator=gen) < 0.5
        expert_idx, weights = assign_experts(probs, mask, top_k=1, allocation="modality")
        assert expert_idx.shape == (40, 1)
        assert (expert_idx[~mask] == 0).all()
        assert torch.equal(expert_idx[mask, 0], probs[mask, 1:].argmax(-1) + 1)
        assert torch.equal(weights, torch.ones_like(weights))  # hard routing: weight 1 (not p0 for text)
        assert get_policy("modality")(
            probs, expert_idx, mask, 0, sequence_ids=_seq(probs, 40), generator=None
        ).all()


def test_assign_experts_top_k():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    expert_idx, weights = assign_experts(probs, torch.zeros(2, dtype=torch.bool), top_k=2, allocation="rts")
    assert expert_idx.tolist() == [[1, 2], [0, 2]]
    assert torch.equal(weights, torch.tensor([[0.6, 0.3], [0.5, 0.3]]))


def test_modality_rejects_top_k_above_one():
    with pytest.raises(ConfigError, match="top_k=2"):
        assign_experts(torch.rand(4, 3), torch.ones(4, dtype=torch.bool), top_k=2, allocation="modality")


def test_unknown_policy_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="'fifo'") as info:
        get_policy("fifo")
    for name in ALLOCATION_POLICIES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "factor", "min_capacity", "expected"),
    [
        (10, 2, 1.5, 0, 8),
        (10, 2, 2.0, 0, 10),
        (7, 3, 1.0, 0, 3),
        (6, 3, 1.0, 0, 2),
        (4, 2, 1.0, 5, 5),
        (0, 2, 1.5, 0, 0),
    ],
)
def test_expert_capacity(num_tokens, num_experts, factor, min_capacity, expected):
    assert expert_capacity(num_tokens, num_experts, factor, min_capacity) == expected
    assert expected == max(math.ceil(num_tokens / num_experts * factor), min_capacity)
