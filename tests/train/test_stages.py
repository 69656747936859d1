"""Stages 1 -> 2 -> 3 end to end, in-process, on tiny parts saved to disk and a synthetic colour task."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_text_config, tiny_tokenizer, tiny_vision_config
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from eve_vlm.errors import ConfigError, DataError
from eve_vlm.model import EveForConditionalGeneration, EveProcessor
from eve_vlm.train.recipe import load_recipe
from eve_vlm.train.stages import build_dataset, build_model, collator, run_stage

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "yellow": (230, 230, 20)}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny LM + tokenizer folder, a tiny DINOv2 folder, and LLaVA JSON files over coloured images."""
    root = tmp_path_factory.mktemp("parts")
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


def frozen_state(model):
    """Everything stage 3 must leave untouched: attention, norms, embeddings, language FFNs, LoRA, projector."""
    return {
        k: v.clone() for k, v in model.state_dict().items() if "vision_ffns" not in k and "router" not in k
    }


def test_init_from_a_base_llm_folder_is_refused_before_building_a_model(parts, tmp_path):
    shutil.copytree(parts / "lm", tmp_path / "stage1")  # the natural mistake: the LLM folder as init_from
    with pytest.raises(ConfigError, match=r"model\.init_from: .* holds a llama model, not an Eve model"):
        build_model(recipe(parts, tmp_path, 2))


def test_bad_rows_are_counted_before_the_first_step_and_too_many_refuse_the_stage(parts, tmp_path):
    rows = json.loads((parts / "captions.json").read_text())[:8]
    for k in (2, 5):
        rows[k] = {**rows[k], "image": f"missing-{k}.png"}
    bad_file = tmp_path / "captions.json"
    bad_file.write_text(json.dumps(rows))
    spec = recipe(parts, tmp_path, 1)
    spec.data.sources[0].path = str(bad_file)
    spec.data.on_bad_row = "skip"
    model, processor = build_model(spec)
    with pytest.raises(DataError, match=r"2 of 8 rows \(25\.00%\) are bad.*not found.*max_bad_share"):
        build_dataset(spec, processor, model.config, log=lambda line: None)
    spec.data.max_bad_share = 0.5
    lines = []
    dataset = build_dataset(spec, processor, model.config, log=lines.append)
    assert len(dataset) == 6
    assert any(
        "skipped 2 bad row(s), 25.00% of the rows" in line and "missing-2.png" in line for line in lines
    )


def test_the_data_is_encoded_once_and_read_from_the_cache_after(parts, tmp_path):
    spec = recipe(parts, tmp_path, 2)
    model, processor = build_model(recipe(parts, tmp_path, 1))
    cold, warm = [], []
    first = build_dataset(spec, processor, model.config, log=cold.append)
    second = build_dataset(spec, processor, model.config, log=warm.append)
    assert any(line.startswith("data cache: encoding 56 rows") for line in cold)
    assert not any("encoding" in line for line in warm) and any(
        "data cache: reading" in line for line in warm
    )
    summary = next(line for line in warm if line.startswith("data: "))
    assert (
        "56 rows (48 with an image, 8 text-only), 0 skipped" in summary
        and str(tmp_path / "data-cache") in summary
    )
    assert len(first) == len(second) == 56 and first.lengths == second.lengths
    assert sum(first.lengths) > 48 * model.config.num_image_tokens
    batch = collator(processor, model.config)([second[0], second[1]])
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * model.config.num_image_tokens


def corrupt_caption_recipe(parts, tmp_path, on_bad_row):
    rows = json.loads((parts / "captions.json").read_text())[:8]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    rows[3] = {**rows[3], "image": str(tmp_path / "broken.png")}
    (tmp_path / "captions.json").write_text(json.dumps(rows))
    spec = recipe(parts, tmp_path, 1, max_steps=2, per_device_train_batch_size=8, logging_steps=1)
    spec.data.sources[0].path = str(tmp_path / "captions.json")
    spec.data.on_bad_row = on_bad_row
    spec.data.check_images = "exists"
    return spec


def test_a_corrupt_image_met_in_training_is_skipped_and_counted(parts, tmp_path):
    lines, logged = [], []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    summary = run_stage(corrupt_caption_recipe(parts, tmp_path, "skip"), log=lines.append, callbacks=[Logs()])
    assert summary["steps"] == 2 and summary["skipped_rows"] == 0
    assert summary["bad_images_in_training"] == 2  # met once per step: every step sees all 8 rows
    assert [entry["data/bad_images"] for entry in logged if "loss" in entry] == [1, 2]  # the total so far
    assert any("whose image failed to load" in line for line in lines)


