"""Stages 1 -> 2 -> 3 end to end, in-process, on tiny parts saved to disk and a synthetic colour task."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer, tiny_vision_config
from PIL import Image
from stage_parts import COLOURS, build_parts, recipe
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from eve_vlm.errors import ConfigError, DataError
from eve_vlm.model import EveForConditionalGeneration, EveProcessor
from eve_vlm.train.stages import build_dataset, build_model, collator, run_stage


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_parts(tmp_path_factory.mktemp("parts"))


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


def test_the_recipe_chooses_the_attention_implementation(parts, tmp_path):
    model, _ = build_model(recipe(parts, tmp_path, 1, model={"attn_implementation": "eager"}))
    assert model.language_model.config._attn_implementation == "eager"
    assert model.vision_tower.tower.config._attn_implementation == "eager"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="model.attn_implementation='flash_attention_2': "):
            build_model(recipe(parts, tmp_path, 1, model={"attn_implementation": "flash_attention_2"}))


def test_a_stage_starts_from_its_recipe_seed_whatever_torchs_seed_before(parts, tmp_path):
    """LoRA (stage 2) and the EVF routers (stage 3) are initialised after the recipe's seed is set, so every
    process of a distributed run, and every rerun, builds the same model whatever torch's RNG held before."""
    run_stage(recipe(parts, tmp_path, 1, max_steps=2), log=lambda line: None)
    saved = {}
    for stage in (2, 3):
        for torch_seed in (11, 12):
            torch.manual_seed(torch_seed)
            out = tmp_path / f"stage{stage}-seed{torch_seed}"
            spec = recipe(parts, tmp_path, stage, max_steps=1, learning_rate=0.0, output_dir=str(out))
            run_stage(spec, log=lambda line: None)
            saved[stage, torch_seed] = EveForConditionalGeneration.from_pretrained(out).state_dict()
        if stage == 2:
            shutil.copytree(tmp_path / "stage2-seed11", tmp_path / "stage2")
    for stage, pattern in ((2, "lora_A"), (3, "router")):
        a, b = saved[stage, 11], saved[stage, 12]
        keys = [k for k in a if pattern in k]
        assert keys and all(torch.equal(a[k], b[k]) for k in keys), stage


def test_stage1_with_the_caption_word_loss_puts_each_images_colour_word_into_its_tokens(parts, tmp_path):
    spec = recipe(
        parts,
        tmp_path,
        1,
        model={"vocabulary_mixture": True},
        vocabulary_loss_coef=1.0,
        max_steps=30,
        learning_rate=1e-2,
    )
    spec.trainable.append(type(spec.trainable[0])(pattern=r"^vocabulary_mixture\."))
    summary = run_stage(spec)
    assert set(summary["trainable"]) == {r"^projector\.", r"^vocabulary_mixture\."}
    model = EveForConditionalGeneration.from_pretrained(tmp_path / "stage1").eval()
    assert model.config.vocabulary_mixture is True
    processor = EveProcessor.from_pretrained(tmp_path / "stage1")
    colours = list(COLOURS)
    words = [processor.tokenizer.convert_tokens_to_ids(name) for name in colours]
    images = [Image.open(parts / "images" / f"{i}.png") for i in range(8)]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        queries = model.projector(model.vision_tower(pixel_values))
        _, weights = model.vocabulary_mixture(queries, model.input_embedding_table())  # (8, N, V)
    best = weights[:, :, words].amax(dim=1)  # (8, 4): each colour word's best weight over an image's tokens
    assert best.argmax(dim=1).tolist() == [i % 4 for i in range(8)]
    assert float(best.max(dim=1).values.min()) > 0.5

    run_stage(recipe(parts, tmp_path, 2, max_steps=2))  # stage 2 sets no word loss: it is off there
    stage2 = EveForConditionalGeneration.from_pretrained(tmp_path / "stage2")
    assert stage2.config.vocabulary_mixture is True
    assert stage2.config.vocabulary_loss_coef == 0.0
    assert torch.equal(stage2.vocabulary_mixture.logit_scale, model.vocabulary_mixture.logit_scale)


def test_the_caption_word_loss_on_a_model_without_the_mixture_is_refused_before_training(parts, tmp_path):
    with pytest.raises(
        ConfigError, match=r"training\.vocabulary_loss_coef=1\.0: .*model\.vocabulary_mixture"
    ):
        recipe(parts, tmp_path, 1, vocabulary_loss_coef=1.0)
    with pytest.raises(ConfigError, match=r"training\.vocabulary_loss_coef=-1\.0: use a weight >= 0"):
        recipe(parts, tmp_path, 1, model={"vocabulary_mixture": True}, vocabulary_loss_coef=-1.0)
    run_stage(recipe(parts, tmp_path, 1, max_steps=1))
    with pytest.raises(
        ConfigError, match=r"training\.vocabulary_loss_coef=1\.0: .*model\.vocabulary_mixture"
    ):
        build_model(recipe(parts, tmp_path, 2, vocabulary_loss_coef=1.0))


def test_a_structure_field_that_differs_from_the_init_from_model_is_refused_and_an_equal_one_accepted(
    parts, tmp_path
):
    run_stage(recipe(parts, tmp_path, 1, max_steps=1))
    for field, value in (("vocabulary_mixture", True), ("projector_type", "ldpv2"), ("image_size", 64)):
        with pytest.raises(ConfigError, match=rf"model\.{field}={value!r}, but .*stage1 was built with"):
            build_model(recipe(parts, tmp_path, 2, model={field: value}))
    model, _ = build_model(recipe(parts, tmp_path, 2, model={"projector_type": "ldp"}))  # as built: accepted
    assert model.config.projector_type == "ldp"
