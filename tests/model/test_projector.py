"""Tests for `eve_vlm.model.projector`: shapes, token counts, gradients, the LDP blocks and LDPv2 pooling."""

import math

import pytest
import torch

from eve_vlm.errors import ConfigError, ImageSizeError
from eve_vlm.model.projector import (
    PROJECTOR_KINDS,
    InvertedResidual,
    LDPProjector,
    LDPv2Projector,
    Mlp2xGelu,
    build_projector,
    make_divisible,
    num_projected_tokens,
)

DV, D = 24, 32
GRIDS = [3, 4, 5, 6, 7, 8, 16, 24]


def _build(kind: str, g: int, dv: int = DV, d: int = D) -> torch.nn.Module:
    grid = max(1, g // 2) if kind == "ldpv2" else None
    return build_projector(kind, vision_hidden=dv, text_hidden=d, grid=grid)


@pytest.mark.parametrize("kind", PROJECTOR_KINDS)
@pytest.mark.parametrize("g", GRIDS)
def test_output_shape_matches_num_projected_tokens(kind, g):
    torch.manual_seed(0)
    proj = _build(kind, g)
    grid = getattr(proj, "grid", None)
    out = proj(torch.randn(2, g * g, DV))
    expected = {"mlp2x_gelu": g * g, "ldp": math.ceil(g / 2) ** 2, "ldpv2": grid and grid * grid}[kind]
    assert out.shape == (2, expected, D)
    assert num_projected_tokens(kind, g, grid) == expected
    assert proj.num_tokens(g) == expected


def test_known_token_counts():
    assert num_projected_tokens("mlp2x_gelu", 24) == 576
    assert num_projected_tokens("ldp", 24) == 144
    assert num_projected_tokens("ldp", 27) == 196
    assert num_projected_tokens("ldpv2", 24, 12) == 144
    assert num_projected_tokens("ldpv2", 24, grid=24) == 576


@pytest.mark.parametrize("kind", PROJECTOR_KINDS)
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    proj = _build(kind, 6)
    x = torch.randn(2, 36, DV, requires_grad=True)
    proj(x).square().mean().backward()
    for name, param in proj.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in proj.parameters()) > 0


@pytest.mark.parametrize("g", [3, 4, 5, 8, 24])
def test_ldp_first_block_keeps_grid_second_halves_it(g):
    proj = LDPProjector(DV, D)
    first, second = proj.blocks
    assert (first.stride, first.use_residual) == (1, True)
    assert (second.stride, second.use_residual) == (2, False)
    fmap = torch.randn(2, D, g, g)
    mid = first(fmap)
    assert mid.shape == (2, D, g, g)
    assert second(mid).shape == (2, D, math.ceil(g / 2), math.ceil(g / 2))


def test_inverted_residual_layout_and_residual():
    block = InvertedResidual(D, stride=1)
    depthwise = block.block[0][0]
    pointwise = block.block[2][0]
    assert (depthwise.kernel_size, depthwise.groups, depthwise.stride, depthwise.bias) == (
        (3, 3),
        D,
        (1, 1),
        None,
    )
    assert (pointwise.kernel_size, pointwise.groups, pointwise.bias) == ((1, 1), 1, None)
    assert isinstance(block.block[0][2], torch.nn.Hardswish)
    assert isinstance(block.block[1].scale_activation, torch.nn.Hardsigmoid)
    # With the pointwise projection zeroed the branch is LayerNorm(0) = 0: stride 1 is the identity,
    # stride 2 (no residual) is all zeros.
    x = torch.randn(2, D, 5, 5)
    with torch.no_grad():
        pointwise.weight.zero_()
        torch.testing.assert_close(block(x), x)
        strided = InvertedResidual(D, stride=2)
        strided.block[2][0].weight.zero_()
        torch.testing.assert_close(strided(x), torch.zeros(2, D, 3, 3))


def test_inverted_residual_rejects_bad_stride():
    with pytest.raises(ConfigError, match="stride"):
        InvertedResidual(D, stride=3)


@pytest.mark.parametrize(
    ("value", "expected"), [(3, 8), (8, 8), (9, 16), (12, 16), (20, 24), (144, 144), (240, 240), (512, 512)]
)
def test_make_divisible_matches_torchvision_rule(value, expected):
    assert make_divisible(value, 8) == expected


@pytest.mark.parametrize(
    ("channels", "squeeze"), [(32, 8), (36, 16), (48, 16), (64, 16), (80, 24), (2048, 512)]
)
def test_squeeze_excite_width_follows_make_divisible(channels, squeeze):
    block = InvertedResidual(channels, stride=1)
    se = block.block[1]
    assert block.squeeze_channels == squeeze
    assert (se.fc1.in_channels, se.fc1.out_channels) == (channels, squeeze)
    assert (se.fc2.in_channels, se.fc2.out_channels) == (squeeze, channels)


def test_ldp_parameter_count_is_pinned():
    dv, d = 24, 32
    squeeze = 8
    mlp = dv * d + d + d * d + d
    block = 9 * d + 2 * d + (d * squeeze + squeeze) + (squeeze * d + d) + d * d + 2 * d
    proj = LDPProjector(dv, d)
    assert sum(p.numel() for p in proj.parameters()) == mlp + 2 * block
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in proj.modules())