def test_a_corrupt_image_met_in_training_stops_naming_file_and_row_under_raise(parts, tmp_path):
    with pytest.raises(
        DataError, match=r"captions\.json, line 4, row id 'c3': image .*broken\.png cannot be loaded"
    ):
        run_stage(corrupt_caption_recipe(parts, tmp_path, "raise"), log=lambda line: None)


def test_three_stages(parts, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(parts / "lm").eval()
    text = torch.randint(3, 30, (2, 9))

    s1 = run_stage(recipe(parts, tmp_path, 1))
    assert s1["trainable"] == {r"^projector\.": [24, 5840]}
    assert all(n.startswith("projector.") for n in s1["trainable_names"])
    losses = [loss for _, loss in s1["loss_history"]]
    assert losses[-1] < losses[0]
    m1 = EveForConditionalGeneration.from_pretrained(tmp_path / "stage1")
    assert sum(p.numel() for p in m1.projector.parameters()) > 0

    s2 = run_stage(recipe(parts, tmp_path, 2))
    assert s2["trainable"] == {r"^projector\.": [24, 5840], r"\.lora_(A|B)\.": [16, 1792]}
    lora = [n for n in s2["trainable_names"] if "lora" in n]
    assert lora == [
        f"language_model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.default.weight"
        for i in range(4)
        for m in "qv"
        for ab in "AB"
    ]
    losses = [loss for _, loss in s2["loss_history"]]
    assert losses[-1] < losses[0]
    m2 = EveForConditionalGeneration.from_pretrained(tmp_path / "stage2").eval()
    assert m2.config.lora["r"] == 4
    with torch.no_grad():
        assert torch.equal(m2(input_ids=text).logits, base(input_ids=text).logits)

    s3 = run_stage(recipe(parts, tmp_path, 3, learning_rate=1e-3))
    assert s3["trainable"] == {r"\.mlp\.router\.": [2, 128], r"\.mlp\.vision_ffns\.": [6, 12288]}
    assert s3["trainable_names"] == [
        f"language_model.model.layers.{i}.mlp.{n}"
        for i in (0, 2)
        for n in (
            "router.weight",
            "vision_ffns.0.down_proj.weight",
            "vision_ffns.0.gate_proj.weight",
            "vision_ffns.0.up_proj.weight",
        )
    ]
    assert s3["steps"] == 12
    m3 = EveForConditionalGeneration.from_pretrained(tmp_path / "stage3").eval()
    assert sorted(m3.evf_layers) == [0, 2]
    before, after = frozen_state(m2), frozen_state(m3)
    renamed = {
        k.replace(".mlp.", ".mlp.language_ffn.") if any(f".layers.{i}.mlp." in k for i in (0, 2)) else k: v
        for k, v in before.items()
    }
    assert renamed.keys() == after.keys()
    for key in after:
        assert torch.equal(after[key], renamed[key]), key
    with torch.no_grad():
        assert torch.equal(m3(input_ids=text).logits, base(input_ids=text).logits)
    moved = [
        n
        for n, p in m3.named_parameters()
        if "vision_ffns" in n
        and not torch.equal(p, dict(m3.named_parameters())[n.replace("vision_ffns.0", "language_ffn")])
    ]
    assert moved  # the vision FFNs trained away from their copies


class RouterGroups(TrainerCallback):
    """Records the optimizer's (lr, parameter count) per group at the first step."""

    def __init__(self):
        self.groups = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.groups is None:
            self.groups = [
                (g["initial_lr"], sum(p.numel() for p in g["params"])) for g in optimizer.param_groups
            ]


def router_probs_on_data(model, parts, processor_dir):
    """Per EVF layer: share of image / text tokens whose top-1 is the vision FFN, on the first training rows."""
    from eve_vlm.train.router_warm_start import capture_evf_inputs

    processor = EveProcessor.from_pretrained(processor_dir)
    rows = [json.loads(line) for line in (parts / "vqa.jsonl").read_text().splitlines()][:8]
    batch = processor(
        [processor.chat_prompt(r["conversations"][0]["value"]) for r in rows],
        images=[Image.open(parts / "images" / r["image"]).convert("RGB") for r in rows],
        padding=True,
    )
    out = {}
    for i, (hidden, mask) in capture_evf_inputs(model, [dict(batch)]).items():
        vision = (hidden @ model.evf_layers[i].router.weight.detach().t()).argmax(dim=-1) > 0
        out[i] = (float(vision[mask].float().mean()), float(vision[~mask].float().mean()))
    return out


def test_stage3_router_warm_start_and_router_lr(parts, tmp_path):
    """`evf.router_init: modality` fits the routers on the image mask before training; `evf.router_lr` puts the
    routers in their own optimizer group; the plain recipe does neither."""
    run_stage(recipe(parts, tmp_path, 1, max_steps=3))
    run_stage(recipe(parts, tmp_path, 2, max_steps=3))
    plain = recipe(parts, tmp_path, 3)
    assert (plain.evf.router_init, plain.evf.router_lr, plain.evf.modality_loss_coef) == ("random", None, 0.0)

    logs, groups = [], RouterGroups()
    options = {"router_init": "modality", "router_lr": 0.05, "modality_loss_coef": 0.1}
    warm = recipe(parts, tmp_path, 3, evf=options, max_steps=2, learning_rate=1e-3)
    run_stage(warm, log=logs.append, callbacks=[groups])
    assert any(line.startswith("router warm start:") for line in logs)
    assert (0.05, 2 * 64) in groups.groups  # 2 routers of (E=2) x (D=32)
    assert all(lr == 1e-3 for lr, n in groups.groups if n != 2 * 64)
    m3 = EveForConditionalGeneration.from_pretrained(tmp_path / "stage3").eval()
    assert m3.config.evf["modality_loss_coef"] == 0.1
    for image_share, text_share in router_probs_on_data(m3, parts, tmp_path / "stage2").values():
        assert image_share >= 0.9 and text_share <= 0.1


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_kill_and_resume_matches_uninterrupted(parts, tmp_path):
    run_stage(recipe(parts, tmp_path, 1, max_steps=4))
    full = tmp_path / "full"
    run_stage(recipe(parts, tmp_path, 2, max_steps=6, save_steps=3, output_dir=str(full)))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_stage(
            recipe(parts, tmp_path, 2, max_steps=6, save_steps=3, output_dir=str(cut)),
            callbacks=[StopAfter(4)],
        )
    assert (cut / "checkpoint-3").is_dir() and not (cut / "config.json").exists()
    summary = run_stage(recipe(parts, tmp_path, 2, max_steps=6, save_steps=3, output_dir=str(cut)))
    assert summary["steps"] == 6
    a = EveForConditionalGeneration.from_pretrained(full).state_dict()
    b = EveForConditionalGeneration.from_pretrained(cut).state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_torchrun_ddp_two_processes(parts, tmp_path):
    """`torchrun --nproc_per_node 2 -m eve_vlm.cli train RECIPE` runs DDP on CPU (gloo) and saves once."""
    import os
    import subprocess
    import sys

    run_stage(recipe(parts, tmp_path, 1, max_steps=2))
    path = recipe(
        parts, tmp_path, 2, max_steps=3, per_device_train_batch_size=4, output_dir=str(tmp_path / "ddp")
    )
    del path
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "eve_vlm.cli",
        "train",
        str(tmp_path / "stage2.yaml"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "'world_size': 2" in proc.stdout or "world size 2" in proc.stdout
    summary = json.loads((tmp_path / "ddp" / "eve_training.json").read_text())
    assert summary["steps"] == 3
    EveForConditionalGeneration.from_pretrained(tmp_path / "ddp")


RANK_SCRIPT = """
import json, os, sys
from transformers import TrainerCallback
from eve_vlm.train.recipe import load_recipe
from eve_vlm.train.stages import run_stage


class RecordBatches(TrainerCallback):
    def __init__(self):
        self.batches = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batches = [list(map(int, b)) for b in train_dataloader.batch_sampler]


lines, record = [], RecordBatches()
run_stage(load_recipe(sys.argv[1], sys.argv[3:]), log=lines.append, callbacks=[record])
with open(f"{sys.argv[2]}-rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"log": lines, "batches": record.batches}, f)
"""


@pytest.mark.slow
def test_torchrun_two_processes_encode_once_and_a_resumed_run_reads_the_cache(parts, tmp_path):
    """Under `torchrun --nproc_per_node 2` (gloo, CPU) only the main process encodes, the other reads the
    cache; both see the same number of batches, of different rows; the resumed run encodes nothing."""
    import os
    import subprocess
    import sys

    run_stage(recipe(parts, tmp_path, 1, max_steps=2), log=lambda line: None)
    recipe(parts, tmp_path, 2, max_steps=2, save_steps=2, per_device_train_batch_size=4)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def torchrun(tag, *overrides):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
        ]
        cmd += [str(script), str(tmp_path / "stage2.yaml"), str(tmp_path / tag), *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads((tmp_path / f"{tag}-rank{r}.json").read_text()) for r in (0, 1)]

    def cache_lines(ranks, word):
        return [any(line.startswith(f"data cache: {word}") for line in rank["log"]) for rank in ranks]

    first = torchrun("first")
    assert cache_lines(first, "encoding") == [True, False]
    assert cache_lines(first, "reading") == [False, True]
    batches = [rank["batches"] for rank in first]
    assert len(batches[0]) == len(batches[1]) > 0
    assert batches[0] != batches[1] and set(sum(batches[0], [])) != set(sum(batches[1], []))
    assert len(list((tmp_path / "data-cache").iterdir())) == 2  # stage 1's captions, stage 2's conversations

    resumed = torchrun("resumed", "training.max_steps=3")
    assert cache_lines(resumed, "encoding") == [False, False]
    assert cache_lines(resumed, "reading") == [True, True]
    assert any(line.startswith("resuming from") and "checkpoint-2" in line for line in resumed[0]["log"])
    assert json.loads((tmp_path / "stage2" / "eve_training.json").read_text())["steps"] == 3


def test_a_tokenizer_without_pad_token_trains_chats_and_evaluates(parts, tmp_path, capsys):
    """An LLM folder whose tokenizer declares no pad token (as Llama-3.x and Mistral ship): stage 1 and the
    chat stage 2 (padded batches) train, the saved processor pads with the end-of-sequence token, and
    `eve chat` and `eve eval vqa` work on the result."""
    from eve_vlm.cli import main

    lm = tmp_path / "lm-no-pad"
    shutil.copytree(parts / "lm", lm)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(lm)
    assert AutoTokenizer.from_pretrained(lm).pad_token is None
    (tmp_path / "parts").mkdir()
    for name in ("captions.json", "vqa.jsonl", "images", "tower"):
        (tmp_path / "parts" / name).symlink_to(parts / name)
    (tmp_path / "parts" / "lm").symlink_to(lm)

    run_stage(recipe(tmp_path / "parts", tmp_path, 1, max_steps=3))
    s2 = run_stage(recipe(tmp_path / "parts", tmp_path, 2, max_steps=3))
    assert all(np.isfinite(loss) for _, loss in s2["loss_history"])
    processor = EveProcessor.from_pretrained(tmp_path / "stage2")
    assert processor.tokenizer.pad_token == "<pad>"  # its vocabulary's own padding token (`ensure_pad_token`)

    image = str(parts / "images" / "0.png")
    model = str(tmp_path / "stage2")
    assert main(["chat", model, "what is the colour", "--image", image, "--max-new-tokens", "3"]) == 0
    assert main(["chat", model, "is there a circle", "--max-new-tokens", "3"]) == 0
    out = tmp_path / "vqa-eval"
    args = ["eval", "vqa", "--model", str(tmp_path / "stage2"), "--data", str(parts / "vqa.jsonl")]
    args += [
        "--images",
        str(parts / "images"),
        "--out",
        str(out),
        "--limit",
        "12",
        "--quiet",
        "--batch-size",
        "5",
    ]
    assert main(args) == 0
    assert json.loads((out / "vqa_metrics.json").read_text())["questions"] == 12
    assert len((out / "vqa_predictions.jsonl").read_text().splitlines()) == 12


def test_stage3_on_a_family_without_mlp_is_refused_before_loading_the_model(parts, tmp_path, monkeypatch):
    """OPT's decoder layers have no `mlp`: the stage-3 recipe is refused from the saved config alone."""
    from transformers import OPTConfig

    from eve_vlm.model import EveConfig

    opt = OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2)
    config = EveConfig(text_config=opt, vision_config=tiny_vision_config("dinov2"), image_token_id=64)
    EveForConditionalGeneration(config).save_pretrained(tmp_path / "stage2")

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(EveForConditionalGeneration, "from_pretrained", no_load)
    with pytest.raises(ConfigError, match=r"evf: .*stage2 cannot take .*OPTDecoderLayer\) has no `mlp`"):
        build_model(recipe(parts, tmp_path, 3))


