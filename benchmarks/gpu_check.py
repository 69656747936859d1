"""Install check on an accelerator, in minutes: the three training stages and the text-only guarantee, bf16.

Builds a random Eve model per size (never downloaded; configs inline, as in `tests/conftest.py`):
- `tiny`: Llama LM (vocab 128, hidden 32, 4 layers), DINOv2 tower (hidden 24, 2 layers, 32 px, 8 px patches),
  `mlp2x_gelu` projector: 16 image tokens per image;
- `1b`: Llama-style LM (hidden 2048, 16 layers, 16 heads / 4 KV heads, FFN 5504, vocab 32000, untied: 0.84B
  parameters), DINOv2-S-sized tower (hidden 384, 12 layers, 224 px, 14 px patches): 256 image tokens.

The model is cast to bf16, then trained as the stages train it (`eve_vlm/train/stages.py`): stage 1 the
projector; stage 2 adds LoRA (r 16, alpha 32, every linear layer of the LM) and trains projector + LoRA;
stage 3 adds Elastic Vision FFNs (`alternate`, `img_gbpr`) and trains routers + vision FFNs. The trainables
are chosen with `apply_trainable_rules` and cast to fp32 with `trainable_to_fp32`; the frozen rest stays bf16.
Before stages 2 and 3 the whole model is cast back to bf16, as the next stage's `from_pretrained(dtype=...)`
loads the previous stage's fp32 trainables. The EVF layers take `EvfConfig`'s defaults (`soft` combine,
capacity factor 1.5, no router warm start), not the quickstart recipe's options. Each stage runs N AdamW steps
(weight decay 0, so a weight that did not change got no gradient) under bf16 autocast on one fixed synthetic
batch: a BOS, one image block, random text; labels = input_ids.

Checks (one JSON line each: `check`, `size`, `stage`, `ok`, `value` or `ms`, `device`, `dtype`):
- `dtypes`: trainable parameters fp32, frozen ones bf16 (value: trainable elements);
- `loss_falls`: last step's loss < first step's (value: [first, last]);
- `weights_changed`: share of trainable elements that changed over the N steps, must be > 0.99;
- `step_time`: median wall time of one step (forward, backward, optimizer step) over steps 2..N, with
  `torch.cuda.synchronize` around it on CUDA; ok when the step ran and its loss was finite;
- `router_fp32` (stage 3): every `.mlp.router` call (forward hooks) returned fp32 logits under autocast;
- `text_logits_equal_base`: after stage 3, in eval mode under bf16 autocast, the logits of a text-only batch
  (the batch without its image block) equal, bit for bit (`torch.equal`), those of the base LM (an
  `AutoModelForCausalLM` given the LM's bf16 weights before stage 1); value: the largest absolute difference;
- `generate_image`, `generate_text`: greedy generation of a few tokens for one image request and one text-only
  request (ms: the `generate` call); the text-only tokens must equal the base LM's.

Usage (from the repository root):

    .venv/bin/python benchmarks/gpu_check.py                                   # cuda if available
    .venv/bin/python benchmarks/gpu_check.py --sizes 1b --steps 20
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_check.py --device cpu --sizes tiny   # smoke test

Default sizes: `tiny,1b` on an accelerator, `tiny` on CPU. Exit status 1 if any check failed (an exception in
a size is printed as a failed `error` check, with its traceback on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Dinov2Config, LlamaConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eve_vlm.model import EveConfig, EveForConditionalGeneration  # noqa: E402
from eve_vlm.train.recipe import TrainableRule  # noqa: E402
from eve_vlm.train.trainable import apply_trainable_rules, trainable_to_fp32  # noqa: E402

TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def size_spec(
    *, vocab, hidden, ffn, layers, heads, kv_heads, positions, tied, vision, batch, text_len
) -> dict:
    """One model size: a Llama text config, a DINOv2 config from `vision` = (hidden, ffn, layers, heads,
    image size, patch), and the batch shape of a step."""
    v_hidden, v_ffn, v_layers, v_heads, image_size, patch_size = vision
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        tie_word_embeddings=tied,
    )
    vision_config = dict(
        hidden_size=v_hidden,
        intermediate_size=v_ffn,
        num_hidden_layers=v_layers,
        num_attention_heads=v_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    return dict(text=text, vision=vision_config, batch=batch, text_len=text_len)


SIZES = {
    "tiny": size_spec(
        vocab=128, hidden=32, ffn=64, layers=4, heads=4, kv_heads=2, positions=256, tied=True,
        vision=(24, 48, 2, 2, 32, 8), batch=2, text_len=6,
    ),
    "1b": size_spec(
        vocab=32000, hidden=2048, ffn=5504, layers=16, heads=16, kv_heads=4, positions=2048, tied=False,
        vision=(384, 1536, 12, 6, 224, 14), batch=4, text_len=64,
    ),
}  # fmt: skip
LORA = dict(
    r=16,
    lora_alpha=32,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
STAGE_RULES = {
    1: [r"^projector\."],
    2: [r"^projector\.", r"\.lora_(A|B)\."],
    3: [r"\.mlp\.router\.", r"\.mlp\.vision_ffns\."],
}
NEW_TOKENS = 4
CHANGED_MIN = 0.99


class Report:
    """Prints one JSON line per check and remembers whether any failed."""

    def __init__(self, device: torch.device, dtype: str) -> None:
        self.device, self.dtype, self.failed = str(device), dtype, False

    def __call__(self, check: str, size: str, stage: int | None, ok: bool, **fields) -> None:
        self.failed |= not ok
        line = {"check": check, "size": size, "stage": stage, "ok": bool(ok), **fields}
        print(json.dumps({**line, "device": self.device, "dtype": self.dtype}), flush=True)


def eve_config(size: str) -> EveConfig:
    spec = SIZES[size]
    text = LlamaConfig(**spec["text"], **TOKEN_IDS)
    return EveConfig(
        text_config=text,
        vision_config=Dinov2Config(**spec["vision"]),
        projector_type="mlp2x_gelu",
        image_token_id=text.vocab_size,  # outside the LM vocabulary, as with a tokenizer that gained <image>
    )


def build(size: str, device: torch.device, seed: int):
    """The bf16 Eve model and the base LM (same LM weights, bf16, frozen), both built on `device`."""
    config = eve_config(size)
    torch.manual_seed(seed)
    with device:
        model = EveForConditionalGeneration(config).to(torch.bfloat16)
        base = AutoModelForCausalLM.from_config(config.text_config).to(torch.bfloat16)
    base.load_state_dict(model.language_model.state_dict())
    return model, base.eval().requires_grad_(False)


def synthetic_batch(config: EveConfig, size: str, device: torch.device, seed: int):
    """(B, 1 + Ni + L) ids: BOS, one image block, random text; (B, 3, H, W) bf16 pixels."""
    spec, g = SIZES[size], torch.Generator().manual_seed(seed)
    batch, n, vocab = spec["batch"], config.num_image_tokens, config.text_config.vocab_size
    ids = torch.cat(
        [
            torch.full((batch, 1), TOKEN_IDS["bos_token_id"]),
            torch.full((batch, n), config.image_token_id),
            torch.randint(3, vocab, (batch, spec["text_len"]), generator=g),
        ],
        dim=1,
    )
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=g)
    return ids.to(device), pixels.to(device, torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_stage(model, stage: int, ids, pixels, args, size: str, report: Report) -> None:
    """Adds the stage's structure, chooses and casts its trainables, runs `args.steps` AdamW steps, checks."""
    # The previous stage's fp32 trainables to bf16, as the next stage's `from_pretrained(dtype=)` loads them.
    model.to(torch.bfloat16)
    if stage == 2:
        model.add_lora(**LORA)
    if stage == 3:
        model.add_elastic_vision_ffns("alternate", allocation="img_gbpr")
    rules = [TrainableRule(pattern) for pattern in STAGE_RULES[stage]]
    apply_trainable_rules(model, rules, log=lambda *_: None)
    trainable_to_fp32(model)
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    wanted = {True: torch.float32, False: torch.bfloat16}
    dtypes_ok = all(p.dtype == wanted[p.requires_grad] for p in model.parameters())
    report("dtypes", size, stage, dtypes_ok, value=numel)

    router_dtypes: list[torch.dtype] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: router_dtypes.append(out.dtype))
        for name, module in model.named_modules()
        if name.endswith(".mlp.router")
    ]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    losses, seconds = [], []
    for _ in range(args.steps):
        sync(ids.device)
        start = time.perf_counter()
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(ids.device)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    for hook in hooks:
        hook.remove()
    del optimizer

    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before, strict=True)) / numel
    finite = all(math.isfinite(x) for x in losses)
    report("loss_falls", size, stage, finite and losses[-1] < losses[0], value=[losses[0], losses[-1]])
    report("weights_changed", size, stage, changed > CHANGED_MIN, value=round(changed, 6))
    timed = seconds[1:] or seconds
    report("step_time", size, stage, finite, ms=round(1000 * statistics.median(timed), 2), steps=len(timed))
    if stage == 3:
        seen = sorted({str(dtype) for dtype in router_dtypes})
        ok = seen == [str(torch.float32)]
        report("router_fp32", size, stage, ok, value={"calls": len(router_dtypes), "dtypes": seen})


