"""The tiny parts the stage tests train on: a tiny LM + tokenizer folder, a tiny DINOv2 folder and LLaVA JSON
over coloured images (`build_parts`, which each test module wraps in a module fixture), and `recipe`, which writes and loads one stage's recipe."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
import yaml
from conftest import tiny_text_config, tiny_tokenizer, tiny_vision_config
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM

from eve_vlm.train.recipe import load_recipe

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "yellow": (230, 230, 20)}


def build_parts(root):
    """Writes a tiny LM + tokenizer folder, a tiny DINOv2 folder, and LLaVA JSON files over coloured images
    into `root`; returns `root`."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_text_config("llama"))
    lm.save_pretrained(root / "lm")
    tiny_tokenizer().save_pretrained(root / "lm")
    AutoModel.from_config(tiny_vision_config("dinov2")).save_pretrained(root / "tower")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    captions, vqa = [], []
    for i in range(48):
        name = list(COLOURS)[i % 4]
        pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(
            np.uint8
        )
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        captions.append(
            {
                "id": f"c{i}",
                "image": f"{i}.png",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": name}],
            }
        )
        vqa.append(
            {
                "id": f"q{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat is the colour of this image"},
                    {"from": "gpt", "value": name},
                ],
            }
        )
    vqa += [
        {
            "id": f"t{i}",
            "conversations": [
                {"from": "human", "value": "is there a circle"},
                {"from": "gpt", "value": "no"},
            ],
        }
        for i in range(8)
    ]
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in vqa))
    return root


def recipe(parts, tmp_path, stage, evf=None, model=None, **training):
    data = {
        "stage": stage,
        "model": {"init_from": str(tmp_path / f"stage{stage - 1}")}
        if stage > 1
        else {
            "language_model": str(parts / "lm"),
            "vision_tower": str(parts / "tower"),
            "projector_type": "ldp",
        },
        "data": {
            "sources": [
                {
                    "path": str(parts / ("captions.json" if stage == 1 else "vqa.jsonl")),
                    "image_folder": str(parts / "images"),
                }
            ],
            "template": "plain" if stage == 1 else "chat",
            "max_length": 64,
            "cache_dir": str(tmp_path / "data-cache"),
            "num_proc": 1,
        },
        "trainable": {
            1: [{"pattern": r"^projector\."}],
            2: [{"pattern": r"^projector\."}, {"pattern": r"\.lora_(A|B)\."}],
            3: [{"pattern": r"\.mlp\.router\."}, {"pattern": r"\.mlp\.vision_ffns\."}],
        }[stage],
        "training": {
            "output_dir": str(tmp_path / f"stage{stage}"),
            "max_steps": 12,
            "per_device_train_batch_size": 8,
            "learning_rate": 5e-3,
            "logging_steps": 3,
            "warmup_ratio": 0.0,
            "seed": 0,
            **training,
        },
    }
    data["model"].update(model or {})
    if stage == 2:
        data["lora"] = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    if stage == 3:
        data["evf"] = {"placement": "alternate", "allocation": "img_gbpr", **(evf or {})}
    path = tmp_path / f"stage{stage}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 --standalone ARGS` on CPU (one OpenMP thread per process), checked to exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
