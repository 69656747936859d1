"""What a folder holds, checked before a model is built from it.

`from_pretrained` on the wrong folder fails late and badly: a base LLM's folder given as an Eve model builds an
Eve model with default sizes from the LLM's config (it grew to 24 GB of RAM before the kernel killed it), a
missing folder or a truncated weights file ends in a raw traceback. `check_eve_folder` reads only `config.json`
and the safetensors headers, in milliseconds, and raises `CheckpointError` naming the folder, what it holds and
what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from eve_vlm.errors import CheckpointError

__all__ = ["check_eve_folder"]

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def _weight_files(root: Path) -> list[Path]:
    if (root / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((root / WEIGHTS_INDEX).read_text())
            return sorted({root / name for name in index["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{root / WEIGHTS_INDEX} cannot be read ({err}).") from None
    if (root / WEIGHTS).is_file():
        return [root / WEIGHTS]
    raise CheckpointError(
        f"{root} holds a config but no {WEIGHTS} (or {WEIGHTS_INDEX}); the folder is incomplete, e.g. a "
        "training run that stopped before saving. Point at a finished stage's folder."
    )


def check_eve_folder(path: str | os.PathLike) -> None:
    """Raises `CheckpointError` unless `path` is a saved Eve model: a folder whose `config.json` has
    `model_type: eve` and whose safetensors weights are present and complete (headers and sizes agree)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"Model folder {root} does not exist (or is not a folder).")
    config_file = root / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{root} holds no config.json, so it is not a saved model; give a folder written by `eve train` "
            "(a stage's training.output_dir)."
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file} cannot be read as JSON ({err}).") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "eve":
        raise CheckpointError(
            f"{root} holds a {model_type or 'non-transformers'} model, not an Eve model. A base LLM or vision "
            "tower folder goes into a stage-1 recipe (model.language_model / model.vision_tower); commands and "
            "model.init_from take a folder written by `eve train`."
        )
    for file in _weight_files(root):
        if not file.is_file():
            raise CheckpointError(f"The weights file {file} listed by {WEIGHTS_INDEX} is missing.")
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except (OSError, SafetensorError) as err:
            raise CheckpointError(
                f"The weights file {file} ({file.stat().st_size} bytes) cannot be read: {err}. It is probably "
                "truncated (an interrupted copy or save); copy or save it again."
            ) from None
