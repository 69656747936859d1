"""The three training stages, run from a recipe: build the model, the data, the trainer; train; save.

- Stage 1 builds an Eve model from a causal-LM folder and a vision-tower folder (or continues `init_from`) and
  trains what the recipe's `trainable` rules match (the projector, in the shipped recipes).
- Stage 2 loads stage 1 and, with a `lora` section, adds unmerged LoRA adapters to the LLM (without it the
  rules may train the full LLM, as the authors' script does).
- Stage 3 loads stage 2 and inserts Elastic Vision FFNs (`evf` section); the rules train routers and vision FFNs.

Each stage writes an HF-format folder (config, safetensors, processor) to `training.output_dir` that
`from_pretrained` and the next stage's `init_from` load. Checkpoints go to `output_dir/checkpoint-N`; with
`resume_from_checkpoint: auto` a rerun continues from the newest complete one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed
from transformers.trainer import TRAINING_ARGS_NAME

from eve_vlm.assets import eve_home, weights_sha256
from eve_vlm.data.cache import CachedDataset, PreparedData, prepare_cache
from eve_vlm.data.collator import EveCollator
from eve_vlm.data.conversations import ConversationEncoder
from eve_vlm.data.llava import DataSource
from eve_vlm.errors import CheckpointError, ConfigError, DataError
from eve_vlm.model import EveConfig, EveForConditionalGeneration, EveProcessor
from eve_vlm.model.decoder_layer import check_family_convertible
from eve_vlm.model.folder import check_eve_folder
from eve_vlm.model.tower import load_vision_tower, read_tower_config
from eve_vlm.train.recipe import ModelSpec, Recipe
from eve_vlm.train.trainable import apply_trainable_rules, trainable_to_fp32
from eve_vlm.train.trainer import EveTrainer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DONE_MARKER = "eve_training.json"
# Parameter-name parts that a batch without images never reaches.
MULTIMODAL_ONLY = ("lora_", ".vision_ffns.", ".router.", ".coefficient.")


def expand(path: str) -> str:
    """`~` and `$VARS` expanded; `$EVE_HOME` defaults to the asset folder of `eve prepare`."""
    path = path.replace("${EVE_HOME}", str(eve_home())).replace("$EVE_HOME", str(eve_home()))
    return os.path.expanduser(os.path.expandvars(path))


def build_from_parts(recipe: Recipe) -> tuple[EveForConditionalGeneration, EveProcessor]:
    """A new Eve model from an LLM folder and a vision-tower folder (stage 1)."""
    spec = recipe.model
    for key in ("language_model", "vision_tower"):
        if not Path(expand(getattr(spec, key))).is_dir():
            raise ConfigError(
                f"model.{key}: folder {getattr(spec, key)} does not exist (run `eve prepare`?)."
            )
    dtype = DTYPES[spec.dtype]
    tower_dir = expand(spec.vision_tower)
    read_tower_config(tower_dir)  # a folder with no vision model fails here, before any model is built
    lm = AutoModelForCausalLM.from_pretrained(expand(spec.language_model), dtype=dtype)
    tower = load_vision_tower(tower_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(expand(spec.language_model))
    config = EveConfig(
        text_config=lm.config,
        vision_config=tower.config,
        image_size=spec.image_size,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_norm=spec.vision_feature_norm,
        projector_type=spec.projector_type,
        projector_grid=spec.projector_grid,
        vocabulary_mixture=spec.vocabulary_mixture,
    )
    processor = EveProcessor.from_parts(
        tokenizer=tokenizer,
        vision_config=config.vision_config,
        image_size=config.image_size,
        num_image_tokens=config.num_image_tokens,
        tower_folder=tower_dir,
        image_aspect_ratio=spec.image_aspect_ratio or "resize",
    )
    config.image_token_id = processor.image_token_id
    llm_dir = Path(expand(spec.language_model)).resolve()
    config.base_language_model = {"path": str(llm_dir), "sha256": weights_sha256(llm_dir)}
    model = EveForConditionalGeneration(config).to(dtype)
    model.language_model.load_state_dict(lm.state_dict())
    model.vision_tower.tower.load_state_dict(tower.state_dict())
    model.generation_config = lm.generation_config
    return model, processor


STRUCTURE_FIELDS = (
    "projector_type",
    "projector_grid",
    "image_size",
    "vision_feature_layer",
    "vision_feature_norm",
    "vocabulary_mixture",
)


def check_structure_fields(spec: ModelSpec, saved: EveConfig, source: str) -> None:
    """Refuses a recipe that continues a saved model (`init_from`) but sets a stage-1 structure field to a value
    other than the one the model was built with: such a field cannot change after stage 1, and would otherwise be
    ignored without a word. A field written with its default value cannot be told from an unset one and is
    not checked."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
    for key in STRUCTURE_FIELDS:
        value, built = getattr(spec, key), getattr(saved, key)
        if value != defaults[key] and value != built:
            raise ConfigError(
                f"model.{key}={value!r}, but {source} was built with {key}={built!r}: a model's structure is "
                f"fixed at stage 1. Remove model.{key} from this recipe (or set it to {built!r})."
            )


