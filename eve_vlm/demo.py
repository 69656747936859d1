"""`eve demo`: the whole model path on tiny random parts, in seconds, with no downloads.

Builds a tiny Llama-family LM and a tiny DINOv2 tower, adds Elastic Vision FFNs to every second layer,
checks the elastic guarantee (text-only logits equal the base LM's bit for bit), saves and reloads the model
through the Auto classes, and generates from an image prompt. The real-weights pipeline is `eve quickstart`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, Dinov2Config, LlamaConfig

from eve_vlm.model import EveConfig, EveForConditionalGeneration
from eve_vlm.model.params import parameter_counts


def tiny_config(vocab: int = 256) -> EveConfig:
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = Dinov2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    )
    return EveConfig(text_config=text, vision_config=vision, projector_type="ldp", image_token_id=vocab)


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0) -> dict:
    """Runs the demo and returns what it measured."""
    torch.manual_seed(seed)
    model = EveForConditionalGeneration(tiny_config()).eval()
    base_lm = copy.deepcopy(model.language_model)
    layers = model.add_elastic_vision_ffns("alternate", allocation="img_gbpr")
    print(f"EVF layers: {layers}; image tokens per image: {model.config.num_image_tokens}")

    text = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        same = torch.equal(model(input_ids=text).logits, base_lm(input_ids=text).logits)
    print(f"text-only logits equal the base LM's bit for bit: {same}")

    n = model.config.num_image_tokens
    prompt = torch.cat(
        [torch.tensor([[1]]), torch.full((1, n), model.config.image_token_id), text[:1, :6]], 1
    )
    pixels = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        out = model(input_ids=prompt, pixel_values=pixels, output_routing=True)
    for i, stats in out.routing.items():
        print(
            f"layer {i}: image tokens per expert {stats.routed_image.tolist()}, kept {stats.kept_image.tolist()}"
        )

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    reloaded = AutoModelForImageTextToText.from_pretrained(out_dir).eval()
    generated = reloaded.generate(input_ids=prompt, pixel_values=pixels, max_new_tokens=8, do_sample=False)
    print(f"saved to {out_dir}; generated ids: {generated[0, prompt.shape[1] :].tolist()}")
    counts = parameter_counts(reloaded)
    print("parameters:", counts.to_dict())
    return {"text_equal": same, "out_dir": str(out_dir), "params": counts.to_dict()}
