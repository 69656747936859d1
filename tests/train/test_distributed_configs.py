"""The shipped accelerate configs (`recipes/accelerate/`), read by accelerate's own launcher code, against
tiny models: FSDP wraps the model's own layer classes (the converted `Evf<...>` layers included) and a model
sharded that way on two CPU processes (gloo) saves full weights; the DeepSpeed config agrees with the recipes.

accelerate 1.16 runs FSDP and DeepSpeed only on GPUs (`accelerate launch` takes its FSDP and DeepSpeed launchers
only without `--cpu`, and `AcceleratorState` sets the FSDP type only for GPU-family backends), so the Trainer's
FSDP path cannot run here; the FSDP2 test below shards with torch's `fully_shard` by the policy accelerate
derives from the config, and gathers the weights with the options accelerate's `get_state_dict` uses for
FSDP2, which is what `Trainer.save_model` (called by every process at the end of `eve train`) does under FSDP.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from conftest import tiny_model

from eve_vlm.model import EveForConditionalGeneration
from eve_vlm.model.decoder_layer import decoder_layers
from eve_vlm.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "accelerate"


def launch_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives each process (its own code)."""
    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (
            ["mixed_precision"] if mixed_precision_from_config else []
        )
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def stage3(family="llama"):
    model = tiny_model(family)
    model.add_lora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model.add_elastic_vision_ffns("alternate", allocation="img_gbpr")
    return model


def test_the_accelerate_configs_are_shipped():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {"fsdp.yaml", "deepspeed_zero2.yaml"}
    for path in CONFIGS.glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# accelerate launch --config_file recipes/accelerate/" + path.name)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fsdp_wraps_every_decoder_and_tower_layer_by_the_models_own_classes(family, monkeypatch):
    """The wrap policy comes from the model's `_no_split_modules` (no class list in the config, which named
    classes a model does not hold and made accelerate stop): every decoder layer, converted or not, and every
    tower layer is a unit; nothing else is."""
    env = launch_env(CONFIGS / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # `eve train` saves the final model from it
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model = stage3(family)
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)
    wrapped = {name for name, module in model.named_modules() if policy(module)}
    layers = {f"language_model.model.layers.{i}" for i in range(len(decoder_layers(model.language_model)))}
    tower = {name for name, m in model.named_modules() if name.startswith("vision_tower.") and policy(m)}
    assert layers <= wrapped
    assert {type(m).__name__ for n, m in model.named_modules() if n in layers} >= {
        f"Evf{family.capitalize()}DecoderLayer",
        f"{family.capitalize()}DecoderLayer",
    }
    assert any(".encoder.layer." in name for name in tower)
    assert wrapped == layers | tower


FSDP2_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, sys.argv[1])
from conftest import image_batch
from test_distributed_configs import stage3

dist.init_process_group("gloo")
rank = dist.get_rank()
out = sys.argv[2]
model = stage3().train()
for name, p in model.named_parameters():
    p.requires_grad_(".mlp.router." in name or ".mlp.vision_ffns." in name)
policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)
for module in [m for m in model.modules() if policy(m)][::-1]:
    fully_shard(module)
fully_shard(model)
shards = {n: (p.to_local().shape[0], p.shape[0]) for n, p in model.named_parameters() if isinstance(p, DTensor)}
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
for step in range(2):
    input_ids, pixel_values = image_batch(model.config, batch=2, seed=10 * step + rank)
    loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
final = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
gathered = get_model_state_dict(model, options=options)  # as accelerate's get_state_dict under FSDP2
if rank == 0:
    model.save_pretrained(out, state_dict=gathered)
