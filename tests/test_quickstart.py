"""A smoke of the real-weights pipeline: `eve quickstart --smoke` (a few steps per stage, tiny evaluations)
on SmolLM2 + DINOv2-S + easy-VQA. Needs `eve prepare` (CI runs it); skips with the reason otherwise."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eve_vlm.assets import require_assets
from eve_vlm.errors import AssetError
from eve_vlm.eval.vqa import standard_error
from eve_vlm.model import EveForConditionalGeneration, EveProcessor
from eve_vlm.quickstart import RECORD, load_record, run_quickstart, save_record
from eve_vlm.serve.chat import answer, build_prompt, load_image
from eve_vlm.train.stages import DONE_MARKER


@pytest.fixture(scope="module")
def assets():
    try:
        return require_assets()
    except AssetError as err:
        pytest.skip(f"real assets not prepared ({err}); CI runs `eve prepare` first")


def test_a_passed_tests_folder_is_removed_at_once(pytestconfig):
    # the smoke below writes about 7 GB of models into its folder (10 models); kept for every passed test and
    # for the last three runs, the folders once filled a CI disk mid-run
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert int(pytestconfig.getini("tmp_path_retention_count")) <= 1


def test_quickstart_smoke(assets, tmp_path):
    run_quickstart(str(tmp_path / "qs"), smoke=True)
    said = []  # a second run with the baseline and the ablation reuses stages 1-3 and the control
    report = run_quickstart(
        str(tmp_path / "qs"), smoke=True, with_baseline=True, ablation=True, log=said.append
    )
    for name in ("stage1", "stage2", "control", "stage3"):
        assert any(line.startswith(f"== {name}: reusing") for line in said), name
    assert "== baseline: training ==" in said and "== stage1: training ==" not in said
    for policy in ("rts", "bpr", "gbpr", "img_gbpr", "modality"):
        assert f"== ablation-{policy}: training ==" in said
    text = report.read_text()
    assert "Reused from an earlier run in this folder" in text
    for name in ("stage1", "stage2", "control", "stage3", "baseline"):
        assert f"`{name}`" in text
    saved = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    metrics = saved["models"]
    for name in ("stage1", "stage2", "stage3"):  # the elastic guarantee on real weights
        language = metrics[name]["language"]
        assert language["text"]["delta_perplexity"] == 0.0
        assert language["mc"]["wordnet_mc"]["delta_acc"] == 0.0
    assert metrics["stage1"]["vqa"] is None  # trained on captions: no VQA evaluation
    assert not metrics["control"]["language"]  # stage 2's text path: not measured again
    assert metrics["baseline"]["language"]["text"]["delta_perplexity"] != 0.0
    assert metrics["stage3"]["routing"]
    record = json.loads((tmp_path / "qs" / "stage3" / RECORD).read_text())
    scores = [p["accuracy"] for p in record["metrics"]["vqa"]["predictions"]]
    assert metrics["stage3"]["vqa"]["accuracy_stderr"] == pytest.approx(standard_error(scores))
    pairs = {(p["model"], p["against"]): p for p in saved["comparisons"]}
    assert {("stage3", "stage2"), ("stage3", "control"), ("control", "stage2")} <= set(pairs)
    s3, s2 = metrics["stage3"]["vqa"], metrics["stage2"]["vqa"]
    assert pairs[("stage3", "stage2")]["questions"] == s3["questions"] == s2["questions"] == 16
    assert abs(pairs[("stage3", "stage2")]["difference"] - (s3["accuracy"] - s2["accuracy"])) < 1e-9
    assert "## Paired differences in VQA accuracy" in text
    trains = text[text.index("## What each model trains") : text.index("## Paired differences")]
    assert [line.split(" | ")[0] for line in trains.splitlines() if line.startswith("| ") and "x" in line][
        1:
    ] == [
        "| stage1",
        "| stage2",
        "| control",
        "| stage3",
        "| baseline",
    ]
    assert [r["policy"] for r in saved["ablation"]] == ["rts", "bpr", "gbpr", "img_gbpr", "modality"]
    assert "## Allocation policies, each trained" in text and (tmp_path / "qs" / "ablation.png").is_file()
    control = json.loads((tmp_path / "qs" / "control" / DONE_MARKER).read_text())
    stage3 = json.loads((tmp_path / "qs" / "stage3" / DONE_MARKER).read_text())
    assert control["steps"] == stage3["steps"] and control["recipe"]["model"]["init_from"].endswith("stage2")
    assert control["recipe"]["training"]["seed"] == stage3["recipe"]["training"]["seed"]
    stage2 = json.loads((tmp_path / "qs" / "stage2" / DONE_MARKER).read_text())
    sources = stage3["recipe"]["data"]["sources"]  # stage 3 and the control: the caption turns
    assert [Path(s["path"]).name for s in sources] == ["captions.json"]
    assert control["recipe"]["data"]["sources"] == sources != stage2["recipe"]["data"]["sources"]
    assert control["recipe"]["lora"] == stage2["recipe"]["lora"]
    rts = json.loads((tmp_path / "qs" / "ablation" / "rts" / DONE_MARKER).read_text())["recipe"]
    assert rts["evf"]["allocation"] == "rts" and rts["evf"]["capacity_factor"] == 1.5
    assert rts["training"]["max_steps"] == 1  # a quarter of the smoke run's 3 steps, at least 1
    assert rts["data"]["sources"] == stage2["recipe"]["data"]["sources"]  # where capacity binds
    assert list(tmp_path.joinpath("qs").glob("*.png"))
    assert "## Wall time" in text
    # `eve chat` on the result: a text-only question gets the base SmolLM2's answer (under the same prompt);
    # an image question runs with the system prompt stage 2 was tuned with, saved with the model.
    stage3 = tmp_path / "qs" / "stage3"
    model = EveForConditionalGeneration.from_pretrained(stage3).eval()
    processor = EveProcessor.from_pretrained(stage3)
    assert processor.system_prompt == ""
    base = AutoModelForCausalLM.from_pretrained(assets["llm"]).eval()
    question = "What is the capital of France?"
    ids = processor.tokenizer(build_prompt(processor, question, False), return_tensors="pt").input_ids
    with torch.no_grad():
        expected = base.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    said = answer(model, processor, question, max_new_tokens=8)
    assert said == processor.decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip()
    image = load_image(str(next((assets["easy_vqa_test"].parent / "images" / "test").glob("*.png"))))
    assert isinstance(answer(model, processor, "What color is the shape?", image, max_new_tokens=3), str)


def test_a_stage_record_is_reused_only_for_the_same_recipe_and_a_finished_model(tmp_path):
    key = {"recipe": {"stage": 2, "training": {"max_steps": 5}}, "eval": {"vqa": 16}}
    save_record(tmp_path, {"key": key, "metrics": {"vqa": {"accuracy": 1.0}}, "plots": [], "timings": {}})
    assert load_record(tmp_path, key) is None  # no finished model beside it
    (tmp_path / DONE_MARKER).write_text("{}")
    assert load_record(tmp_path, key)["metrics"] == {"vqa": {"accuracy": 1.0}}
    other = {**key, "eval": {"vqa": 500}}
    assert load_record(tmp_path, other) is None
    (tmp_path / RECORD).write_text("{not json")
    assert load_record(tmp_path, key) is None


def test_wall_time_section_names_the_machine_versions_and_every_step():
    import transformers

    from eve_vlm.quickstart_report import timing_section

    text = timing_section({"stage1 train": 90.0, "total": 150.0}, smoke=True, reused=["stage1"])
    assert f"torch {torch.__version__} ({torch.get_num_threads()} threads)" in text
    assert f"transformers {transformers.__version__}" in text and "smoke run" in text
    assert "| stage1 train | 90 | 1.5 |" in text and "| total | 150 | 2.5 |" in text
    assert "with the times measured then: stage1." in text
    # The CPU and its bf16 units: bf16 autocast rounds otherwise on other units, so runs differ by machine.
    assert f"{torch.backends.cpu.get_cpu_capability()} kernels" in text
    assert "bf16" in text.split("Machine:")[1].split(";")[0]


def test_cpu_flags_read_the_first_processor_of_proc_cpuinfo(tmp_path):
    from eve_vlm.quickstart_report import bf16_units, cpu_flags, cpu_name

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx512f amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: fpu\n"
    )
    assert cpu_flags(cpuinfo) == ("Some CPU", {"fpu", "avx512f", "amx_bf16"})
    assert bf16_units(cpuinfo) == " (amx_bf16)" and cpu_name(cpuinfo) == "Some CPU"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2\n")
    assert bf16_units(cpuinfo) == " (no bf16 units)"
    assert cpu_name(cpuinfo)  # no model name: the platform's word, or "CPU model unknown"
    assert cpu_flags(tmp_path / "absent") == ("", set())


def test_seed_replaces_every_stages_training_seed_and_the_default_keeps_the_recipes(tmp_path):
    from eve_vlm.quickstart import plan_runs, recipes_dir
    from eve_vlm.train.recipe import load_recipe

    def seeds(runs):
        return {
            run.name: load_recipe(recipes_dir() / f"stage{run.stage}.yaml", list(run.overrides)).training.seed
            for run in runs
        }

    seeded = seeds(plan_runs(tmp_path, False, True, True, seed=7))
    assert len(seeded) == 10 and set(seeded.values()) == {7}  # stages, control, baseline, ablation
    default = seeds(plan_runs(tmp_path, False, True, True))
    own = {stage: load_recipe(recipes_dir() / f"stage{stage}.yaml").training.seed for stage in (1, 2, 3)}
    assert default["stage1"] == own[1] and default["stage2"] == default["baseline"] == own[2]
    assert default["stage3"] == default["control"] == default["ablation-rts"] == own[3]


def fake_vqa(hits: list[int]) -> dict:
    predictions = [{"id": f"q{k}", "accuracy": float(h)} for k, h in enumerate(hits)]
    return {"predictions": predictions, "accuracy": 100.0 * sum(hits) / len(hits), "questions": len(hits)}


def test_comparisons_are_paired_on_the_same_questions_and_marked_against_their_noise():
    from eve_vlm.quickstart_report import comparison_section, comparisons

    metrics = {
        "stage2": {"vqa": fake_vqa([0, 1] * 50)},
        "control": {"vqa": fake_vqa([0, 1] * 50)},
        "stage3": {"vqa": fake_vqa([1, 1] * 50)},  # right on every question stage 2 missed
        "stage1": {"vqa": None},
    }
    pairs = {(p["model"], p["against"]): p for p in comparisons(metrics)}
    assert set(pairs) == {("stage3", "stage2"), ("stage3", "control"), ("control", "stage2")}
    assert pairs[("stage3", "stage2")]["difference"] == 50.0
    assert pairs[("control", "stage2")] == {
        "model": "control",
        "against": "stage2",
        "questions": 100,
        "difference": 0.0,
        "stderr": 0.0,
    }
    text = comparison_section(list(pairs.values()))
    assert "| stage3 | stage2 | 100 | +50.00 | 5.03 | yes |" in text  # sd 0.5025 / sqrt(100), in points
    assert "| control | stage2 | 100 | +0.00 | 0.00 | no |" in text


def test_ablation_rows_follow_the_policy_order_and_plot(tmp_path):
    from eve_vlm.quickstart_report import ablation_rows, plot_ablation

    def run(policy, to_vision):
        layer = {
            "entropy": 0.3,
            "vision_routed_image": to_vision,
            "vision_routed_text": 0.1,
            "drop_rate_image": 0.0,
            "drop_rate_text": 0.2,
        }
        routing = {"policy": policy, "policies": {policy: {"0": layer, "2": {**layer, "entropy": 0.5}}}}
        return {"vqa": {**fake_vqa([1, 0, 1, 1]), "accuracy_stderr": 25.0}, "routing": routing}

    metrics = {
        "ablation-modality": run("modality", 1.0),
        "ablation-rts": run("rts", 0.5),
        "stage3": run("x", 0),
    }
    rows = ablation_rows(metrics, {"ablation-rts train": 120.0})
    assert [r["policy"] for r in rows] == ["rts", "modality"]  # stage 3 itself is not an ablation run
    assert rows[0]["entropy"] == 0.4 and rows[0]["image_to_vision"] == 0.5 and rows[0]["train_seconds"] == 120
    assert rows[1]["accuracy"] == 75.0 and rows[1]["accuracy_stderr"] == 25.0
    assert plot_ablation(rows, tmp_path / "a.png").stat().st_size > 1024


class FakeStages:
    """Stands in for `run_stage` and the evaluator: records what is trained and evaluated, writes the finished
    marker as `run_stage` does, and leaves a checkpoint (optionally failing after it, like a killed run)."""

    def __init__(self):
        self.trained, self.evaluated, self.found_checkpoints, self.fail = [], [], {}, None

    def run_stage(self, recipe, log=print):
        from dataclasses import asdict

        out = Path(recipe.training.output_dir)
        self.trained.append(out.name)
        self.found_checkpoints[out.name] = sorted(p.name for p in out.glob("checkpoint-*"))
        (out / "checkpoint-1").mkdir(parents=True, exist_ok=True)
        if self.fail == out.name:
            raise RuntimeError("killed")
        summary = {"recipe": asdict(recipe), "seconds": 1.0, "trainable": {"^projector\\.": [1, 10]}}
        (out / DONE_MARKER).write_text(json.dumps(summary))

    def evaluator(self, *args, **kwargs):
        def evaluate(run, model_dir, out):
            self.evaluated.append(run.name)
            hits = [1.0, 0.0, 1.0, 1.0]
            vqa = {"predictions": [{"id": k, "accuracy": h} for k, h in enumerate(hits)], "accuracy": 75.0}
            return ({"vqa": {**vqa, "questions": 4, "exact_match": 75.0}} if run.vqa else {}), []

        return evaluate


def test_reuse_follows_recipes_parents_and_interruptions(tmp_path, monkeypatch):
    """A second run reuses everything; new evaluation settings re-evaluate without training; a changed
    stage-2 recipe retrains stage 2 and everything built on it, never from the old checkpoints; an
    interrupted training resumes from its own checkpoint."""
    import shutil

    import eve_vlm.quickstart as qs
    import eve_vlm.train.stages as stages

    recipes = tmp_path / "recipes"
    shutil.copytree(qs.recipes_dir(), recipes)
    fake = FakeStages()
    monkeypatch.setattr(qs, "recipes_dir", lambda: recipes)
    monkeypatch.setattr(qs, "prepare", lambda log=print: {"paths": {}})
    monkeypatch.setattr(qs, "Evaluator", fake.evaluator)
    monkeypatch.setattr(stages, "run_stage", fake.run_stage)
    out = tmp_path / "qs"
    quiet = {"log": lambda *a: None}

    run_quickstart(str(out), **quiet)
    assert fake.trained == ["stage1", "stage2", "control", "stage3"]
    fake.trained, fake.evaluated = [], []
    run_quickstart(str(out), **quiet)
    assert fake.trained == [] and fake.evaluated == []
    run_quickstart(str(out), vqa_limit=100, **quiet)
    assert fake.trained == [] and fake.evaluated == ["stage1", "stage2", "control", "stage3"]

    fake.trained = []
    stage2 = recipes / "stage2.yaml"
    stage2.write_text(stage2.read_text().replace("learning_rate: 5.0e-4", "learning_rate: 4.0e-4"))
    run_quickstart(str(out), vqa_limit=100, **quiet)
    assert fake.trained == ["stage2", "control", "stage3"]  # stage 1 kept; the rest start over
    assert fake.found_checkpoints["stage2"] == [] and fake.found_checkpoints["stage3"] == []

    fake.trained, fake.fail = [], "control"
    stage2.write_text(stage2.read_text().replace("learning_rate: 4.0e-4", "learning_rate: 3.0e-4"))
    with pytest.raises(RuntimeError, match="killed"):
        run_quickstart(str(out), vqa_limit=100, **quiet)
    fake.trained, fake.fail = [], None
    run_quickstart(str(out), vqa_limit=100, **quiet)
    assert fake.trained == ["control", "stage3"]  # stage 2 finished before the kill
    assert fake.found_checkpoints["control"] == ["checkpoint-1"]  # resumed, not wiped
    assert not (out / "control" / qs.PENDING).exists()


def test_the_control_continues_stage2_on_stage3s_data_steps_batch_and_seed(tmp_path):
    from eve_vlm.quickstart import control_overrides, recipes_dir, stage_overrides
    from eve_vlm.train.recipe import load_recipe

    stage3 = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, tmp_path, False))
    stage2 = load_recipe(recipes_dir() / "stage2.yaml", stage_overrides(2, tmp_path, False))
    control = load_recipe(recipes_dir() / "stage2.yaml", control_overrides(tmp_path, False, stage3))
    assert [Path(s.path).name for s in stage3.data.sources] == ["captions.json"]
    assert [Path(s.path).name for s in stage2.data.sources] == ["train_dialogues_described.json"]
    # The same extra training as stage 3 ...
    assert control.data.sources == stage3.data.sources
    assert (control.data.template, control.data.max_length) == (stage3.data.template, stage3.data.max_length)
    t, c = stage3.training, control.training
    assert (c.max_steps, c.per_device_train_batch_size, c.seed) == (
        t.max_steps,
        t.per_device_train_batch_size,
        t.seed,
    )
    assert c.gradient_accumulation_steps == t.gradient_accumulation_steps
    # ... with checkpoints at stage 3's interval (so an interrupted control resumes as stage 3 does).
    assert c.save_steps == t.save_steps and 0 < c.save_steps < c.max_steps
    # A stage 3 that accumulates micro-batches is followed too.
    other = load_recipe(
        recipes_dir() / "stage3.yaml",
        [*stage_overrides(3, tmp_path, False), "training.gradient_accumulation_steps=2"],
    )
    accumulating = load_recipe(recipes_dir() / "stage2.yaml", control_overrides(tmp_path, False, other))
    assert accumulating.training.gradient_accumulation_steps == 2
    # ... and so is its learning-rate schedule (warm-up share and decay), whatever stage 2's own.
    assert (c.warmup_ratio, c.lr_scheduler_type) == (t.warmup_ratio, t.lr_scheduler_type)
    scheduled = load_recipe(
        recipes_dir() / "stage3.yaml",
        [
            *stage_overrides(3, tmp_path, False),
            "training.warmup_ratio=0.4",
            "training.lr_scheduler_type=linear",
        ],
    )
    follows = load_recipe(
        recipes_dir() / "stage2.yaml", control_overrides(tmp_path, False, scheduled)
    ).training
    assert (follows.warmup_ratio, follows.lr_scheduler_type) == (0.4, "linear")
    assert stage2.training.warmup_ratio != 0.4
    # ... spent on stage 2's parameters, at stage 2's learning rate and under its system prompt.
    assert control.lora == stage2.lora and control.trainable == stage2.trainable
    assert c.learning_rate == stage2.training.learning_rate
    assert control.data.system_prompt == stage2.data.system_prompt == ""
    assert control.model.init_from == str(tmp_path / "stage2")
    # Stage 3 trains the projector with the routers and vision FFNs: all of them act on image tokens only.
    assert [r.pattern for r in stage3.trainable] == [
        "^projector\\.",
        "\\.mlp\\.router\\.",
        "\\.mlp\\.vision_ffns\\.",
    ]


def test_the_ablation_trains_stage3_on_stage2s_conversations_where_capacity_binds(tmp_path):
    from eve_vlm.quickstart import ABLATION_CAPACITY, ablation_overrides, recipes_dir, stage_overrides
    from eve_vlm.train.recipe import load_recipe

    stage3 = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, tmp_path, False))
    stage2 = load_recipe(recipes_dir() / "stage2.yaml", stage_overrides(2, tmp_path, False))
    rts = load_recipe(
        recipes_dir() / "stage3.yaml", ablation_overrides(tmp_path, False, "rts", stage3, stage2)
    )
    # Stage 2's conversations, where the language FFN is asked for more than its capacity at 1.5 ...
    assert rts.data.sources == stage2.data.sources != stage3.data.sources
    assert (rts.data.template, rts.data.max_length) == (stage2.data.template, stage2.data.max_length)
    assert rts.training.per_device_train_batch_size == stage2.training.per_device_train_batch_size
    assert (rts.evf.allocation, rts.evf.capacity_factor) == ("rts", ABLATION_CAPACITY)
    assert rts.training.max_steps == stage3.training.max_steps // 4 == 24  # the steps of the README's table
    # ... with stage 3's recipe otherwise: its parameters, learning rate, seed, router options and parent.
    assert rts.trainable == stage3.trainable and rts.lora == stage3.lora
    assert (rts.training.learning_rate, rts.training.seed) == (
        stage3.training.learning_rate,
        stage3.training.seed,
    )
    assert (rts.evf.router_init, rts.evf.modality_loss_coef) == (
        stage3.evf.router_init,
        stage3.evf.modality_loss_coef,
    )
    assert rts.model.init_from == str(tmp_path / "stage2")
    assert rts.training.output_dir == str(tmp_path / "ablation" / "rts")
    # A smoke run keeps its small batch.
    smoke3 = load_recipe(recipes_dir() / "stage3.yaml", stage_overrides(3, tmp_path, True))
    smoke = load_recipe(
        recipes_dir() / "stage3.yaml", ablation_overrides(tmp_path, True, "bpr", smoke3, stage2)
    )
    assert smoke.training.per_device_train_batch_size == 4 and smoke.training.max_steps == 1


def test_the_training_section_gives_each_models_parent_data_steps_and_trained_parameters():
    from eve_vlm.quickstart_report import training_section

    def summary(parent, data, steps, batch, accumulate, lr, trainable):
        training = {"max_steps": steps, "per_device_train_batch_size": batch, "seed": int(parent is not None)}
        training |= {"gradient_accumulation_steps": accumulate, "learning_rate": lr}
        recipe = {"model": {"init_from": parent}, "data": {"sources": [{"path": data}]}, "training": training}
        return {"recipe": recipe, "trainable": trainable}

    text = training_section(
        {
            "stage1": summary(None, "/d/captions.json", 300, 16, 1, 1e-3, {"^projector\\.": [24, 1565856]}),
            "control": summary(
                "/runs/qs/stage2",
                "/d/captions.json",
                48,
                16,
                2,
                5e-4,
                {"^projector\\.": [24, 1565856], "\\.lora_(A|B)\\.": [420, 4884480]},
            ),
        }
    )
    rows = [line for line in text.splitlines() if line.startswith("| stage1") or line.startswith("| control")]
    assert rows[0] == "| stage1 | - | captions.json | 300 x 16 | 0.001 | 0 | `^projector\\.` 1.57M |"
    # The batch counts accumulation; a pipe in a rule is escaped so the row keeps its six cells.
    assert rows[1] == (
        "| control | stage2 | captions.json | 48 x 32 | 0.0005 | 1 | "
        "`^projector\\.` 1.57M + `\\.lora_(A\\|B)\\.` 4.88M = 6.45M |"
    )
    assert all(len(row.replace("\\|", "").split("|")) == 9 for row in rows)