def build_model(recipe: Recipe) -> tuple[EveForConditionalGeneration, EveProcessor]:
    """The model a stage trains, with its structural change (LoRA, EVF) applied.

    Everything that can be checked from config files is checked before a model is loaded: the folders, and
    for a stage that adds EVF layers, that the LM family's decoder layers have an `mlp` to convert.
    """
    if recipe.model.init_from is None:
        if recipe.evf is not None:
            check_family_convertible(AutoConfig.from_pretrained(expand(recipe.model.language_model)))
        model, processor = build_from_parts(recipe)
    else:
        source = expand(recipe.model.init_from)
        if not (Path(source) / "config.json").is_file():
            raise ConfigError(
                f"model.init_from: {source} holds no saved model; run the previous stage first."
            )
        try:
            check_eve_folder(source)
        except CheckpointError as err:
            raise ConfigError(f"model.init_from: {err}") from None
        saved = EveConfig.from_pretrained(source)
        check_structure_fields(recipe.model, saved, source)
        if recipe.training.vocabulary_loss_coef > 0 and not saved.vocabulary_mixture:
            raise ConfigError(
                f"training.vocabulary_loss_coef={recipe.training.vocabulary_loss_coef}: the caption-word loss "
                f"needs a model built with model.vocabulary_mixture: true at stage 1, and {source} has none; set "
                "it to 0."
            )
        if recipe.evf is not None and saved.evf is None:
            try:
                check_family_convertible(saved.text_config)
            except ConfigError as err:
                raise ConfigError(f"evf: {source} cannot take Elastic Vision FFNs. {err}") from None
        model = EveForConditionalGeneration.from_pretrained(source, dtype=DTYPES[recipe.model.dtype])
        processor = EveProcessor.from_pretrained(source)
        if recipe.model.image_aspect_ratio is not None:
            processor.image_aspect_ratio = recipe.model.image_aspect_ratio
    if recipe.model.attn_implementation is not None:
        try:
            model.set_attn_implementation(recipe.model.attn_implementation)
        except (ImportError, ValueError) as err:
            raise ConfigError(
                f"model.attn_implementation={recipe.model.attn_implementation!r}: {err}"
            ) from None
    model.config.vocabulary_loss_coef = recipe.training.vocabulary_loss_coef
    if recipe.lora is not None and model.config.lora is None:
        model.add_lora(**recipe.lora.to_peft())
    if recipe.evf is not None:
        model.add_elastic_vision_ffns(recipe.evf.placement, **recipe.evf.options())
        model.config.aux_loss_coef = recipe.evf.aux_loss_coef
    return model, processor


def data_cache_dir(recipe: Recipe) -> Path:
    """`data.cache_dir`, default `$EVE_HOME/data-cache`."""
    return Path(expand(recipe.data.cache_dir)) if recipe.data.cache_dir else eve_home() / "data-cache"


