"""Inference cost of the Elastic Vision FFN, from one layer to the whole model, and Eve against transformers'
Llava built from the same parts, on CPU.

Parts: the embedded default's (`eve prepare`): SmolLM2-135M-Instruct and DINOv2-S at 224 px, so 256 image tokens
per image; an `mlp2x_gelu` projector (random, seeded), LoRA r 16 on q/v/up (as stage 2; its B matrices are
made non-zero so the adapters really compute), EVF layers on every second decoder layer (stage 3). Every router
is set to split tokens about half/half between the language and the vision FFN (a random direction orthogonal
to the mean hidden state of its layer, scaled), as a trained router splits them, so the dispatch cost is not hidden by a router that sends
everything to one expert. Nothing is dropped: eval mode, `eval_capacity_factor` 2.0 with two experts.

Each line compares two things, A / B, timed interleaved in this process: R rounds of N call pairs, A then B
(B then A on odd rounds); a round's ratio is the median A call time over the median B call time, the line's
ratio the median over rounds, and the times are medians over rounds. This machine's speed drifts by up to +-20% over minutes, which is why pairs
are interleaved and never compared across lines.

Lines (`case`):
- `layer_prefill`: one EVF layer (eval mode, routing statistics not requested, as in inference) on 8 x 304
  tokens, 256 of each row image tokens; B = the dense FFN (its own language FFN) on the same input. The layer
  lines use the first EVF layer of a stage-3 model without LoRA (a plain `LlamaMLP` as the dense FFN) and the
  hidden states that reach it.
- `layer_decode_image`: one EVF layer, one decoding token of an image request (routed); B = the dense FFN.
- `layer_decode_text`: one EVF layer, one text-only decoding token (what the model runs: nothing bound, the
  language FFN); B = the dense FFN.
- `model_image_decode_step`, `model_text_decode_step`: one KV-cache decoding step (the cache cut back after
  each) of an image request, stage-3 model against the same model without EVF layers, and of a text-only
  request, stage-3 model against the base LLM: the per-token cost the generation lines below average with
  their prefill, measured on many more calls. `model_text_decode_step_no_lora`: the same text-only step of a
  stage-3 model without LoRA (EVF layers only) against the base LLM, which separates the EVF layers' share of
  the text path's cost from that of peft's LoRA wrappers (each LoRA layer stays a module call when its
  adapter is off).
- `model_image_generation`: stage-3 model, greedy generation of 32 tokens for one image request; B = the same
  model without EVF layers (stage 2: the same weights).
- `model_prefill`: stage-3 model, one forward of 8 image requests x 304 tokens; B = the same model without EVF.
- `model_text_generation`: stage-3 model, greedy generation of 32 tokens for a text-only request; B = the base
  LLM (`AutoModelForCausalLM` from the LLM folder).
- `llava_logits`: max |logit difference| between Eve without LoRA/EVF (stage 1) and transformers'
  `LlavaForConditionalGeneration` with the same LM, tower and projector weights, on one image request.
- `llava_train_step`, `llava_prefill`, `llava_image_generation`: that Eve model / Llava: a training step
  (projector trainable, as stage 1; batch 4 x 304, forward + backward + SGD step), a prefill of 8 x 304, a
  greedy 32-token generation.
- `precision_bf16_*`, `precision_int8_*` (group `precision`): the stage-3 model in bf16 (routers fp32) and with
  `--quantize int8` (dynamic int8 linear layers, `eve_vlm/quantize.py`) against the same model in fp32: a
  prefill of one image request (304 tokens), a 32-token image generation, a 32-token text-only generation;
  `precision_*_logits` lines give the largest logit difference and the share of unchanged top tokens on one
  image and one text request (random tokens: a size of the change, not an accuracy).

Usage (from the repository root, after `eve prepare`):

    .venv/bin/python benchmarks/inference.py                  # all lines, ~6 min on 2 cores
    .venv/bin/python benchmarks/inference.py --group layer    # only the layer lines (layer, model, llava)

Output: one JSON line per case (`mode`, `a`, `b`, `ratio`, `a_ms`, `b_ms`, `rounds`, `reps`, `machine`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eve_vlm.assets import asset_paths  # noqa: E402
from eve_vlm.model import EveConfig, EveForConditionalGeneration  # noqa: E402
from eve_vlm.model.tower import load_vision_tower  # noqa: E402

IMAGE_SIZE = 224
TEXT_TOKENS = 48  # per image request: 256 image tokens + 48 text tokens = 304
NEW_TOKENS = 32


def paired(a: Callable[[], object], b: Callable[[], object], rounds: int, reps: int) -> dict:
    """Interleaved timing of `a` against `b` (see the module docstring): every call of `a` is followed by one of
    `b` (or preceded, on odd rounds); a round's ratio is the median of its `a` call times over the median of its
    `b` call times."""
    for fn in (a, b):
        fn()
    ratios, a_ms, b_ms = [], [], []
    for r in range(rounds):
        times = {"a": [], "b": []}
        order = (("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a))
        for _ in range(reps):
            for name, fn in order:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ta, tb = statistics.median(times["a"]) * 1000, statistics.median(times["b"]) * 1000
        ratios.append(ta / tb)
        a_ms.append(ta)
        b_ms.append(tb)
    return {
        "ratio": round(statistics.median(ratios), 3),
        "a_ms": round(statistics.median(a_ms), 3),
        "b_ms": round(statistics.median(b_ms), 3),
        "ratios": [round(x, 3) for x in ratios],
        "rounds": rounds,
        "reps": reps,
    }


def split_routers(model: EveForConditionalGeneration, inputs: dict, seed: int = 0) -> None:
    """Routers that send about half of the tokens to each expert, and vision FFNs that differ from their
    language FFN copies. Each router's direction is random but orthogonal to the mean of the hidden states its
    layer sees on `inputs`, so the sign of the projection splits them about evenly."""
    generator = torch.Generator().manual_seed(seed)
    means = {}

    def record_mean(i):
        def hook(module, args):
            means.setdefault(i, args[0].reshape(-1, args[0].shape[-1]).mean(0))

        return hook

    handles = [evf.register_forward_pre_hook(record_mean(i)) for i, evf in model.evf_layers.items()]
    with torch.no_grad():
        model(**inputs)
        for handle in handles:
            handle.remove()
        for i, evf in model.evf_layers.items():
            mean = means[i] / means[i].norm()
            direction = torch.randn(evf.hidden_size, generator=generator)
            direction = direction - (direction @ mean) * mean
            direction = direction / direction.norm() * 20
            evf.router.weight.copy_(torch.stack([-direction, direction]))
            for p in evf.vision_ffns.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))


def build(paths: dict) -> dict:
    """The models compared: base LM, stage 1 (no LoRA/EVF), stage 2 (LoRA), stage 3 (LoRA + EVF), Llava."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(paths["llm"]).eval()
    tower = load_vision_tower(paths["vision"], log=lambda *_: None)
    config = EveConfig(
        text_config=copy.deepcopy(base.config),
        vision_config=tower.config,
        image_size=IMAGE_SIZE,
        image_token_id=base.config.vocab_size,
    )
    torch.manual_seed(0)
    stage1 = EveForConditionalGeneration(config).eval()
    stage1.language_model.load_state_dict(base.state_dict())
    stage1.vision_tower.tower.load_state_dict(tower.state_dict())
    stage1.generation_config = copy.deepcopy(base.generation_config)
    stage2 = copy.deepcopy(stage1)
    stage2.add_lora(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    with torch.no_grad():
        for name, p in stage2.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    stage3 = copy.deepcopy(stage2)
    stage3.add_elastic_vision_ffns("alternate")
    split_routers(stage3, image_inputs(config, 8, seed=5))
    layer_model = copy.deepcopy(stage1)  # no LoRA: the EVF layer against a plain dense FFN
    layer_model.add_elastic_vision_ffns("alternate")
    split_routers(layer_model, image_inputs(config, 8, seed=5))
    return {
        "base": base,
        "stage1": stage1,
        "stage2": stage2.eval(),
        "stage3": stage3.eval(),
        "layer_model": layer_model.eval(),
    }


def build_llava(stage1: EveForConditionalGeneration, image_token_id: int):
    """transformers' Llava with stage 1's LM, tower and projector weights."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=stage1.config.vision_config,
        text_config=stage1.config.text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drops the CLS token, as Eve does
        image_seq_length=stage1.config.num_image_tokens,
    )
    llava = LlavaForConditionalGeneration(config).eval()
    lm = stage1.language_model
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    llava.model.vision_tower.load_state_dict(stage1.vision_tower.tower.state_dict())
    projector = stage1.projector
    llava.model.multi_modal_projector.linear_1.load_state_dict(projector[0].state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(projector[2].state_dict())
    llava.generation_config = copy.deepcopy(stage1.generation_config)
    return llava


def image_inputs(config: EveConfig, batch: int, seed: int = 0, image_token_id: int | None = None) -> dict:
    """`batch` image requests: BOS, 256 placeholders, 47 text tokens; random pixels."""
    generator = torch.Generator().manual_seed(seed)
    n = config.num_image_tokens
    placeholder = config.image_token_id if image_token_id is None else image_token_id
    text = torch.randint(100, 20000, (batch, TEXT_TOKENS - 1), generator=generator)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n), placeholder), text], 1)
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}


def greedy(model, inputs: dict) -> Callable[[], object]:
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return lambda: model.generate(**inputs, **kwargs)


def layer_cases(models: dict, args) -> list[tuple[str, Callable, Callable, int]]:
    from eve_vlm.model.evf import RoutingInputs

    stage3 = models["layer_model"]
    evf = stage3.evf_layers[0]
    dense = evf.language_ffn
    inputs = image_inputs(stage3.config, 8)
    captured = {}

    def capture(module, hook_args):
        captured["x"] = hook_args[0].detach().clone()

    handle = evf.register_forward_pre_hook(capture)
    with torch.no_grad():
        stage3(**inputs)
    handle.remove()
    x = captured["x"]  # real hidden states at the first EVF layer, (8, 304, 576)
    image_mask = inputs["input_ids"] == stage3.config.image_token_id
    routed = RoutingInputs(image_mask, image_mask.any(1))
    one = x[:1, -1:].clone()
    one_image = RoutingInputs(torch.zeros(1, 1, dtype=torch.bool), torch.ones(1, dtype=torch.bool))
    split = evf.route(x, image_mask).stats
    print(
        json.dumps(
            {
                "note": "layer_prefill routing",
                "image_tokens_per_expert": split.routed_image.tolist(),
                "text_tokens_per_expert": split.routed_text.tolist(),
            }
        ),
        flush=True,
    )

    def bound(inputs_, tensor):
        def run():
            with evf.bind(inputs_, 0):
                return evf(tensor)

        return run

    return [
        ("layer_prefill", bound(routed, x), lambda: dense(x), args.reps_prefill_layer),
        ("layer_decode_image", bound(one_image, one), lambda: dense(one), args.reps_decode_layer),
        ("layer_decode_text", lambda: evf(one), lambda: dense(one), args.reps_decode_layer),
    ]


def model_cases(models: dict, args) -> list[tuple[str, Callable, Callable, int]]:
    stage2, stage3, base = models["stage2"], models["stage3"], models["base"]
    no_lora = models["layer_model"]
    one = image_inputs(stage3.config, 1, seed=1)
    eight = image_inputs(stage3.config, 8, seed=2)
    text = {
        "input_ids": one["input_ids"][:, -TEXT_TOKENS + 1 :],
        "attention_mask": one["attention_mask"][:, :47],
    }

    def forward(model, inputs):
        return lambda: model(**inputs)

    def decode_step(model, inputs, **extra):
        """One KV-cache decoding step after `inputs`' prompt; the cache is cut back after each step."""
        cache = model(**inputs, use_cache=True).past_key_values
        token = torch.full((1, 1), 1000)
        mask = torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)

        def step():
            model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, **extra)
            cache.crop(-1)

        return step

    image_step = {"has_image": torch.tensor([True])}
    text_step = {"has_image": torch.tensor([False])}
    return [
        (
            "model_image_decode_step",
            decode_step(stage3, one, **image_step),
            decode_step(stage2, one, **image_step),
            args.reps_decode_step,
        ),
        (
            "model_text_decode_step",
            decode_step(stage3, text, **text_step),
            decode_step(base, text),
            args.reps_decode_step,
        ),
        (
            "model_text_decode_step_no_lora",
            decode_step(no_lora, text, **text_step),
            decode_step(base, text),
            args.reps_decode_step,
        ),
        ("model_image_generation", greedy(stage3, one), greedy(stage2, one), args.reps_generation),
        ("model_prefill", forward(stage3, eight), forward(stage2, eight), 1),
        ("model_text_generation", greedy(stage3, text), greedy(base, text), args.reps_generation),
    ]