class TrainableWatch(TrainerCallback):
    """The trainable weights when training starts and ends, and the optimizer's state when it ends."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.frozen_dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
        self.state_dtypes = {
            value.dtype
            for per_param in optimizer.state.values()
            for key, value in per_param.items()
            if key != "step" and torch.is_tensor(value)
        }

    def changed_share(self) -> float:
        changed = sum(int((self.after[n] != w).sum()) for n, w in self.before.items())
        return changed / sum(w.numel() for w in self.before.values())


def test_a_bfloat16_model_trains_fp32_copies_of_its_trainable_weights(parts, tmp_path):
    """Stages 2 (LoRA) and 3 on a model loaded in bf16 (`model.dtype: bfloat16`, bf16 autocast): at lr 2e-5 an
    Adam step is far below a bf16 weight's spacing, so only fp32 trainable weights (and fp32 optimizer state)
    move; the frozen weights stay bf16. (The MLP projector: some of the LDP's squeeze-excite ReLU units get no
    gradient in this tiny model, so their weights rest at any precision.)"""
    run_stage(recipe(parts, tmp_path, 1, model={"projector_type": "mlp2x_gelu"}, max_steps=3))
    for stage in (2, 3):
        watch = TrainableWatch()
        bf16 = {"dtype": "bfloat16"}
        run_stage(
            recipe(parts, tmp_path, stage, model=bf16, max_steps=5, learning_rate=2e-5, bf16=True),
            callbacks=[watch],
        )
        assert {w.dtype for w in watch.after.values()} == {torch.float32}, stage
        assert watch.state_dtypes == {torch.float32}, stage
        assert watch.frozen_dtypes == {torch.bfloat16}, stage
        assert watch.changed_share() > 0.99, (stage, watch.changed_share())


FINAL_STATE_SCRIPT = """
import os, sys, torch
from transformers import TrainerCallback
from eve_vlm.train.recipe import load_recipe
from eve_vlm.train.stages import run_stage