def build_dataset(
    recipe: Recipe,
    processor: EveProcessor,
    config: EveConfig,
    log=print,
    main_process_first: Callable[[], AbstractContextManager] = nullcontext,
    is_main_process: bool = True,
) -> CachedDataset:
    """The recipe's data from the data cache, prepared first when the cache has no copy (see `cache.py`).

    Args:
        main_process_first: A context in which the main process runs first while the others wait (e.g.
            `TrainingArguments.main_process_first`), so only the main process encodes.
        is_main_process: Whether this process prepares the cache; the others only read it, and stop with a
            `DataError` when the main process failed to prepare it.
    """
    data = recipe.data
    sources = [
        DataSource(expand(s.path), expand(s.image_folder) if s.image_folder else None, s.weight)
        for s in data.sources
    ]
    if data.system_prompt is not None and data.template == "chat":
        processor.system_prompt = data.system_prompt  # saved with the model: chat and evaluation use it
    encoder = ConversationEncoder(
        processor.tokenizer,
        image_token=processor.image_token,
        image_token_id=config.image_token_id,
        num_image_tokens=config.num_image_tokens,
        template=data.template,
        max_length=data.max_length,
        system_prompt=processor.system_prompt,
    )
    with main_process_first():
        prepared = prepare_cache(
            sources,
            encoder,
            cache_dir=data_cache_dir(recipe),
            check_images=data.check_images,
            on_bad_row=data.on_bad_row,
            seed=recipe.training.seed,
            num_proc=data.num_proc or min(os.cpu_count() or 1, 8),
            image_loader=processor.load_images,
            log_line=log,
            build=is_main_process,
        )
    dataset = prepared.dataset
    log(data_summary(dataset, prepared))
    if dataset.skipped:
        check_bad_rows(dataset.skipped, len(dataset), data.max_bad_share, log)
    return dataset


def data_summary(dataset: CachedDataset, prepared: PreparedData) -> str:
    """One line: rows kept (with and without an image), skipped by reason, tokens, cache folder and size."""
    images = sum(dataset.is_image)
    reasons = Counter(_reason_kind(bad.reason) for bad in dataset.skipped)
    skipped = "; ".join(f"{n} {kind}" for kind, n in reasons.most_common(3))
    if len(reasons) > 3:
        skipped += "; ..."
    size = prepared.dataset.rows.size_bytes() / 2**20
    how = "built" if prepared.built else "read"
    return (
        f"data: {len(dataset)} rows ({images} with an image, {len(dataset) - images} text-only), "
        f"{len(dataset.skipped)} skipped{f' ({skipped})' if skipped else ''}, {sum(dataset.lengths)} tokens; "
        f"cache {prepared.folder} ({size:.1f} MiB, {how} in {prepared.seconds:.1f} s)"
    )


def _reason_kind(reason: str) -> str:
    """A bad row's reason without its row-specific parts (quoted values, paths, numbers)."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\S*/\S*|\d+", "...", reason)


def check_bad_rows(skipped: list, kept: int, max_share: float, log=print) -> None:
    """Logs the share of skipped rows (at least one) and their most common reason before training; refuses
    to start above `max_share`.

    Raises:
        DataError: More than `max_share` of the rows are bad; names the most common reason and an example.
    """
    share = len(skipped) / (len(skipped) + kept)
    kinds = Counter(_reason_kind(bad.reason) for bad in skipped)
    kind, count = kinds.most_common(1)[0]
    example = next(bad for bad in skipped if _reason_kind(bad.reason) == kind)
    where = f"{example.source}:{example.line} id={example.id}: {example.reason}"
    log(
        f"data: skipped {len(skipped)} bad row(s), {100 * share:.2f}% of the rows; most common ({count}): {where}"
    )
    if share > max_share:
        raise DataError(
            f"{len(skipped)} of {len(skipped) + kept} rows ({100 * share:.2f}%) are bad, above "
            f"data.max_bad_share={max_share}; most common reason ({count} rows), e.g. {where}. Fix the data, "
            "or raise data.max_bad_share to train on the rest."
        )


def training_arguments(recipe: Recipe) -> TrainingArguments:
    t = recipe.training
    return TrainingArguments(
        output_dir=expand(t.output_dir),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler_type,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=max(t.save_steps, 1),
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        activation_checkpointing=t.gradient_checkpointing,
        report_to=t.report_to,
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        save_only_model=False,
        ddp_timeout=t.ddp_timeout,
    )


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` whose trainer state was written (the last file a checkpoint gets)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    done = [
        p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file() and p.name[11:].isdigit()
    ]
    return str(max(done, key=lambda p: int(p.name[11:]))) if done else None


def check_sharded_setup(trainer: EveTrainer, has_lora: bool) -> None:
    """Refuses, before the first step, what would fail at the end of a sharded run or in its backward: a final
    save that could not write full weights (FSDP without `FULL_STATE_DICT`, DeepSpeed ZeRO-3 without gathering
    16-bit weights on save), and FSDP's own activation checkpointing on a LoRA model (its wrapper cannot switch
    LoRA for the recomputation as the model's checkpointing does; use `training.gradient_checkpointing`)."""
    state = trainer.accelerator.state
    if trainer.is_fsdp_enabled:
        plugin = state.fsdp_plugin
        if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            raise ConfigError(
                f"FSDP state_dict_type {plugin.state_dict_type}: eve train saves the final model from a full "
                "state dict; set `fsdp_state_dict_type: FULL_STATE_DICT` in the accelerate config."
            )
        if plugin.activation_checkpointing and has_lora:
            raise ConfigError(
                "fsdp_activation_checkpointing on a LoRA model: FSDP's checkpoint wrapper cannot keep LoRA off "
                "for text-only rows when it recomputes; set `fsdp_activation_checkpointing: false` in the "
                "accelerate config and `training.gradient_checkpointing: true` in the recipe instead."
            )
    if trainer.is_deepspeed_enabled:
        plugin = state.deepspeed_plugin
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
            raise ConfigError(
                "DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the final model could not "
                "be saved as full weights; set `zero3_save_16bit_model: true` in the accelerate config."
            )


