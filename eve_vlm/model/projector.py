"""Vision adapters ("projectors"): map vision patch features to language-model tokens.

Shape letters: B batch, P patches (P = g*g in row-major grid order for the grid projectors), g patch-grid side,
Dv vision hidden size, D text (LM) hidden size, N projected tokens.

Features:
- `Mlp2xGelu`: LLaVA-1.5's `mlp2x_gelu` adapter, `Linear(Dv,D) -> GELU -> Linear(D,D)`; N = P.
- `LDPProjector`: MobileVLM's Lightweight Downsample Projector (LDP): the same MLP, then two MobileNetV3
  inverted-residual blocks (expand ratio 1: depthwise 3x3 -> LayerNorm -> hardswish -> squeeze-excite ->
  pointwise 1x1 -> LayerNorm), the first with stride 1 and a residual, the second with stride 2;
  N = ceil(g/2)^2, e.g. 576 -> 144. This is the adapter Eve's released code uses.
- `LDPv2Projector`: MobileVLM V2's LDPv2: the same MLP, adaptive average pooling to a `grid x grid` map, then a
  PEG positional block `x + depthwise_conv3x3(x)`; N = grid^2.
- `build_projector` builds one by name; `num_projected_tokens` gives N from g without running a module.

Derived from:
- LLaVA-1.5 (Liu et al. 2023, arXiv 2310.03744), `llava/model/multimodal_projector/builder.py`.
- MobileVLM (Chu et al. 2023, arXiv 2312.16886), `mobilevlm/model/vision_projector.py` (`LDPBlock`,
  `LDPNetProjector`), which builds its blocks from torchvision's `InvertedResidual`/`SqueezeExcitation`
  (`torchvision/models/mobilenetv3.py`, `torchvision/ops/misc.py`) with timm's `LayerNormAct2d` as the norm.
  Both are re-implemented here in plain torch: no torchvision or timm dependency.
- MobileVLM V2 (Chu et al. 2024, arXiv 2402.03766), same file (`FeatureIRLayer`, `TokenDownLayer`,
  `PosInjectLayer`, `LDPNetV2Projector`); the PEG block comes from Twins (Chu et al. 2021, arXiv 2104.13840).

No BatchNorm anywhere: MobileVLM normalises with a channel LayerNorm, so batch size and train/eval mode do not
change the output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from eve_vlm.errors import ConfigError, ImageSizeError

PROJECTOR_KINDS = ("mlp2x_gelu", "ldp", "ldpv2")
_LDPV2_NEEDS_GRID = (
    "projector 'ldpv2' needs `grid`, the side of its output token grid (e.g. 12 -> 144 tokens)"
)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round `value` to the nearest multiple of `divisor`, never going more than 10% below it.

    Same rule as torchvision's `_make_divisible` (from the TensorFlow MobileNet code); MobileNetV3 uses it for
    the squeeze-excite width, `make_divisible(channels // 4, 8)`.

    Args:
        value: The width to round.
        divisor: The multiple to round to.
        min_value: The smallest result allowed; `divisor` when None.

    Returns:
        The rounded width.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def patch_grid_side(num_patches: int) -> int:
    """Return g with g*g == num_patches, or raise `ImageSizeError` when num_patches is not a perfect square.

    Args:
        num_patches: The number of patch features P per image.

    Returns:
        The side g of the square patch grid.

    Raises:
        ImageSizeError: If `num_patches` is not a positive perfect square.
    """
    side = math.isqrt(num_patches) if num_patches > 0 else 0
    if side < 1 or side * side != num_patches:
        lower = max(side, 1)
        raise ImageSizeError(
            f"the grid projectors (ldp, ldpv2) need a square patch grid, but got {num_patches} patch features; "
            f"nearest squares are {lower * lower} and {(lower + 1) ** 2}. Drop the CLS token from the vision "
            "features and use a square input image, or use projector 'mlp2x_gelu'."
        )
    return side


def num_projected_tokens(kind: str, patch_grid: int, grid: int | None = None) -> int:
    """Number of image tokens N a projector emits for a `patch_grid x patch_grid` patch grid.

    Args:
        kind: One of `PROJECTOR_KINDS`.
        patch_grid: Side g of the square patch grid coming from the vision tower.
        grid: Output grid side of `ldpv2`; ignored by the other kinds.

    Returns:
        g*g for `mlp2x_gelu`, ceil(g/2)^2 for `ldp`, grid^2 for `ldpv2`.

    Raises:
        ConfigError: If `kind` is unknown, `patch_grid < 1`, or `ldpv2` gets no grid or one larger than g.
    """
    _check_kind(kind)
    if patch_grid < 1:
        raise ConfigError(f"patch_grid must be >= 1, got {patch_grid}")
    if kind == "mlp2x_gelu":
        return patch_grid * patch_grid
    if kind == "ldp":
        return math.ceil(patch_grid / 2) ** 2
    _check_ldpv2_grid(grid, patch_grid)
    return grid * grid


def build_projector(kind: str, *, vision_hidden: int, text_hidden: int, grid: int | None = None) -> nn.Module:
    """Build the projector named `kind`.

    Args:
        kind: One of `PROJECTOR_KINDS`: `mlp2x_gelu`, `ldp` or `ldpv2`.
        vision_hidden: Vision feature width Dv.
        text_hidden: Language-model hidden size D.
        grid: Output grid side of `ldpv2` (required there, e.g. 12 for 144 tokens); ignored by the other kinds.

    Returns:
        The projector module, mapping `(B, P, Dv)` to `(B, N, D)`.

    Raises:
        ConfigError: If `kind` is unknown, a width is not positive, or `ldpv2` gets no valid grid.
    """
    _check_kind(kind)
    if kind == "mlp2x_gelu":
        return Mlp2xGelu(vision_hidden, text_hidden)
    if kind == "ldp":
        return LDPProjector(vision_hidden, text_hidden)
    if grid is None:
        raise ConfigError(_LDPV2_NEEDS_GRID)
    return LDPv2Projector(vision_hidden, text_hidden, grid)


class Mlp2xGelu(nn.Sequential):
    """LLaVA-1.5's `mlp2x_gelu`: `Linear(Dv, D) -> GELU -> Linear(D, D)` on every patch; N = P.

    A `nn.Sequential` so that the parameter names (`0.weight`, `2.weight`) match LLaVA's `mm_projector`.

    Args:
        vision_hidden: Vision feature width Dv.
        text_hidden: Language-model hidden size D.
    """

    kind = "mlp2x_gelu"

    def __init__(self, vision_hidden: int, text_hidden: int) -> None:
        _check_widths(vision_hidden, text_hidden)
        super().__init__(
            nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden)
        )

    def num_tokens(self, patch_grid: int) -> int:
        """Number of output tokens for a `patch_grid x patch_grid` input grid."""
        return num_projected_tokens(self.kind, patch_grid)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a `(B, C, H, W)` map (timm's `LayerNormAct2d` without activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as in torchvision's `SqueezeExcitation` with MobileNetV3's hard-sigmoid gate.

    `x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))`, with `fc1`/`fc2` 1x1 convolutions with bias.

    Args:
        channels: Number of input (and output) channels C.
        squeeze_channels: Width of the bottleneck.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        scale = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 inverted-residual block with expand ratio 1, as MobileVLM configures torchvision's.

    MobileVLM: `InvertedResidual(InvertedResidualConfig(D, 3, D, D, True, "HS", stride, 1, 1), layer_norm,
    se_layer)`, i.e. kernel 3, no expansion, squeeze-excite on, hardswish, dilation 1, width 1. Since the
    expanded width equals the input width there is no 1x1 expansion conv; the block is
    depthwise 3x3 conv -> LayerNorm -> hardswish -> squeeze-excite -> pointwise 1x1 conv -> LayerNorm,
    plus the input when stride is 1. Convolutions have no bias (a norm follows each), as in torchvision.
    Parameter names follow torchvision (`block.0.0.weight` depthwise conv, `block.1.fc1.weight`, ...).

    torchvision rounds every channel count to a multiple of 8; with D not a multiple of 8 MobileVLM's
    projector would not run at all. Here the channels are exactly D; only the squeeze width is rounded,
    `make_divisible(D // 4, 8)`, as torchvision does.

    Args:
        channels: Number of input and output channels D.
        stride: 1 (same grid, residual) or 2 (grid side g -> ceil(g/2), no residual).
    """

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.use_residual = stride == 1
        self.squeeze_channels = make_divisible(channels // 4, 8)
        depthwise = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)
        pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.block = nn.Sequential(
            nn.Sequential(depthwise, LayerNorm2d(channels), nn.Hardswish()),
            SqueezeExcite(channels, self.squeeze_channels),
            nn.Sequential(pointwise, LayerNorm2d(channels)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, g, g)
        out = self.block(x)  # (B, D, g', g'), g' = ceil(g / stride)
        return x + out if self.use_residual else out


class LDPProjector(nn.Module):
    """MobileVLM's Lightweight Downsample Projector (LDP, `ldpnet`): MLP, then two inverted-residual blocks.

    `Linear(Dv, D) -> GELU -> Linear(D, D)` per patch, reshape to the `(B, D, g, g)` grid, an inverted-residual
    block with stride 1, one with stride 2, flatten row-major: N = ceil(g/2)^2 tokens (4x fewer for even g).

    Checkpoint mapping from MobileVLM's `LDPNetProjector`: `model.mlp.{1,3}.*` -> `mlp.{0,2}.*`,
    `model.mb_block.{1,2}.*` -> `blocks.{0,1}.*` (the rest of the names are torchvision's).

    Args:
        vision_hidden: Vision feature width Dv.
        text_hidden: Language-model hidden size D.
    """

    kind = "ldp"

    def __init__(self, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        _check_widths(vision_hidden, text_hidden)
        self.mlp = Mlp2xGelu(vision_hidden, text_hidden)
        self.blocks = nn.Sequential(
            InvertedResidual(text_hidden, stride=1), InvertedResidual(text_hidden, stride=2)
        )

    def num_tokens(self, patch_grid: int) -> int:
        """Number of output tokens for a `patch_grid x patch_grid` input grid."""
        return num_projected_tokens(self.kind, patch_grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv)
        b, p, _ = x.shape
        g = patch_grid_side(p)
        x = self.mlp(x)  # (B, P, D)
        x = x.transpose(1, 2).reshape(b, -1, g, g)  # (B, D, g, g)
        x = self.blocks(x)  # (B, D, ceil(g/2), ceil(g/2))
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class LDPv2Projector(nn.Module):
    """MobileVLM V2's LDPv2: MLP, adaptive average pooling to `grid x grid`, PEG positional block.

    `Linear(Dv, D) -> GELU -> Linear(D, D)` per patch, `AdaptiveAvgPool2d(grid)` on the `(B, D, g, g)` map, then
    `x + DepthwiseConv3x3(x)` (with bias), flatten row-major: N = grid^2 tokens. MobileVLM V2 uses grid 12
    (576 -> 144 tokens).

    Checkpoint mapping from MobileVLM's `LDPNetV2Projector`: `mlp.mlp.{0,2}.*` -> `mlp.{0,2}.*`,
    `peg.peg.0.*` -> `peg.*`.

    Args:
        vision_hidden: Vision feature width Dv.
        text_hidden: Language-model hidden size D.
        grid: Side of the output token grid; must not exceed the input patch grid side.
    """

    kind = "ldpv2"

    def __init__(self, vision_hidden: int, text_hidden: int, grid: int) -> None:
        super().__init__()
        _check_widths(vision_hidden, text_hidden)
        if grid < 1:
            raise ConfigError(f"projector 'ldpv2' needs grid >= 1, got {grid}")
        self.grid = grid
        self.mlp = Mlp2xGelu(vision_hidden, text_hidden)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.peg = nn.Conv2d(text_hidden, text_hidden, 3, padding=1, groups=text_hidden, bias=True)

    def num_tokens(self, patch_grid: int) -> int:
        """Number of output tokens for a `patch_grid x patch_grid` input grid."""
        return num_projected_tokens(self.kind, patch_grid, self.grid)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """Average-pool a `(B, P, C)` token grid to `(B, grid*grid, C)` (MobileVLM V2's `TokenDownLayer`)."""
        b, p, _ = x.shape
        g = patch_grid_side(p)
        if self.grid > g:
            raise ImageSizeError(
                f"projector 'ldpv2' pools to a {self.grid}x{self.grid} grid, but the vision features form only a "
                f"{g}x{g} grid; lower `grid` to at most {g} or use larger images"
            )
        x = x.transpose(1, 2).reshape(b, -1, g, g)  # (B, C, g, g)
        x = self.pool(x)  # (B, C, grid, grid)
        return x.flatten(2).transpose(1, 2)  # (B, grid*grid, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv)
        b = x.shape[0]
        x = self.downsample(self.mlp(x))  # (B, N, D)
        x = x.transpose(1, 2).reshape(b, -1, self.grid, self.grid)  # (B, D, grid, grid)
        x = x + self.peg(x)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def _check_kind(kind: str) -> None:
    if kind not in PROJECTOR_KINDS:
        raise ConfigError(f"unknown projector kind {kind!r}; known kinds: {', '.join(PROJECTOR_KINDS)}")


def _check_widths(vision_hidden: int, text_hidden: int) -> None:
    if vision_hidden < 1 or text_hidden < 1:
        raise ConfigError(
            f"projector widths must be >= 1, got vision_hidden={vision_hidden}, text_hidden={text_hidden}"
        )


def _check_ldpv2_grid(grid: int | None, patch_grid: int) -> None:
    if grid is None:
        raise ConfigError(_LDPV2_NEEDS_GRID)
    if not 1 <= grid <= patch_grid:
        raise ConfigError(
            f"projector 'ldpv2' grid must be between 1 and the patch grid side {patch_grid}, got {grid}"
        )