def llava_cases(models: dict, args) -> list[tuple[str, Callable, Callable, int]]:
    stage1 = models["stage1"]
    llava_token = (
        stage1.config.text_config.vocab_size - 1
    )  # Llava embeds the placeholder: an id in the vocabulary
    llava = build_llava(stage1, llava_token)
    eve_one = image_inputs(stage1.config, 1, seed=3)
    llava_one = image_inputs(stage1.config, 1, seed=3, image_token_id=llava_token)
    with torch.no_grad():
        diff = (stage1(**eve_one).logits - llava(**llava_one).logits).abs().max().item()
    print(
        json.dumps({"case": "llava_logits", "max_abs_logit_difference": diff, "machine": machine()}),
        flush=True,
    )
    eve_eight = image_inputs(stage1.config, 8, seed=4)
    llava_eight = image_inputs(stage1.config, 8, seed=4, image_token_id=llava_token)
    eve_four = {k: v[:4] for k, v in eve_eight.items()}
    llava_four = {k: v[:4] for k, v in llava_eight.items()}

    def train_step(model, projector, inputs):
        trainable = list(projector.parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(trainable, lr=1e-6)

        def step():
            model.train()
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.eval()

        return step

    def forward(model, inputs):
        def run():
            with torch.no_grad():
                return model(**inputs)

        return run

    return [
        (
            "llava_train_step",
            train_step(stage1, stage1.projector, eve_four),
            train_step(llava, llava.model.multi_modal_projector, llava_four),
            1,
        ),
        ("llava_prefill", forward(stage1, eve_eight), forward(llava, llava_eight), 1),
        ("llava_image_generation", greedy(stage1, eve_one), greedy(llava, llava_one), 1),
    ]


def precision_cases(models: dict, args) -> list[tuple[str, Callable, Callable, int]]:
    """The stage-3 model in bf16 (routers kept fp32, as `from_pretrained(dtype=bfloat16)` keeps them) and with
    `--quantize int8` (`eve_vlm.quantize.quantize_int8`), each against itself in fp32; how far their logits
    move is printed first (max |difference| and the share of positions whose top token is unchanged)."""
    from eve_vlm.quantize import quantize_int8

    stage3 = models["stage3"]
    bf16 = copy.deepcopy(stage3).to(torch.bfloat16)
    for evf in bf16.evf_layers.values():
        evf.router.float()
    int8 = copy.deepcopy(stage3)
    quantize_int8(int8)
    one = image_inputs(stage3.config, 1, seed=6)
    text = {
        "input_ids": one["input_ids"][:, -TEXT_TOKENS + 1 :],
        "attention_mask": one["attention_mask"][:, :47],
    }
    variants = {"bf16": bf16, "int8": int8}
    with torch.no_grad():
        reference = {name: stage3(**inputs).logits for name, inputs in (("image", one), ("text", text))}
        for variant, model in variants.items():
            for name, inputs in (("image", one), ("text", text)):
                logits = model(**inputs).logits.float()
                same_top = (logits.argmax(-1) == reference[name].argmax(-1)).float().mean().item()
                line = {"case": f"precision_{variant}_{name}_logits", "vs": "fp32"}
                line |= {"max_abs_logit_difference": (logits - reference[name]).abs().max().item()}
                print(
                    json.dumps(line | {"same_top_token": round(same_top, 4), "machine": machine()}),
                    flush=True,
                )

    def forward(model, inputs):
        return lambda: model(**inputs)

    cases = []
    for variant, model in variants.items():
        cases += [
            (f"precision_{variant}_prefill", forward(model, one), forward(stage3, one), 1),
            (f"precision_{variant}_image_generation", greedy(model, one), greedy(stage3, one), 1),
            (f"precision_{variant}_text_generation", greedy(model, text), greedy(stage3, text), 1),
        ]
    return cases


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps-prefill-layer", type=int, default=5)
    parser.add_argument("--reps-decode-layer", type=int, default=300)
    parser.add_argument("--reps-decode-step", type=int, default=20)
    parser.add_argument(
        "--reps-generation",
        type=int,
        default=3,
        help="call pairs per round for the model-level generations (one generation varies by up to 20%%)",
    )
    parser.add_argument(
        "--group",
        action="append",
        choices=("layer", "model", "llava", "precision"),
        help="run only these groups (repeatable)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = asset_paths()
    if not Path(paths["llm"]).is_dir() or not Path(paths["vision"]).is_dir():
        sys.exit("The default parts are missing: run `eve prepare` first.")
    models = build(paths)
    groups = {"layer": layer_cases, "model": model_cases, "llava": llava_cases, "precision": precision_cases}
    for group in args.group or list(groups):
        for name, a, b, reps in groups[group](models, args):
            train = name.endswith("train_step")
            with torch.enable_grad() if train else torch.no_grad():
                result = paired(a, b, args.rounds, reps)
            print(
                json.dumps(
                    {"case": name, "mode": "train" if train else "eval", **result, "machine": machine()}
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
