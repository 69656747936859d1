"""ElasticVisionFFN: elastic guarantee, dispatch vs a per-token reference, balance loss, stats, options."""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from eve_vlm.errors import ConfigError
from eve_vlm.model.evf import ElasticVisionFFN, RoutingInputs

HIDDEN = 16


def _mlp(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2
    )
    return LlamaMLP(config)


def _evf(seed=0, **options):
    evf = ElasticVisionFFN(language_ffn=_mlp(seed), hidden_size=HIDDEN, **options)
    with torch.no_grad():  # distinct vision experts and a confident router, so routing matters
        for i, ffn in enumerate(evf.vision_ffns):
            for p in ffn.parameters():
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
        evf.router.weight.normal_(std=1.0)
    return evf


def _batch(seed=0, batch=2, seq_len=6, image_share=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, HIDDEN, generator=gen)
    mask = torch.rand(batch, seq_len, generator=gen) < image_share
    mask[0, 0] = True
    return x, mask


def _reference_keep_gbpr(probs, expert_idx, capacity):
    """Top-1 GBPR by a plain loop: per expert, most confident first, ties by token index."""
    keep = torch.zeros(len(expert_idx), dtype=torch.bool)
    for e in range(probs.shape[1]):
        tokens = [s for s in range(len(expert_idx)) if expert_idx[s] == e]
        for s in sorted(tokens, key=lambda s: (-probs[s, e].item(), s))[:capacity]:
            keep[s] = True
    return keep


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("options", [{}, {"use_residual": True}, {"num_experts": 3, "top_k": 2}])
def test_text_only_batch_is_the_language_ffn_bit_for_bit(training, options):
    evf = _evf(**options).train(training)
    x, _ = _batch()
    out = evf.route(x, torch.zeros(2, 6, dtype=torch.bool))
    assert torch.equal(out.hidden_states, evf.language_ffn(x))
    assert out.aux_loss.item() == 0.0 and out.aux_loss.dim() == 0
    assert out.stats.routed_text.tolist() == [12] + [0] * (evf.num_experts - 1)
    assert out.stats.kept_text.tolist() == out.stats.routed_text.tolist()
    assert out.stats.routed_image.sum() == 0 and out.stats.dropped_text.sum() == 0
    assert out.stats.entropy.item() == 0.0


@pytest.mark.parametrize("allocation", ["rts", "position", "bpr", "gbpr", "img_gbpr", "modality"])
def test_copied_vision_ffn_with_hard_combine_equals_the_language_ffn(allocation):
    evf = ElasticVisionFFN(
        language_ffn=_mlp(), hidden_size=HIDDEN, combine="hard", allocation=allocation, seed=0
    ).eval()
    x, mask = _batch(seq_len=9)
    out = evf.route(x, mask)
    torch.testing.assert_close(out.hidden_states, evf.language_ffn(x))
    assert out.stats.dropped_image.sum() == 0 and out.stats.dropped_text.sum() == 0


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5])
def test_soft_combine_matches_a_per_token_reference(capacity_factor):
    evf = _evf(allocation="gbpr", capacity_factor=capacity_factor).train()
    x, mask = _batch(seed=1, batch=3, seq_len=5)
    out = evf.route(x, mask).hidden_states.reshape(-1, HIDDEN)

    tokens = x.reshape(-1, HIDDEN)
    probs = (tokens @ evf.router.weight.T).softmax(-1)
    expert_idx = probs.argmax(-1)
    keep = _reference_keep_gbpr(probs, expert_idx, math.ceil(len(tokens) / 2 * capacity_factor))
    assert (~keep).any() or capacity_factor > 0.5  # the small factor really drops tokens
    for s in range(len(tokens)):
        e = int(expert_idx[s])
        if keep[s]:
            expected = probs[s, e] * evf.experts[e](tokens[s : s + 1])[0]
            torch.testing.assert_close(out[s], expected)
        else:
            assert torch.equal(out[s], torch.zeros(HIDDEN))  # dropped: exactly 0 from the expert branch