class FinalState(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(weights, f"{sys.argv[2]}-rank{os.environ['RANK']}.pt")


run_stage(load_recipe(sys.argv[1]), callbacks=[FinalState()])
"""


def test_full_llm_stage2_with_text_only_rows_trains_under_torchrun_ddp(parts, tmp_path):
    """The authors' stage 2 (no LoRA, the full LLM trains) keeps the text-only rows, whose batches give the
    projector no gradient: DDP must be told (`find_unused_parameters`, decided from the model), or the step
    after such a batch fails. Two epochs under `torchrun --nproc_per_node 2` (gloo) finish and save weights that
    reload with `from_pretrained` equal to every rank's final state."""
    import os
    import subprocess
    import sys

    run_stage(recipe(parts, tmp_path, 1, max_steps=2), log=lambda line: None)
    full = recipe(parts, tmp_path, 2, max_steps=14, per_device_train_batch_size=4, learning_rate=1e-4)
    data = yaml.safe_load((tmp_path / "stage2.yaml").read_text())
    data.pop("lora")
    data["trainable"] = [{"pattern": r"^projector\."}, {"pattern": r"^language_model\."}]
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(data))
    del full
    script = tmp_path / "final_state.py"
    script.write_text(FINAL_STATE_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [str(script), str(tmp_path / "stage2.yaml"), str(tmp_path / "final")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dropped" not in proc.stdout and "8 text-only" in proc.stdout
    summary = json.loads((tmp_path / "stage2" / "eve_training.json").read_text())
    assert summary["steps"] == 14
    trained = EveForConditionalGeneration.from_pretrained(tmp_path / "stage2").state_dict()
    start = EveForConditionalGeneration.from_pretrained(tmp_path / "stage1").state_dict()
    key = "language_model.model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(trained[key], start[key])
    for rank in (0, 1):
        final = torch.load(tmp_path / f"final-rank{rank}.pt")
        assert final.keys() == trained.keys()
        assert all(torch.equal(final[k], trained[k]) for k in final), rank
    assert not (tmp_path / "stage2" / ".final").exists()
    assert not (tmp_path / "stage2" / "training_args.bin").exists()


def test_ddp_unused_parameters_are_decided_from_the_model():
    """DDP's `find_unused_parameters` follows what a step can leave without a gradient, not the stage."""
    from conftest import tiny_model

    from eve_vlm.train.stages import may_leave_trainable_unused

    def trainable(model, *parts):
        for name, p in model.named_parameters():
            p.requires_grad_(any(part in name for part in parts))
        return model

    model = tiny_model()
    assert not may_leave_trainable_unused(trainable(model, "language_model."), text_rows=True)
    model.add_lora(r=2, lora_alpha=4, target_modules=["q_proj"])
    lora = trainable(model, "projector.", "lora_")
    assert not may_leave_trainable_unused(lora, text_rows=False)  # stage 2 with LoRA: text rows dropped
    full = trainable(model, "projector.", "language_model.")
    assert may_leave_trainable_unused(full, text_rows=True)  # a text batch leaves the projector out
    assert not may_leave_trainable_unused(full, text_rows=False)
    assert may_leave_trainable_unused(trainable(model, "language_model."), text_rows=True)  # LoRA included
    model.add_elastic_vision_ffns("alternate")
    assert may_leave_trainable_unused(trainable(model, ".router.", ".vision_ffns."), text_rows=False)


@pytest.mark.parametrize(
    ("gpus", "world_size", "refused"),
    [(0, None, False), (1, None, False), (2, "2", False), (8, "1", False), (2, None, True), (8, None, True)],
)
def test_one_process_on_several_gpus_is_refused_naming_torchrun(gpus, world_size, refused):
    from eve_vlm.train.stages import check_one_process_per_gpu

    if not refused:
        check_one_process_per_gpu(gpus, world_size)
        return
    with pytest.raises(ConfigError, match=rf"nn.DataParallel .* torchrun --nproc_per_node {gpus} -m eve_vlm"):
        check_one_process_per_gpu(gpus, world_size)


def test_a_saved_model_runs_on_a_chosen_device_and_dtype(parts, tmp_path, capsys):
    """`eve chat` and `eve eval vqa` take `--device` and `--dtype`: a stage-3 model answers in bf16 on the CPU
    (its routers stay fp32); a device this machine lacks, or a bad name, exits 2 with a message."""
    from eve_vlm.cli import main
    from eve_vlm.serve.loading import load_model

    run_stage(recipe(parts, tmp_path, 1, max_steps=2), log=lambda line: None)
    run_stage(recipe(parts, tmp_path, 2, max_steps=2), log=lambda line: None)
    run_stage(recipe(parts, tmp_path, 3, max_steps=2), log=lambda line: None)
    model_dir, image = str(tmp_path / "stage3"), str(parts / "images" / "0.png")
    model, _ = load_model(model_dir, "bfloat16", "cpu")
    assert model.device.type == "cpu" and model.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if ".router." in n} == {torch.float32}

    bf16_cpu = ["--device", "cpu", "--dtype", "bfloat16", "--max-new-tokens", "3"]
    assert main(["chat", model_dir, "what is the colour", "--image", image, *bf16_cpu]) == 0
    assert main(["chat", model_dir, "is there a circle", *bf16_cpu]) == 0
    out = tmp_path / "vqa-eval"
    args = ["eval", "vqa", "--model", model_dir, "--data", str(parts / "vqa.jsonl"), "--out", str(out)]
    args += ["--images", str(parts / "images"), "--limit", "6", "--quiet", "--device", "cpu"]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "vqa_metrics.json").read_text())["questions"] == 6

    capsys.readouterr()
    assert main(["chat", model_dir, "hello", "--device", "warp9"]) == 2
    assert "--device 'warp9' is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "torch sees no CUDA GPU here; use --device cpu" in capsys.readouterr().err

    quantized, _ = load_model(model_dir, None, "cpu", "int8")
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules())
    int8 = ["--quantize", "int8", "--max-new-tokens", "3"]
    assert main(["chat", model_dir, "what is the colour", "--image", image, "--device", "cpu", *int8]) == 0
    assert main([*args, "--quantize", "int8"]) == 0
    assert main([*args, "--quantize", "int8", "--dtype", "bfloat16"]) == 2
    assert "leave --dtype at float32" in capsys.readouterr().err


def test_the_recipe_chooses_the_attention_implementation(parts, tmp_path):
    model, _ = build_model(recipe(parts, tmp_path, 1, model={"attn_implementation": "eager"}))
    assert model.language_model.config._attn_implementation == "eager"
    assert model.vision_tower.tower.config._attn_implementation == "eager"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="model.attn_implementation='flash_attention_2': "):
            build_model(recipe(parts, tmp_path, 1, model={"attn_implementation": "flash_attention_2"}))
