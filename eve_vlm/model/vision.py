"""The elastic vision encoder: any Hugging Face vision tower, frozen, swappable.

The tower is built with `AutoModel.from_config` (CLIPVisionModel, SiglipVisionModel, Dinov2Model, ... anything
that returns `hidden_states`); `tower.load_vision_tower` loads one from a folder, a dual encoder's vision half
included. An image side that is not a multiple of the patch gives image_size // patch_size patches a side, as
the tower's strided patch convolution does (SigLIP-so400m 384/14: 27 x 27). Features come from one hidden layer (default the penultimate, as in LLaVA and
Eve), and the prefix tokens (CLS, registers) are dropped: their count is the sequence length minus the number
of patches, so towers with and without CLS are handled alike. Optionally the features are standardised per
token (a LayerNorm with no parameters, as InternVL's projector starts with a LayerNorm): a tower's inner hidden
states can be small (DINOv2-S's penultimate layer has |x| ~ 0.4), which slows the projector's alignment.

Shapes: N images, C=3 channels, H=W image side, P = g*g patches, Dv vision hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig

from eve_vlm.errors import ImageSizeError


class EveVisionEncoder(nn.Module):
    """Wraps a vision tower and returns its patch features from one hidden layer.

    Args:
        tower: A transformers vision model that accepts `pixel_values` and `output_hidden_states`.
        image_size: Expected image side in pixels.
        patch_size: The tower's patch size.
        feature_layer: Index into the tower's `hidden_states` (-2 = penultimate), or a list of indices whose
            features are concatenated on the channel axis (L layers give L * Dv channels).
        feature_norm: Standardise each layer's patch feature over its Dv channels (LayerNorm without
            parameters).
    """

    def __init__(
        self,
        *,
        tower: nn.Module,
        image_size: int,
        patch_size: int,
        feature_layer: int | list[int] = -2,
        feature_norm: bool = False,
    ):
        super().__init__()
        self.tower = tower
        self.image_size = image_size
        self.patch_size = patch_size
        self.feature_layers = (
            list(feature_layer) if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        )
        self.feature_norm = feature_norm
        # The tower's unsplittable layers, for the Eve model's `post_init` to collect (it reads its children's).
        self._no_split_modules = set(getattr(tower, "_no_split_modules", None) or ())
        # CLIP and SigLIP need position interpolation when run at another size than they were built for.
        native = getattr(tower.config, "image_size", image_size)
        self.interpolate = native != image_size and tower.config.model_type != "dinov2"

    @classmethod
    def from_config(
        cls,
        vision_config: PreTrainedConfig,
        *,
        image_size: int,
        feature_layer: int | list[int],
        feature_norm: bool = False,
    ) -> EveVisionEncoder:
        """Builds the tower from its config (random weights; load real ones with `from_pretrained`)."""
        tower = AutoModel.from_config(vision_config)
        return cls(
            tower=tower,
            image_size=image_size,
            patch_size=int(vision_config.patch_size),
            feature_layer=feature_layer,
            feature_norm=feature_norm,
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encodes images.

        Args:
            pixel_values: (N, 3, H, W) with H = W = image_size.

        Returns:
            Patch features (N, P, L * Dv) of the L layers taken, CLS and register tokens removed.
        """
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ImageSizeError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected (num_images, {expected[0]}, "
                f"{expected[1]}, {expected[2]}); resize images with the model's EveProcessor "
                f"(image_size={self.image_size})."
            )
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        first = next(self.tower.parameters())
        pixel_values = pixel_values.to(first.device, first.dtype)
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        pieces = []
        for layer in self.feature_layers:
            hidden = out.hidden_states[layer]  # (N, prefix + P, Dv)
            prefix = hidden.shape[1] - self.num_patches
            assert prefix >= 0, f"tower returned {hidden.shape[1]} tokens for {self.num_patches} patches"
            patches = hidden[:, prefix:]  # (N, P, Dv)
            pieces.append(F.layer_norm(patches, patches.shape[-1:]) if self.feature_norm else patches)
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]  # (N, P, L * Dv)
