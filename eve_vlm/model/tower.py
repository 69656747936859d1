"""Vision-tower folders: what a folder holds, its vision sub-model and its image processor.

A tower folder is a transformers checkpoint in one of two layouts, both tested:

- a dual encoder (`CLIPModel`, `SiglipModel`; e.g. `openai/clip-vit-large-patch14-336`,
  `google/siglip-so400m-patch14-384` and the fixed-resolution SigLIP 2 checkpoints, which are `SiglipModel`s):
  `config.json` has a `vision_config`. Only the vision model is built (`CLIPVisionModel`, `SiglipVisionModel`,
  the class transformers' `AutoModel` maps the vision config to) and only its weights are loaded; the text
  tower's weights are skipped by transformers' loader;
- a bare vision model (`CLIPVisionModel`, `SiglipVisionModel`, `Dinov2Model`, ...).

`read_tower_config` reads only `config.json`, so a folder that holds no vision model (an LLM, a NaFlex SigLIP 2
tower without a fixed image size) is refused in milliseconds, before any model is built. The image processor
comes from the folder's own `preprocessor_config.json` (mean, std, resize and centre crop) through transformers'
`AutoImageProcessor`; a folder without one falls back to a square resize with the statistics of
`FALLBACK_NORMALISATION`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from transformers import AutoConfig, AutoImageProcessor, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from eve_vlm.errors import CheckpointError, ConfigError

__all__ = ["build_image_processor", "load_vision_tower", "read_tower_config"]

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# Only for towers saved without a preprocessor_config.json (a folder converted by `eve prepare`, a config built in
# memory): the statistics each family was trained with; any other family gets ImageNet's.
FALLBACK_NORMALISATION = {
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def read_tower_config(folder: str | Path) -> tuple[PreTrainedConfig, PreTrainedConfig]:
    """The vision config of a tower folder, read from its `config.json` alone (no weights, no model).

    Returns:
        `(vision_config, folder_config)`: the vision config (the folder's `vision_config` for a dual
        encoder, else the folder's config itself) and the folder's config.

    Raises:
        ConfigError: The folder holds no config, or no vision model with a fixed image size and patch size.
    """
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise ConfigError(
            f"model.vision_tower: {root} holds no config.json; give a transformers vision checkpoint folder "
            "(config.json and model.safetensors, e.g. a CLIP, SigLIP or DINOv2 download)."
        )
    try:
        config = AutoConfig.from_pretrained(root)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"model.vision_tower: {root}/config.json cannot be read as a model config ({err})."
        ) from None
    vision = getattr(config, "vision_config", None) or config
    if not all(isinstance(getattr(vision, key, None), int) for key in ("image_size", "patch_size")):
        holds = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise ConfigError(
            f"model.vision_tower: {root} holds a {config.model_type} model ({holds}), not a vision tower with a "
            "fixed image size and patch size. Give a CLIP, SigLIP (or fixed-resolution SigLIP 2) or DINOv2 "
            "folder, either the full dual-encoder checkpoint or its vision model."
        )
    return vision, config


@contextmanager
def _quiet_load_report():
    """Silences transformers' per-key load report while a dual encoder's vision half is loaded: it would list
    every text-tower weight as unexpected. `load_vision_tower` reports what was dropped and what is missing.
    The tensor-parallel logger goes quiet with it: transformers checks a model's (empty) tensor-parallel plan
    whenever the load report's level is WARNING or above, and would list every tower weight as "not sharded"."""
    loggers = [
        logging.getLogger(f"transformers.{name}")
        for name in ("modeling_utils", "distributed.tensor_parallel")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def load_vision_tower(folder: str | Path, *, dtype=None, log=print) -> PreTrainedModel:
    """The vision model of a tower folder with its weights; a dual encoder's text tower is never built.

    Raises:
        ConfigError: The folder holds no vision model (see `read_tower_config`).
        CheckpointError: Most of the vision model's weights are not in the folder.
    """
    vision, config = read_tower_config(folder)
    with _quiet_load_report():
        tower, info = AutoModel.from_pretrained(folder, config=vision, dtype=dtype, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    if len(missing) * 2 > len(tower.state_dict()):
        raise CheckpointError(
            f"model.vision_tower: {folder} has a {config.model_type} config but {len(missing)} of the "
            f"{type(tower).__name__} weights are not in its weights file (e.g. {missing[0]}); it does not hold "
            "this vision model's weights."
        )
    holds = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    part = f"the vision model of a {holds} checkpoint" if vision is not config else "a vision model"
    dropped = len(info["unexpected_keys"])
    log(
        f"vision tower: {type(tower).__name__} from {folder} ({part}"
        + (f"; {dropped} weights of its other parts not loaded" if dropped else "")
        + (f"; not in the folder, left as initialised: {', '.join(missing)}" if missing else "")
        + ")"
    )
    return tower


def _square_overrides(processor: BaseImageProcessor, image_size: int) -> dict:
    """Keyword overrides that make the processor's output `image_size` x `image_size`, keeping its
    resize-then-crop ratio (CLIP: shortest edge 336, crop 336; DINOv2: 256, crop 224)."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = processor.size
    if crop is not None and crop.height:
        if crop.height != crop.width:
            raise ConfigError(
                f"The tower's image processor crops to {crop.height}x{crop.width}, not a square."
            )
        if crop.height == image_size:
            return {}
        side = size.shortest_edge or size.height
        return {
            "size": {"shortest_edge": round(side * image_size / crop.height)},
            "crop_size": {"height": image_size, "width": image_size},
        }
    if size.height == image_size and size.width == image_size:
        return {}
    return {"size": {"height": image_size, "width": image_size}}


def build_image_processor(
    vision_config: PreTrainedConfig, image_size: int, folder: str | Path | None = None
) -> BaseImageProcessor:
    """The image processor of a tower, giving `image_size` x `image_size` inputs.

    With a `folder` that has a `preprocessor_config.json`, it is the folder's own processor (transformers'
    `AutoImageProcessor`, PIL backend): its mean, std, resampling, resize and centre crop, scaled to `image_size`
    when that differs from the crop the tower was trained with (CLIP: shortest edge then crop; SigLIP: resize to
    the square). Without one, a square resize with the family's statistics (`FALLBACK_NORMALISATION`, else
    ImageNet's).
    """
    if folder is not None and (Path(folder) / PREPROCESSOR_CONFIG).is_file():
        processor = AutoImageProcessor.from_pretrained(folder, backend="pil", do_convert_rgb=True)
        overrides = _square_overrides(processor, image_size)
        if overrides:
            processor = AutoImageProcessor.from_pretrained(
                folder, backend="pil", do_convert_rgb=True, **overrides
            )
        return processor
    mean, std = FALLBACK_NORMALISATION.get(
        vision_config.model_type, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    )
    return CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        do_convert_rgb=True,
        image_mean=list(mean),
        image_std=list(std),
    )