torch.save({"final": final, "shards": shards}, f"{out}-rank{rank}.pt")
dist.destroy_process_group()
"""


def test_a_model_sharded_by_that_policy_on_two_cpu_processes_saves_full_weights(tmp_path, monkeypatch):
    """FSDP2 on CPU (gloo): a stage-3 model with LoRA, sharded by the config's policy, trains two steps on
    different batches per process; its gathered state dict saves with `save_pretrained`, and the folder
    reloads with `from_pretrained` equal to the full weights every process holds."""
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    env = {**os.environ, **launch_env(CONFIGS / "fsdp.yaml"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(ROOT / "tests")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [str(script), str(ROOT / "tests"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out-rank{r}.pt") for r in (0, 1)]
    shards = ranks[0]["shards"]
    assert shards and all(local == (full + 1) // 2 for local, full in shards.values())  # rows split over 2
    assert any(".mlp.vision_ffns." in name for name in shards)
    saved = EveForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    start = stage3().state_dict()
    for rank in ranks:
        assert rank["final"].keys() == saved.keys()
        assert all(torch.equal(rank["final"][k], saved[k]) for k in saved)
    moved = [k for k in saved if ".mlp.router." in k and not torch.equal(saved[k], start[k])]
    assert moved  # the routers trained
    frozen = [k for k in saved if ".mlp." not in k and "lora" not in k]
    assert all(torch.equal(saved[k], start[k]) for k in frozen)


def test_the_deepspeed_config_agrees_with_the_recipes():
    """DeepSpeed runs only on GPUs under accelerate, so its config is checked as accelerate reads it: ZeRO-2,
    batch size, accumulation and clipping left to the recipe (`auto`), and the same mixed precision as every
    paper recipe meant for it (the recipe's `bf16` turns on autocast; the config's would differ silently)."""
    env = launch_env(CONFIGS / "deepspeed_zero2.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "auto"
    assert env["ACCELERATE_GRADIENT_CLIPPING"] == "auto"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
    precision = env["ACCELERATE_MIXED_PRECISION"]
    for path in sorted((ROOT / "recipes" / "paper").glob("stage*.yaml")):
        training = load_recipe(path).training
        assert precision == ("bf16" if training.bf16 else "no"), path.name
    config = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())
    assert config["deepspeed_config"]["offload_param_device"] == "none"  # ZeRO-2 has no parameters to offload


class ShardedSaveTrainer:
    """What `Trainer.save_model` does under FSDP with `SHARDED_STATE_DICT`: writes no weights."""

    accelerator = type("Accelerator", (), {"wait_for_everyone": staticmethod(lambda: None)})()

    def is_world_process_zero(self):
        return True

    def save_model(self, output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)


def test_a_run_whose_final_save_writes_no_weights_stops_naming_the_state_dict_type(tmp_path):
    from eve_vlm.errors import CheckpointError
    from eve_vlm.train.stages import DONE_MARKER, save_stage

    with pytest.raises(CheckpointError, match="fsdp_state_dict_type: FULL_STATE_DICT"):
        save_stage(ShardedSaveTrainer(), processor=None, output_dir=str(tmp_path / "run"), summary={})
    assert not (tmp_path / "run" / DONE_MARKER).exists()


def sharded_trainer(fsdp=None, deepspeed=None):
    """What `check_sharded_setup` reads of a Trainer under FSDP or DeepSpeed (accelerate runs neither on CPU)."""
    from types import SimpleNamespace

    state = SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed)
    return SimpleNamespace(
        accelerator=SimpleNamespace(state=state),
        is_fsdp_enabled=fsdp is not None,
        is_deepspeed_enabled=deepspeed is not None,
    )


@pytest.mark.parametrize(
    ("fsdp", "deepspeed", "lora", "refused"),
    [
        (None, None, True, None),
        (("FULL_STATE_DICT", False), None, True, None),
        (("SHARDED_STATE_DICT", False), None, False, "fsdp_state_dict_type: FULL_STATE_DICT"),
        (("FULL_STATE_DICT", True), None, True, "fsdp_activation_checkpointing: false"),
        (("FULL_STATE_DICT", True), None, False, None),
        (None, {"stage": 2}, True, None),
        (None, {"stage": 3}, True, "zero3_save_16bit_model: true"),
        (None, {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}, True, None),
    ],
)
def test_a_sharded_run_that_could_not_save_or_recompute_is_refused_before_training(
    fsdp, deepspeed, lora, refused
):
    from types import SimpleNamespace

    from eve_vlm.errors import ConfigError
    from eve_vlm.train.stages import check_sharded_setup

    if fsdp is not None:
        fsdp = SimpleNamespace(state_dict_type=f"StateDictType.{fsdp[0]}", activation_checkpointing=fsdp[1])
    if deepspeed is not None:
        deepspeed = SimpleNamespace(deepspeed_config={"zero_optimization": deepspeed})
    trainer = sharded_trainer(fsdp, deepspeed)
    if refused is None:
        check_sharded_setup(trainer, has_lora=lora)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_sharded_setup(trainer, has_lora=lora)