def timed_generate(model, device: torch.device, **inputs) -> tuple[torch.Tensor, float]:
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    sync(device)
    return out, round(1000 * (time.perf_counter() - start), 2)


def check_text_path(model, base, ids, pixels, size: str, report: Report) -> None:
    """After stage 3: text-only logits and generation against the base LM; an image request generates."""
    model.eval()
    device = ids.device
    image_start = 1 + model.config.num_image_tokens
    text = torch.cat([ids[:, :1], ids[:, image_start:]], dim=1)  # BOS + the text, no image
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        ours, theirs = model(input_ids=text).logits, base(input_ids=text).logits
    diff = (ours.float() - theirs.float()).abs().max().item()
    report("text_logits_equal_base", size, 3, torch.equal(ours, theirs), value=diff)

    out, ms = timed_generate(model, device, input_ids=ids[:1], pixel_values=pixels[:1])
    new = out[0, ids.shape[1] :]
    vocab = model.config.text_config.vocab_size
    ok = 0 < new.numel() <= NEW_TOKENS and bool((new < vocab).all())
    report("generate_image", size, 3, ok, ms=ms, value=new.tolist())
    out, ms = timed_generate(model, device, input_ids=text[:1])
    expected, _ = timed_generate(base, device, input_ids=text[:1])
    new = out[0, text.shape[1] :].tolist()
    report("generate_text", size, 3, torch.equal(out, expected), ms=ms, value=new)


def run_size(size: str, device: torch.device, args, report: Report) -> None:
    model, base = build(size, device, args.seed)
    ids, pixels = synthetic_batch(model.config, size, device, args.seed)
    for stage in (1, 2, 3):
        train_stage(model, stage, ids, pixels, args, size, report)
    check_text_path(model, base, ids, pixels, size, report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated, of: " + ",".join(SIZES))
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per stage (at least 2)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes = (args.sizes or ("tiny" if device.type == "cpu" else "tiny,1b")).split(",")
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown or args.steps < 2:
        parser.error(f"unknown size(s) {unknown}" if unknown else "--steps must be at least 2")
    report = Report(device, "bfloat16")
    for size in sizes:
        try:
            run_size(size, device, args, report)
        except Exception as err:  # noqa: BLE001 - reported as a failed check; the next size still runs
            traceback.print_exc()
            report("error", size, None, False, value=f"{type(err).__name__}: {err}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