def test_straight_through_combine_computes_hard_with_the_soft_gradient_over_p():
    st = _evf(allocation="gbpr", combine="straight_through", capacity_factor=1.0).train()
    hard = copy.deepcopy(st)
    hard.combine = "hard"
    x, mask = _batch(seed=3, batch=2, seq_len=7)
    out = st.route(x, mask).hidden_states
    assert torch.equal(out, hard.route(x, mask).hidden_states)  # forward: weight exactly 1

    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    # Reference: sum over kept tokens of <g_s, f_e(x_s)> * p_s / p_s.detach(), differentiated by hand.
    weight = st.router.weight.detach().clone().requires_grad_(True)
    tokens, g = x.reshape(-1, HIDDEN), grad_out.reshape(-1, HIDDEN)
    probs = (tokens @ weight.T).softmax(-1)
    expert_idx = probs.argmax(-1)
    keep = _reference_keep_gbpr(probs.detach(), expert_idx, len(tokens) // 2 + len(tokens) % 2)
    assert (~keep).any()  # capacity really drops a token, so kept-only is checked
    total = 0.0
    for s in torch.nonzero(keep).flatten().tolist():
        e = int(expert_idx[s])
        inner = (g[s] * st.experts[e](tokens[s : s + 1])[0]).sum().detach()
        total = total + inner * probs[s, e] / probs[s, e].detach()
    total.backward()
    torch.testing.assert_close(st.router.weight.grad, weight.grad)


def test_top2_soft_combine_renormalises_over_the_chosen_experts():
    evf = _evf(num_experts=3, top_k=2).eval()
    evf.eval_capacity_factor = 10.0  # nothing dropped
    x, mask = _batch(seed=2)
    out = evf.route(x, mask).hidden_states.reshape(-1, HIDDEN)
    tokens = x.reshape(-1, HIDDEN)
    weights, expert_idx = (tokens @ evf.router.weight.T).softmax(-1).topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    for s in range(len(tokens)):
        expected = sum(
            weights[s, k] * evf.experts[int(expert_idx[s, k])](tokens[s : s + 1])[0] for k in range(2)
        )
        torch.testing.assert_close(out[s], expected)


def test_residual_mode_matches_the_formula():
    evf = _evf(use_residual=True).eval()
    x, mask = _batch(seed=3)
    plain = copy.deepcopy(evf)
    plain.coefficient = None
    moe = plain.route(x, mask).hidden_states
    coef = evf.coefficient(x).softmax(-1)
    expected = coef[..., :1] * moe + coef[..., 1:] * evf.language_ffn(x)
    torch.testing.assert_close(evf.route(x, mask).hidden_states, expected)


@pytest.mark.parametrize(("num_experts", "top_k"), [(2, 1), (3, 1), (3, 2)])
def test_balance_losses_match_hand_computation(num_experts, top_k):
    x, mask = _batch(seed=4, batch=2, seq_len=8)
    tokens = x.reshape(-1, HIDDEN)
    losses = {}
    for kind in ("switch", "l1", "none"):
        evf = _evf(num_experts=num_experts, top_k=top_k, balance_loss=kind)
        losses[kind] = evf.route(x, mask).aux_loss
        probs = (tokens @ evf.router.weight.T).softmax(-1)
    mean_prob = probs.mean(0)
    fraction = torch.stack([(probs.argmax(-1) == e).float().mean() for e in range(num_experts)])
    torch.testing.assert_close(losses["switch"], num_experts * (mean_prob * fraction).sum())
    torch.testing.assert_close(losses["l1"], (mean_prob - fraction).abs().sum())
    assert losses["none"].item() == 0.0
    assert _evf(allocation="modality").route(x, mask).aux_loss.item() == 0.0


@pytest.mark.parametrize("kind", ["switch", "l1"])
def test_aux_loss_gives_router_gradients_and_the_language_ffn_is_frozen(kind):
    evf = _evf(balance_loss=kind).train()
    x, mask = _batch(seed=5)
    out = evf.route(x, mask)
    out.aux_loss.backward()
    assert evf.router.weight.grad is not None and evf.router.weight.grad.abs().sum() > 0
    out = evf.route(x, mask)
    out.hidden_states.sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in evf.language_ffn.parameters())
    assert all(p.requires_grad for p in evf.vision_ffns.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in evf.vision_ffns.parameters())


