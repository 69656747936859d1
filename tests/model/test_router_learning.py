"""Routers that learn: a tiny synthetic task where image tokens need another FFN than text tokens.

Text tokens must keep the frozen language FFN's output; image tokens must produce a different function that
only the trainable vision FFN can learn. Right after insertion the two experts are copies, so with the paper's
plain router nothing tells it which expert a token should take; the mechanisms tested here (the modality
routing loss and the modality warm start) must bring the router to low entropy with image tokens on the
vision FFN within a few dozen steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eve_vlm.errors import ConfigError
from eve_vlm.model.evf import ElasticVisionFFN, modality_routing_loss
from eve_vlm.train.router_warm_start import fit_router

D = 16


def make_ffn() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))


def task(seed: int, batch: int = 8, seq: int = 24):
    """Hidden states whose image and text tokens lie along different directions, the image mask (a block of 8 image tokens per sequence) and a target map for image tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, D, generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[:, 2:10] = True
    # A bias-free router separates modalities that sit along different directions (as a projector's image
    # tokens and the LM's text embeddings do), not ones that differ by an offset around zero.
    image_dir, text_dir = torch.eye(D)[0], torch.eye(D)[1]
    x = x + 3.0 * torch.where(mask[..., None], image_dir, text_dir)
    return x, mask


def train(
    evf: ElasticVisionFFN, image_map: nn.Module, steps: int, lr: float = 1e-2, router_lr: float | None = None
) -> None:
    """Adam on the vision FFN and the router (the router at `router_lr` when given, as `evf.router_lr`)."""
    language = evf.language_ffn
    ffn = [p for p in evf.vision_ffns.parameters()]
    opt = torch.optim.Adam(
        [{"params": ffn}, {"params": list(evf.router.parameters()), "lr": router_lr or lr}], lr=lr
    )
    evf.train()
    for step in range(steps):
        x, mask = task(step)
        with torch.no_grad():
            target = torch.where(mask[..., None], image_map(x), language(x))
        out = evf.route(x, mask)
        loss = (out.hidden_states - target).pow(2).mean() + 0.01 * out.aux_loss
        if out.router_loss is not None:
            loss = loss + out.router_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def routing(evf: ElasticVisionFFN, seed: int = 1000) -> dict:
    evf.eval()
    x, mask = task(seed)
    probs = (x.reshape(-1, D) @ evf.router.weight.t()).softmax(dim=-1)
    to_vision = probs.argmax(dim=-1) > 0
    flat = mask.reshape(-1)
    return {
        "entropy": float(torch.special.entr(probs).sum(dim=-1).mean()),
        "image_to_vision": float(to_vision[flat].float().mean()),
        "text_to_vision": float(to_vision[~flat].float().mean()),
    }


def new_evf(**options) -> tuple[ElasticVisionFFN, nn.Module]:
    torch.manual_seed(0)
    language, image_map = make_ffn(), make_ffn()
    evf = ElasticVisionFFN(
        language_ffn=language,
        hidden_size=D,
        allocation="img_gbpr",
        combine="straight_through",
        **options,
    )
    return evf, image_map


def test_plain_router_starts_uniform():
    evf, _ = new_evf()
    assert routing(evf)["entropy"] > math.log(2) - 0.01  # the paper's N(0, 0.02) start: ln 2


def test_modality_loss_teaches_the_router():
    evf, image_map = new_evf(modality_loss_coef=0.1)
    train(evf, image_map, steps=40, router_lr=5e-2)
    r = routing(evf)
    assert r["entropy"] <= 0.5
    assert r["image_to_vision"] >= 0.95
    assert r["text_to_vision"] <= 0.05


def test_modality_loss_is_off_by_default_and_in_eval():
    evf, _ = new_evf()
    x, mask = task(0)
    assert evf.train().route(x, mask).router_loss is None
    evf, _ = new_evf(modality_loss_coef=0.1)
    assert evf.train().route(x, mask).router_loss is not None
    assert evf.eval().route(x, mask).router_loss is None
    with pytest.raises(ConfigError, match="modality_loss_coef"):
        new_evf(modality_loss_coef=-1.0)


def test_modality_loss_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(9.0), 0.0]])
    mask = torch.tensor([True, False])
    # image token: -log 0.5; text token: -log 0.9
    expected = (math.log(2.0) - math.log(0.9)) / 2
    assert modality_routing_loss(logits, mask).item() == pytest.approx(expected, rel=1e-6)


def test_warm_start_fits_then_training_keeps_image_tokens_on_vision():
    evf, image_map = new_evf()
    x, mask = task(500, batch=16)
    fitted = fit_router(evf.router.weight, x.reshape(-1, D), mask.reshape(-1), confidence=0.9)
    with torch.no_grad():
        evf.router.weight.copy_(fitted)
    r = routing(evf)
    assert r["image_to_vision"] >= 0.95 and r["text_to_vision"] <= 0.05
    assert r["entropy"] <= 0.5
    assert r["entropy"] > 0.05  # soft targets: confident, not saturated
    train(evf, image_map, steps=30)
    r = routing(evf)
    # Without a routing loss the balance loss pulls back towards an even split, slowly.
    assert r["image_to_vision"] >= 0.9 and r["entropy"] < math.log(2) - 0.1


def test_warm_start_with_modality_loss_stays_confident():
    evf, image_map = new_evf(modality_loss_coef=0.1)
    x, mask = task(500, batch=16)
    with torch.no_grad():
        evf.router.weight.copy_(fit_router(evf.router.weight, x.reshape(-1, D), mask.reshape(-1)))
    train(evf, image_map, steps=30)
    r = routing(evf)
    assert r["image_to_vision"] >= 0.95 and r["text_to_vision"] <= 0.05 and r["entropy"] <= 0.5