def save_stage(trainer: EveTrainer, processor, output_dir: str, summary: dict) -> None:
    """Writes the final model, processor and a summary; files land by rename, the summary last. Every process
    calls it: the weights go through the Trainer's `save_model`, which gathers them where FSDP or DeepSpeed
    ZeRO-3 shard them over the processes (a collective) and writes them from the main process only."""
    out = Path(output_dir)
    tmp = out / ".final"
    main = trainer.is_world_process_zero()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    if not main:
        return
    if not any(tmp.glob("*.safetensors")):
        raise CheckpointError(
            f"No weights were written to {out}: the final model is saved from a full state dict; set "
            "`fsdp_state_dict_type: FULL_STATE_DICT` (FSDP) or `zero3_save_16bit_model: true` (DeepSpeed "
            "ZeRO-3) in the accelerate config (the checkpoints of this run, if any, are in its checkpoint-* "
            "folders)"
        )
    (tmp / TRAINING_ARGS_NAME).unlink(missing_ok=True)  # the run's arguments are in the summary
    processor.save_pretrained(tmp)
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()
    tmp_summary = out / f".{DONE_MARKER}.tmp"
    tmp_summary.write_text(json.dumps(summary, indent=2))
    os.replace(tmp_summary, out / DONE_MARKER)


def on_text_path(name: str) -> bool:
    """Whether a batch without images reaches the parameter `name` of an Eve model: the language model's own
    weights do; the tower, the projector, LoRA and EVF parts do not."""
    return name.startswith("language_model.") and not any(part in name for part in MULTIMODAL_ONLY)


def text_path_trains(model: EveForConditionalGeneration) -> bool:
    """Whether a batch without images reaches any trainable weight."""
    return any(p.requires_grad and on_text_path(name) for name, p in model.named_parameters())