def test_module_structure():
    language = _mlp()
    vision = _mlp(seed=1)
    evf = ElasticVisionFFN(language_ffn=language, vision_ffn=vision, hidden_size=HIDDEN, num_experts=3)
    assert evf.language_ffn is language and evf.vision_ffns[0] is vision
    assert evf.experts == [language, evf.vision_ffns[0], evf.vision_ffns[1]]
    assert torch.equal(evf.vision_ffns[1].up_proj.weight, vision.up_proj.weight)
    assert evf.vision_ffns[1].up_proj.weight is not vision.up_proj.weight
    assert evf.router.weight.shape == (3, HIDDEN) and evf.router.bias is None
    assert evf.coefficient is None
    copied = ElasticVisionFFN(language_ffn=_mlp(), hidden_size=HIDDEN)
    assert torch.equal(copied.vision_ffns[0].gate_proj.weight, copied.language_ffn.gate_proj.weight)
    assert copied.vision_ffns[0].gate_proj.weight.requires_grad


@pytest.mark.parametrize(
    "options",
    [
        {"allocation": "gbpr", "capacity_factor": 0.5},
        {"allocation": "img_gbpr", "capacity_factor": 0.7, "num_experts": 3, "top_k": 2},
        {"allocation": "rts", "capacity_factor": 0.4, "num_experts": 4, "seed": 3},
        {"allocation": "modality", "num_experts": 3},
    ],
)
def test_stats_add_up(options):
    evf = _evf(**options).train()
    x, mask = _batch(seed=6, batch=3, seq_len=7)
    stats = evf.route(x, mask).stats
    top_k = evf.top_k
    assert stats.routed_image.sum() == mask.sum() * top_k
    assert stats.routed_text.sum() == (~mask).sum() * top_k
    assert stats.tokens_per_expert.sum() == x.shape[0] * x.shape[1] * top_k
    assert torch.equal(stats.kept_image + stats.dropped_image, stats.routed_image)
    assert (stats.dropped_image >= 0).all() and (stats.dropped_text >= 0).all()
    assert ((stats.kept_image + stats.kept_text) <= stats.capacity).all()
    assert stats.entropy.dim() == 0 and 0 < stats.entropy <= torch.log(torch.tensor(float(evf.num_experts)))
    if options["allocation"] == "modality":
        assert stats.routed_image[0] == 0 and stats.routed_text[1:].sum() == 0
    else:
        assert (stats.dropped_image + stats.dropped_text).sum() > 0


