"""Launchers and devices: torchrun DDP on CPU (gloo), DDP's unused-parameter decision, one process on several
GPUs refused, and a saved model run on a chosen device, dtype or int8 quantisation."""

import json

import pytest
import torch
import yaml
from stage_parts import build_parts, recipe, torchrun

from eve_vlm.errors import ConfigError
from eve_vlm.model import EveForConditionalGeneration
from eve_vlm.train.stages import run_stage


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_parts(tmp_path_factory.mktemp("parts"))


def test_torchrun_ddp_two_processes(parts, tmp_path):
    """`torchrun --nproc_per_node 2 -m eve_vlm.cli train RECIPE` runs DDP on CPU (gloo) and saves once."""
    run_stage(recipe(parts, tmp_path, 1, max_steps=2))
    recipe(parts, tmp_path, 2, max_steps=3, per_device_train_batch_size=4, output_dir=str(tmp_path / "ddp"))
    proc = torchrun("-m", "eve_vlm.cli", "train", str(tmp_path / "stage2.yaml"))
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
    run_stage(recipe(parts, tmp_path, 1, max_steps=2), log=lambda line: None)
    recipe(parts, tmp_path, 2, max_steps=2, save_steps=2, per_device_train_batch_size=4)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)

    def run_ranks(tag, *overrides):
        torchrun(str(script), str(tmp_path / "stage2.yaml"), str(tmp_path / tag), *overrides)
        return [json.loads((tmp_path / f"{tag}-rank{r}.json").read_text()) for r in (0, 1)]

    def cache_lines(ranks, word):
        return [any(line.startswith(f"data cache: {word}") for line in rank["log"]) for rank in ranks]

    first = run_ranks("first")
    assert cache_lines(first, "encoding") == [True, False]
    assert cache_lines(first, "reading") == [False, True]
    batches = [rank["batches"] for rank in first]
    assert len(batches[0]) == len(batches[1]) > 0
    assert batches[0] != batches[1] and set(sum(batches[0], [])) != set(sum(batches[1], []))
    assert len(list((tmp_path / "data-cache").iterdir())) == 2  # stage 1's captions, stage 2's conversations

    resumed = run_ranks("resumed", "training.max_steps=3")
    assert cache_lines(resumed, "encoding") == [False, False]
    assert cache_lines(resumed, "reading") == [True, True]
    assert any(line.startswith("resuming from") and "checkpoint-2" in line for line in resumed[0]["log"])
    assert json.loads((tmp_path / "stage2" / "eve_training.json").read_text())["steps"] == 3


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
    run_stage(recipe(parts, tmp_path, 1, max_steps=2), log=lambda line: None)
    full = recipe(parts, tmp_path, 2, max_steps=14, per_device_train_batch_size=4, learning_rate=1e-4)
    data = yaml.safe_load((tmp_path / "stage2.yaml").read_text())
    data.pop("lora")
    data["trainable"] = [{"pattern": r"^projector\."}, {"pattern": r"^language_model\."}]
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(data))
    del full
    script = tmp_path / "final_state.py"
    script.write_text(FINAL_STATE_SCRIPT)
    proc = torchrun(str(script), str(tmp_path / "stage2.yaml"), str(tmp_path / "final"))
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