def test_parameter_names_follow_reference_layouts():
    assert set(Mlp2xGelu(DV, D).state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    ldp_keys = set(LDPProjector(DV, D).state_dict())
    for key in [
        "mlp.0.weight",
        "mlp.2.bias",
        "blocks.0.block.0.0.weight",
        "blocks.0.block.0.1.weight",
        "blocks.1.block.1.fc1.weight",
        "blocks.1.block.1.fc2.bias",
        "blocks.1.block.2.0.weight",
        "blocks.1.block.2.1.bias",
    ]:
        assert key in ldp_keys, key
    assert {"peg.weight", "peg.bias", "mlp.0.weight"} <= set(LDPv2Projector(DV, D, 2).state_dict())


@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_output_is_independent_of_batch_and_mode(kind):
    """No BatchNorm: an image's tokens do not depend on the rest of the batch or on train/eval mode."""
    torch.manual_seed(0)
    proj = _build(kind, 6)
    x = torch.randn(3, 36, DV)
    with torch.no_grad():
        batched = proj.train()(x)
        alone = proj.eval()(x[1:2])
    torch.testing.assert_close(batched[1:2], alone)


def _manual_adaptive_pool(fmap: torch.Tensor, out: int) -> torch.Tensor:
    """Reference adaptive average pooling: cell i spans [floor(i*g/out), ceil((i+1)*g/out))."""
    g = fmap.shape[-1]
    cells = [
        [
            fmap[..., (i * g) // out : -(-(i + 1) * g // out), (j * g) // out : -(-(j + 1) * g // out)].mean(
                dim=(-2, -1)
            )
            for j in range(out)
        ]
        for i in range(out)
    ]
    return torch.stack([torch.stack(row, dim=-1) for row in cells], dim=-2)


@pytest.mark.parametrize(("g", "grid"), [(4, 2), (6, 3), (8, 4), (6, 2), (5, 3), (7, 7), (24, 12)])
def test_ldpv2_downsample_is_block_average(g, grid):
    torch.manual_seed(0)
    proj = LDPv2Projector(DV, D, grid)
    tokens = torch.randn(2, g * g, 5)
    fmap = tokens.transpose(1, 2).reshape(2, 5, g, g)
    expected = _manual_adaptive_pool(fmap, grid).flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj.downsample(tokens), expected)


def test_ldpv2_downsample_is_row_major():
    proj = LDPv2Projector(DV, D, 2)
    tokens = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # token r*4 + c at grid (r, c)
    pooled = proj.downsample(tokens).flatten()
    torch.testing.assert_close(pooled, torch.tensor([2.5, 4.5, 10.5, 12.5]))  # e.g. mean(2, 3, 6, 7) = 4.5


def test_ldpv2_peg_is_residual():
    torch.manual_seed(0)
    proj = LDPv2Projector(DV, D, 3)
    x = torch.randn(2, 36, DV)
    with torch.no_grad():
        proj.peg.weight.zero_()
        proj.peg.bias.zero_()
        torch.testing.assert_close(proj(x), proj.downsample(proj.mlp(x)))
    assert proj.peg.groups == D and proj.peg.kernel_size == (3, 3)


def test_unknown_kind_is_config_error_naming_it():
    with pytest.raises(ConfigError, match="'ldpnet'.*mlp2x_gelu, ldp, ldpv2"):
        build_projector("ldpnet", vision_hidden=DV, text_hidden=D)
    with pytest.raises(ConfigError, match="'linear'"):
        num_projected_tokens("linear", 24)


@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
@pytest.mark.parametrize("num_patches", [577, 10, 35])
def test_non_square_patches_are_a_clear_error(kind, num_patches):
    proj = _build(kind, 4)
    with pytest.raises(ImageSizeError, match=f"{num_patches} patch features"):
        proj(torch.randn(1, num_patches, DV))


def test_mlp_accepts_any_patch_count():
    assert Mlp2xGelu(DV, D)(torch.randn(1, 577, DV)).shape == (1, 577, D)


def test_ldpv2_grid_errors():
    with pytest.raises(ConfigError, match="needs `grid`"):
        build_projector("ldpv2", vision_hidden=DV, text_hidden=D)
    with pytest.raises(ConfigError, match="needs `grid`"):
        num_projected_tokens("ldpv2", 24)
    with pytest.raises(ConfigError, match="between 1 and the patch grid side 4"):
        num_projected_tokens("ldpv2", 4, grid=5)
    with pytest.raises(ConfigError, match="grid >= 1"):
        LDPv2Projector(DV, D, 0)
    with pytest.raises(ImageSizeError, match="5x5 grid.*4x4 grid"):
        LDPv2Projector(DV, D, 5)(torch.randn(1, 16, DV))


def test_bad_widths_and_patch_grid():
    with pytest.raises(ConfigError, match="vision_hidden=0"):
        build_projector("ldp", vision_hidden=0, text_hidden=D)
    with pytest.raises(ConfigError, match="patch_grid"):
        num_projected_tokens("ldp", 0)


@pytest.mark.parametrize("kind", PROJECTOR_KINDS)
def test_bf16_forward(kind):
    torch.manual_seed(0)
    proj = _build(kind, 6).to(torch.bfloat16)
    out = proj(torch.randn(2, 36, DV, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert out.shape == (2, num_projected_tokens(kind, 6, getattr(proj, "grid", None)), D)
    assert torch.isfinite(out.float()).all()