def test_eval_mode_uses_the_eval_capacity_factor():
    evf = _evf(allocation="gbpr", capacity_factor=0.5, eval_capacity_factor=3.0)
    x, mask = _batch(seed=7)
    assert evf.train().route(x, mask).stats.capacity == 3
    assert evf.eval().route(x, mask).stats.capacity == 18


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"num_experts": 1}, "num_experts=1"),
        ({"top_k": 0}, "top_k=0"),
        ({"top_k": 3}, "top_k=3"),
        ({"allocation": "fifo"}, "'fifo'"),
        ({"allocation": "modality", "num_experts": 3, "top_k": 2}, "top_k=2"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0"),
        ({"eval_capacity_factor": -1.0}, "eval_capacity_factor=-1.0"),
        ({"min_capacity": -1}, "min_capacity=-1"),
        ({"combine": "mean"}, "'mean'"),
        ({"combine": "hard", "num_experts": 3, "top_k": 2}, "combine='hard'"),
        ({"combine": "straight_through", "num_experts": 3, "top_k": 2}, "combine='straight_through'"),
        ({"balance_loss": "kl"}, "'kl'"),
    ],
)
def test_bad_options_raise_config_error(options, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        ElasticVisionFFN(language_ffn=_mlp(), hidden_size=HIDDEN, **options)


def test_bfloat16_input_keeps_its_dtype_and_stats_are_detached():
    evf = _evf(use_residual=True).to(torch.bfloat16).train()
    x, mask = _batch(seed=8)
    out = evf.route(x.to(torch.bfloat16), mask)
    assert out.hidden_states.dtype == torch.bfloat16 and out.hidden_states.shape == x.shape
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.requires_grad
    stats = out.stats
    tensors = [stats.routed_image, stats.routed_text, stats.kept_image, stats.kept_text, stats.entropy]
    assert not any(t.requires_grad for t in tensors)
    assert stats.routed_image.dtype == torch.long


def test_rows_without_an_image_keep_the_language_path_in_a_mixed_batch():
    evf = _evf(allocation="gbpr").eval()
    x, mask = _batch(batch=3, seq_len=8)
    mask[1] = False  # row 1 is a text-only request
    out = evf.route(x, mask)
    assert torch.equal(out.hidden_states[1], evf.language_ffn(x[1:2])[0])
    routed = evf.route(x[[0, 2]], mask[[0, 2]])
    torch.testing.assert_close(out.hidden_states[[0, 2]], routed.hidden_states)
    assert int(out.stats.tokens_per_expert.sum()) == 3 * 8
    assert int(out.stats.kept_text[0]) == int(routed.stats.kept_text[0]) + 8


def test_has_image_keeps_decoding_tokens_of_image_requests_routed():
    evf = _evf(allocation="gbpr", combine="soft").eval()
    x, _ = _batch(batch=2, seq_len=1)
    text = torch.zeros(2, 1, dtype=torch.bool)
    assert torch.equal(evf.route(x, text).hidden_states, evf.language_ffn(x))  # a text-only request
    routed = evf.route(x, text, has_image=torch.tensor([True, True]))  # a decoding step after an image prompt
    assert int(routed.stats.routed_text.sum()) == 2
    assert not torch.allclose(routed.hidden_states, evf.language_ffn(x))  # soft weights < 1 apply


def test_set_allocation_switches_the_policy():
    evf = _evf(allocation="img_gbpr", capacity_factor=0.5).train()
    x, mask = _batch(batch=2, seq_len=16, image_share=0.8)
    evf.set_allocation("position")
    assert evf.allocation == "position"
    kept = evf.route(x, mask).stats.kept_image.sum() + evf.route(x, mask).stats.kept_text.sum()
    evf.set_allocation("modality")
    assert evf.route(x, mask).stats.kept_image.sum() + evf.route(x, mask).stats.kept_text.sum() == 32 > kept
    with pytest.raises(ConfigError, match="'nope' is unknown"):
        evf.set_allocation("nope")


@pytest.mark.parametrize("allocation", ["rts", "position", "bpr", "gbpr", "img_gbpr"])
@pytest.mark.parametrize("options", [{}, {"use_residual": True}, {"num_experts": 3, "top_k": 2}])
def test_padding_is_not_routed_and_changes_no_row(allocation, options):
    # Training capacity 1.0, so experts are over capacity and padding, if it competed, would displace tokens.
    evf = _evf(allocation=allocation, capacity_factor=1.0, modality_loss_coef=0.1, seed=0, **options).train()
    x, mask = _batch(seed=7, batch=3, seq_len=6)
    lengths = [6, 4, 5]
    real = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]  # (3, 6) right padding
    padded = torch.cat([x, torch.randn(3, 5, HIDDEN)], dim=1)  # 5 more pad positions per row
    padded[~torch.cat([real, torch.zeros(3, 5, dtype=torch.bool)], dim=1)] = 10 * torch.randn(1, HIDDEN)
    padded_mask = torch.cat([mask & real, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    token_mask = torch.cat([real, torch.zeros(3, 5, dtype=torch.bool)], dim=1)

    # The same rows under two amounts of padding (the extra positions hold large random states): the real
    # tokens' outputs, the losses and the statistics must not change, and padding gets the language FFN.
    torch.manual_seed(0)  # `rts` draws from the global RNG
    a = evf.route(x, mask & real, token_mask=real)
    torch.manual_seed(0)
    b = evf.route(padded, padded_mask, token_mask=token_mask)
    assert torch.equal(a.hidden_states[real], b.hidden_states[token_mask])
    assert torch.equal(a.aux_loss, b.aux_loss) and torch.equal(a.router_loss, b.router_loss)
    for key in ("routed_image", "routed_text", "kept_image", "kept_text"):
        assert torch.equal(getattr(a.stats, key), getattr(b.stats, key)), key
    assert int(a.stats.routed_text.sum() + a.stats.routed_image.sum()) == sum(lengths) * evf.top_k
    pads = ~token_mask
    assert torch.equal(b.hidden_states[pads], evf.language_ffn(padded[pads].unsqueeze(0)).squeeze(0))


def test_padding_of_a_text_only_row_is_not_counted():
    evf = _evf().train()
    x, mask = _batch(seed=8, batch=2, seq_len=6)
    mask[1] = False
    token_mask = torch.ones(2, 6, dtype=torch.bool)
    token_mask[1, 4:] = False
    out = evf.route(x, mask, token_mask=token_mask)
    assert int(out.stats.routed_text.sum() + out.stats.routed_image.sum()) == 10
    assert torch.equal(out.hidden_states[1], evf.language_ffn(x[1:]).squeeze(0))


@pytest.mark.parametrize("combine", ["soft", "straight_through"])
def test_modality_allocation_gives_weight_one(combine):
    evf = _evf(allocation="modality", combine=combine).train()
    x, mask = _batch(seed=9, batch=2, seq_len=6)
    out = evf.route(x, mask)
    text, image = ~mask, mask
    assert torch.allclose(out.hidden_states[text], evf.language_ffn(x[text].unsqueeze(0)).squeeze(0))
    vision = evf.vision_ffns[0](x[image].unsqueeze(0)).squeeze(0)
    assert torch.allclose(out.hidden_states[image], vision)


POLICIES = ["rts", "position", "bpr", "gbpr", "img_gbpr", "modality"]
ROUTING_OPTIONS = [{}, {"num_experts": 3, "top_k": 2}, {"combine": "hard"}, {"use_residual": True}]
# Every policy with every option, but `modality` (top-1 only) without top-2.
POLICY_CASES = [
    (policy, options)
    for policy in POLICIES
    for options in ROUTING_OPTIONS
    if not (policy == "modality" and options.get("top_k", 1) > 1)
]


@pytest.mark.parametrize(("allocation", "options"), POLICY_CASES)
def test_a_policy_under_a_capacity_that_cannot_bind_keeps_everything(allocation, options):
    """Why `route` skips the policy when the capacity is at least the number of assignments."""
    from eve_vlm.model.allocation import assign_experts, get_policy

    x, mask = _batch(seed=3, batch=3, seq_len=7)
    probs = torch.randn(21, options.get("num_experts", 2)).softmax(-1)
    expert_idx, _ = assign_experts(
        probs, mask.reshape(-1), top_k=options.get("top_k", 1), allocation=allocation
    )
    keep = get_policy(allocation)(
        probs,
        expert_idx,
        mask.reshape(-1),
        expert_idx.numel(),
        sequence_ids=torch.arange(3).repeat_interleave(7),
        generator=torch.Generator().manual_seed(0),
    )
    assert keep.all()


@pytest.mark.parametrize(("allocation", "options"), POLICY_CASES)
def test_decoding_one_token_equals_that_token_routed_in_a_batch(allocation, options):
    """The one-token path (one decoding step of one sequence: the expert run directly) and the path without
    statistics give what the general dispatch gives the same token among others, in eval mode."""
    evf = _evf(allocation=allocation, seed=2, **options).eval()
    x, mask = _batch(seed=4, batch=6, seq_len=1)  # six sequences, one new token each
    has_image = torch.tensor([True] * 6)
    with torch.no_grad():
        batched = evf.route(x, mask, has_image).hidden_states
        assert torch.equal(evf.route(x, mask, has_image, with_stats=False).hidden_states, batched)
        for row in range(6):
            one = evf.route(x[row : row + 1], mask[row : row + 1], has_image[:1], with_stats=False)
            torch.testing.assert_close(one.hidden_states, batched[row : row + 1])
            assert one.stats is None
            with evf.bind(
                RoutingInputs(mask[row : row + 1], has_image[:1]), 0
            ):  # as a decoding step calls it
                torch.testing.assert_close(evf(x[row : row + 1]), batched[row : row + 1])
            with evf.bind(RoutingInputs(mask[row : row + 1], ~has_image[:1]), 0):  # a text-only request
                assert torch.equal(evf(x[row : row + 1]), evf.language_ffn(x[row : row + 1]))


@pytest.mark.parametrize("options", ROUTING_OPTIONS)
def test_the_text_path_without_statistics_is_the_language_ffn_bit_for_bit(options):
    evf = _evf(**options).eval()
    x, mask = _batch(seed=5, batch=3, seq_len=4)
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        text_only = evf.route(x, torch.zeros_like(mask), with_stats=False)
        assert torch.equal(text_only.hidden_states, evf.language_ffn(x)) and text_only.stats is None
        mixed = evf.route(
            x * has_image[:, None, None], mask & has_image[:, None], has_image, with_stats=False
        )
        assert torch.equal(mixed.hidden_states[1], evf.language_ffn(torch.zeros_like(x[1:2]))[0])
        full = evf.route(x, mask & has_image[:, None], has_image)
        assert torch.equal(
            evf.route(x, mask & has_image[:, None], has_image, with_stats=False).hidden_states,
            full.hidden_states,
        )
        assert torch.equal(evf(x), evf.language_ffn(x))  # nothing bound: the language FFN


def test_router_logits_are_fp32_in_a_bf16_autocast_training_step():
    """Under autocast a linear layer runs in bf16 even on fp32 inputs; the router's logits must not."""
    evf = _evf().train()
    logits = []
    evf.router.register_forward_hook(lambda module, args, out: logits.append((args[0], out)))
    x, mask = _batch(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = evf.language_ffn(x)  # bf16 hidden states, as a decoder layer under autocast gives
        out = evf.route(hidden, mask)
    (out.hidden_states.float().sum() + out.aux_loss).backward()
    ((tokens, routed),) = logits
    assert tokens.dtype == torch.bfloat16 and routed.dtype == torch.float32
    assert torch.equal(routed, tokens.float() @ evf.router.weight.detach().t())
    assert evf.router.weight.dtype == evf.router.weight.grad.dtype == torch.float32


def test_residual_coefficient_follows_the_ffn_dtype():
    """A bf16 FFN gets a bf16 mixing layer, so the residual mix runs without autocast (the router stays fp32)."""
    evf = ElasticVisionFFN(language_ffn=_mlp().to(torch.bfloat16), hidden_size=HIDDEN, use_residual=True)
    assert evf.coefficient.weight.dtype == torch.bfloat16 and evf.router.weight.dtype == torch.float32
    x, mask = _batch(seed=4)
    assert evf.route(x.to(torch.bfloat16), mask).hidden_states.dtype == torch.bfloat16


@pytest.mark.parametrize("combine", ["soft", "straight_through"])
def test_detached_router_input_keeps_the_routing_losses_off_the_hidden_states(combine):
    """With `detach_router_input` the balance and modality losses (and the combine weight's share of the output
    gradient) reach the router, not the hidden states the router reads; the forward pass is unchanged."""
    options = {"combine": combine, "modality_loss_coef": 0.1}
    plain, detached = _evf(**options).train(), _evf(detach_router_input=True, **options).train()
    x, mask = _batch(seed=7)
    outs = {}
    for name, evf in (("plain", plain), ("detached", detached)):
        h = x.clone().requires_grad_(True)
        out = evf.route(h, mask)
        (out.aux_loss + out.router_loss).backward()
        outs[name] = (out.hidden_states.detach(), h.grad, evf.router.weight.grad)
    torch.testing.assert_close(outs["plain"][0], outs["detached"][0], rtol=0, atol=0)
    assert outs["plain"][1] is not None and outs["plain"][1].abs().sum() > 0
    assert outs["detached"][1] is None or outs["detached"][1].abs().sum() == 0
    torch.testing.assert_close(outs["plain"][2], outs["detached"][2])  # the router learns the same
    # the output's gradient reaches the input through the experts, not through the router's weight
    h = x.clone().requires_grad_(True)
    out = detached.route(h, mask)
    out.hidden_states.sum().backward()
    frozen_router = _evf(detach_router_input=True, **options).train()
    frozen_router.router.requires_grad_(False)
    g = x.clone().requires_grad_(True)
    frozen_router.route(g, mask).hidden_states.sum().backward()
    torch.testing.assert_close(h.grad, g.grad)