def may_leave_trainable_unused(model: EveForConditionalGeneration, text_rows: bool) -> bool:
    """Whether some training step can leave a trainable parameter without a gradient, which DDP must be told
    (`find_unused_parameters`, else it waits for that gradient and fails on the next step): an EVF part (an
    expert no token was routed to, a router trained by a loss that may be zero), or, when text-only rows are
    kept (`text_rows`), any trainable parameter off the text path, since their batches hold no image."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    evf = any(part in name for name in trainable for part in MULTIMODAL_ONLY[1:])
    return evf or (text_rows and not all(on_text_path(name) for name in trainable))


def check_one_process_per_gpu(gpus: int, world_size: str | None) -> None:
    """Refuses to train with one process on several GPUs, which transformers' Trainer would run with
    `nn.DataParallel` (one process, a model replica per GPU): slower than DDP, and eve train does not support
    it (its batches and routing statistics assume one process per device).

    Args:
        gpus: The CUDA devices torch sees (`torch.cuda.device_count()`).
        world_size: The `WORLD_SIZE` environment variable, set by `torchrun` and `accelerate launch`; None
            when the process was started on its own.

    Raises:
        ConfigError: `gpus > 1` and no launcher started the process; names the `torchrun` command.
    """
    if gpus > 1 and world_size is None:
        raise ConfigError(
            f"torch sees {gpus} GPUs, but eve train was started as one process, which would drive them all "
            "with nn.DataParallel (not supported). Start one process per GPU: torchrun --nproc_per_node "
            f"{gpus} -m eve_vlm.cli train RECIPE (or accelerate launch ... -m eve_vlm.cli train RECIPE), or use "
            "one GPU: CUDA_VISIBLE_DEVICES=0 eve train RECIPE."
        )


def collator(processor: EveProcessor, config: EveConfig) -> EveCollator:
    """The training collator: pads, expands each image placeholder, stacks the images."""
    return EveCollator(
        processor.tokenizer.pad_token_id,
        processor.load_images,
        image_token_id=config.image_token_id,
        num_image_tokens=config.num_image_tokens,
    )


def warm_start(recipe: Recipe, model, dataset: CachedDataset, processor: EveProcessor, log=print) -> dict:
    """Fits the EVF routers on the image mask over the first `evf.router_init_batches` micro-batches of a
    seeded shuffle of the training data (see `router_warm_start.py`)."""
    from torch.utils.data import DataLoader

    from eve_vlm.train.router_warm_start import warm_start_routers

    loader = DataLoader(
        dataset,
        batch_size=recipe.training.per_device_train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(recipe.training.seed),
        collate_fn=collator(processor, model.config),
    )
    batches = (
        {k: v for k, v in b.items() if k != "num_bad_images"}
        for i, b in zip(range(recipe.evf.router_init_batches), loader, strict=False)
    )
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=recipe.training.bf16)
    with autocast:
        return warm_start_routers(model, batches, confidence=recipe.evf.router_init_confidence, log=log)


def run_stage(recipe: Recipe, log=print, callbacks=None) -> dict:
    """Runs one stage end to end; returns the summary written next to the model."""
    start = time.time()
    check_one_process_per_gpu(torch.cuda.device_count(), os.environ.get("WORLD_SIZE"))
    set_seed(recipe.training.seed)  # LoRA and EVF start alike on every process, whatever torch's default seed
    model, processor = build_model(recipe)
    args = training_arguments(recipe)
    # The main process of each node prepares (a node-local cache_dir needs its own copy; on a shared one the
    # first complete copy wins and the other nodes read it); the others wait up to training.ddp_timeout.
    first = partial(args.main_process_first, local=True, desc="data cache")
    dataset = build_dataset(
        recipe,
        processor,
        model.config,
        log=log,
        main_process_first=first,
        is_main_process=args.local_process_index == 0,
    )
    matches = apply_trainable_rules(model, recipe.trainable, recipe.expect_trainable, log=log)
    if cast := trainable_to_fp32(model):
        log(f"trainable parameters: {cast} tensors cast to fp32; the frozen ones stay {recipe.model.dtype}")
    if not text_path_trains(model) and (dropped := dataset.drop_text_only()):
        log(
            f"data: dropped {dropped} text-only rows: without an image the model runs the frozen base path "
            "(LoRA off, language FFNs only), so they would train nothing"
        )
    text_rows = len(dataset) > sum(dataset.is_image)
    args.ddp_find_unused_parameters = may_leave_trainable_unused(model, text_rows)  # read by the Trainer
    if (
        recipe.evf is not None
        and recipe.evf.router_init == "modality"
        and not latest_checkpoint(expand(recipe.training.output_dir))
    ):
        warm_start(recipe, model, dataset, processor, log=log)
    trainer = EveTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator(processor, model.config),
        callbacks=callbacks,
        router_lr=recipe.evf.router_lr if recipe.evf is not None else None,
    )
    check_sharded_setup(trainer, has_lora=model.config.lora is not None)
    resume = recipe.training.resume_from_checkpoint
    if resume == "auto":
        resume = latest_checkpoint(args.output_dir)
    log(f"processes: world size {args.world_size}")
    if resume:
        log(f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    bad_images = trainer.bad_images_total()
    summary = {
        "stage": recipe.stage,
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "seconds": round(time.time() - start, 1),
        "trainable": {m.pattern: [m.tensors, m.parameters] for m in matches},
        "trainable_names": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "skipped_rows": len(dataset.skipped),
        "bad_images_in_training": bad_images,
        "loss_history": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
        "recipe": asdict(recipe),
    }
    save_stage(trainer, processor, args.output_dir, summary)
    if bad_images:
        log(
            f"skipped {bad_images} row(s) whose image failed to load during training (see the warnings above)"
        )
    if dataset.skipped:
        log(f"skipped {len(dataset.skipped)} bad row(s):")
        for bad in dataset.skipped[:20]:
            log(f"  {bad.source}:{bad.line} id={bad.id}: {bad.reason}")
    log(f"stage {recipe.stage} done in {summary['seconds']} s; model in {args.output_dir}")
    return summary
