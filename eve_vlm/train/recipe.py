"""Training recipes: one YAML file per stage, validated into typed dataclasses.

A recipe names where the model comes from (`model`), what data it trains on (`data`), which parameters train
(`trainable`), the stage's structural change (`lora` for stage 2, `evf` for stage 3) and the optimisation
settings (`training`). Unknown keys are errors that name the key and its section; `key=value` overrides from
the command line use dotted paths (`training.max_steps=10`) and are parsed as YAML scalars.

Follows litgpt's `config.py`/`args.py` (typed configs validated in `__post_init__`) and torchtune's recipe
YAMLs (each starting with the command that runs it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from eve_vlm.data.llava import CHECK_IMAGES
from eve_vlm.errors import ConfigError
from eve_vlm.model.configuration import PLACEMENTS, EvfConfig
from eve_vlm.model.processing import IMAGE_ASPECT_RATIOS

STAGES = (1, 2, 3)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
ROUTER_INITS = ("random", "modality")
TRAINING_ONLY = (
    "placement",
    "aux_loss_coef",
    "router_init",
    "router_init_batches",
    "router_init_confidence",
    "router_lr",
)


@dataclass
class ModelSpec:
    """Where the model comes from.

    Attributes:
        init_from: A previous stage's output folder (an Eve model). The model's structure then comes from that
            folder: `language_model` and `vision_tower` are not read, and a structure field below (projector,
            image size, feature layers, mixture) set to a value other than the folder's is refused.
        language_model: Folder of a Hugging Face causal LM (stage 1 starting point).
        vision_tower: Folder of a Hugging Face vision model (stage 1 starting point).
        projector_type: `mlp2x_gelu`, `ldp` or `ldpv2`.
        projector_grid: Output grid side for `ldpv2`.
        vocabulary_mixture: Image tokens become mixtures of the LM's word embeddings (`VocabularyMixture`;
            ours, not the paper's); train `^vocabulary_mixture\\.` with the projector.
        image_size: Input image side; default the tower's.
        vision_feature_layer: Hidden-state index taken from the tower, or a list whose features are
            concatenated.
        vision_feature_norm: Standardise each patch feature (LayerNorm without parameters) before the
            projector.
        image_aspect_ratio: `resize` (images go to the tower's image processor as they are: its resize and
            centre crop) or `pad` (padded to a square with the processor's mean colour first, LLaVA-1.5's
            `image_aspect_ratio: pad`); saved with the processor. Unset: the previous stage's, `resize` at
            stage 1.
        dtype: `float32` or `bfloat16`: the dtype the model is loaded in. With `bfloat16` the frozen weights stay
            bf16 (half the memory) while the trainable ones are cast to fp32 (so are their optimizer state and
            the saved trained weights), and the stage needs `training.bf16: true` to compute in bf16.
        attn_implementation: The attention kernel of the LM and the tower while training (`eager`, `sdpa`,
            `flash_attention_2`, `flash_attention_3`, `flex_attention`); unset: transformers' default (sdpa
            where the model supports it). Not saved with the model: `from_pretrained(attn_implementation=...)`
            chooses it when loading.
    """

    init_from: str | None = None
    language_model: str | None = None
    vision_tower: str | None = None
    projector_type: str = "mlp2x_gelu"
    projector_grid: int | None = None
    vocabulary_mixture: bool = False
    image_size: int | None = None
    vision_feature_layer: int | list[int] = -2
    vision_feature_norm: bool = False
    image_aspect_ratio: str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.init_from is None and (self.language_model is None or self.vision_tower is None):
            raise ConfigError(
                "model: give either init_from (a previous stage) or both language_model and vision_tower."
            )
        if self.image_aspect_ratio not in (None, *IMAGE_ASPECT_RATIOS):
            raise ConfigError(
                f"model.image_aspect_ratio={self.image_aspect_ratio!r}: use {' or '.join(IMAGE_ASPECT_RATIOS)}."
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: use float32 or bfloat16.")
        if self.attn_implementation not in (None, *ATTN_IMPLEMENTATIONS):
            raise ConfigError(
                f"model.attn_implementation={self.attn_implementation!r}: use one of "
                f"{', '.join(ATTN_IMPLEMENTATIONS)} (or leave it unset)."
            )


@dataclass
class SourceSpec:
    """One LLaVA-format file. `weight` 2.0 repeats it twice, 0.5 keeps half."""

    path: str
    image_folder: str | None = None
    weight: float = 1.0


@dataclass
class DataSpec:
    """Training data.

    Attributes:
        sources: LLaVA JSON/JSONL files, mixed by weight.
        template: `chat` (the tokenizer's chat template) or `plain` (image then caption, stage 1).
        max_length: Longest sequence in tokens; truncation never cuts image tokens.
        on_bad_row: `raise` (stop, naming file and row) or `skip` (skip and count).
        max_bad_share: With `skip`, the largest share of bad rows a stage accepts: above it the stage refuses to
            start (before the first step), naming the most common reason and an example row.
        system_prompt: System message for rows that have none (chat template); None = the model's own
            (`EveProcessor.system_prompt`, set by an earlier stage) or the template's default. A stage that
            sets it saves it with the model, and `eve chat` and the evaluations use it for image requests.
            A short one (e.g. "") saves tokens: SmolLM2's default system message is 20 tokens.
        check_images: How images are checked while the data is prepared: `none`, `exists` (the file is
            there) or `decode` (it opens, verifies and decodes; slower). The result is cached with the
            encoded rows. A bad image met during training is handled as `on_bad_row` says.
        cache_dir: Folder of the data cache (default `$EVE_HOME/data-cache`): rows are checked and encoded
            once per (data files, tokenizer, template, system prompt, max length, image tokens, image check)
            and every rank, resumed run and later stage with the same settings reads them from there.
        num_proc: Processes that prepare the data (default: the CPU count, at most 8).
    """

    sources: list[SourceSpec] = field(default_factory=list)
    template: str = "chat"
    max_length: int = 2048
    on_bad_row: str = "raise"
    max_bad_share: float = 0.01
    system_prompt: str | None = None
    check_images: str = "exists"
    cache_dir: str | None = None
    num_proc: int | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty; list at least one LLaVA JSON/JSONL file.")
        if self.template not in ("chat", "plain"):
            raise ConfigError(f"data.template={self.template!r}: use chat or plain.")
        if self.on_bad_row not in ("raise", "skip"):
            raise ConfigError(f"data.on_bad_row={self.on_bad_row!r}: use raise or skip.")
        if not 0.0 <= self.max_bad_share <= 1.0:
            raise ConfigError(f"data.max_bad_share={self.max_bad_share}: use a share between 0 and 1.")
        if self.check_images not in CHECK_IMAGES:
            raise ConfigError(
                f"data.check_images={self.check_images!r}: use one of {', '.join(CHECK_IMAGES)}."
            )
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"data.num_proc={self.num_proc}: use 1 or more (or null for the CPU count).")


@dataclass
class TrainableRule:
    """Parameters whose name matches `pattern` (Python regex, `re.search`) are trained.

    Attributes:
        pattern: Regex on parameter names.
        expect: Expected number of parameters (elements) it matches; training refuses to start if different.
    """

    pattern: str
    expect: int | None = None


@dataclass
class LoraSpec:
    """peft LoRA options for the language model (stage 2)."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def to_peft(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EvfSpec:
    """Stage-3 Elastic Vision FFN insertion: `EvfConfig`'s options (see there for their meaning, validated the
    same way) with a `placement` instead of layer indices, the balance-loss weight, and how the routers start
    and learn.

    Attributes (besides `EvfConfig`'s):
        aux_loss_coef: Weight of the summed balance loss.
        router_init: `random` (the paper's: N(0, 0.02), near-uniform routing) or `modality` (warm start
            [ours]: before training, each router is fitted on the image mask over `router_init_batches`
            training micro-batches, so image tokens start on the vision FFN and text tokens on the language
            FFN, each with probability `router_init_confidence`; training then moves them).
        router_init_batches: Micro-batches whose EVF inputs the warm start fits on.
        router_init_confidence: Router probability the warm start aims at for each token's modality expert.
        router_lr: Learning rate of the router weights (None = `training.learning_rate`); the schedule
            scales it like the others.
    """

    placement: str | list[int] = "alternate"
    num_experts: int = 2
    top_k: int = 1
    allocation: str = "img_gbpr"
    capacity_factor: float = 1.5
    eval_capacity_factor: float = 2.0
    min_capacity: int = 0
    combine: str = "soft"
    balance_loss: str = "switch"
    use_residual: bool = False
    modality_loss_coef: float = 0.0
    detach_router_input: bool = False
    aux_loss_coef: float = 0.01
    router_init: str = "random"
    router_init_batches: int = 4
    router_init_confidence: float = 0.9
    router_lr: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.placement, str) and self.placement not in PLACEMENTS:
            raise ConfigError(
                f"evf.placement={self.placement!r}: use one of {PLACEMENTS} or a list of layer indices."
            )
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"evf.router_init={self.router_init!r}: use one of {list(ROUTER_INITS)}.")
        if self.router_init_batches < 1:
            raise ConfigError(f"evf.router_init_batches={self.router_init_batches} must be >= 1.")
        if not 0.5 < self.router_init_confidence < 1:
            raise ConfigError(
                f"evf.router_init_confidence={self.router_init_confidence} must lie in (0.5, 1)."
            )
        if self.router_lr is not None and not self.router_lr > 0:
            raise ConfigError(
                f"evf.router_lr={self.router_lr} must be > 0 (or null for training.learning_rate)."
            )
        EvfConfig.from_dict(self.options())  # the same checks as the model's

    def options(self) -> dict:
        """The `EvfConfig` options (what the model saves)."""
        out = dataclasses.asdict(self)
        for key in TRAINING_ONLY:
            out.pop(key)
        return out


@dataclass
class TrainingSpec:
    """Optimisation settings, passed to transformers' `TrainingArguments`.

    Attributes:
        output_dir: Where checkpoints and the final model are written.
        num_train_epochs: Epochs (ignored when max_steps > 0).
        max_steps: Total optimiser steps; -1 for epochs.
        per_device_train_batch_size: Micro-batch per process.
        gradient_accumulation_steps: Micro-batches per optimiser step.
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: Share of steps spent warming up.
        lr_scheduler_type: transformers scheduler name (cosine).
        logging_steps: Log every N steps.
        save_steps: Checkpoint every N steps (0: only at the end).
        save_total_limit: Checkpoints kept.
        seed: Random seed.
        bf16: Mixed precision: compute under bfloat16 autocast; the trainable weights stay fp32.
        gradient_checkpointing: Recompute activations in backward.
        report_to: `none`, `tensorboard`, ...
        dataloader_num_workers: Data-loading worker processes.
        ddp_timeout: Seconds a process of a multi-process run waits for the others, e.g. while the main
            process prepares the data cache.
        vocabulary_loss_coef: Weight of the caption-word loss (a model with `vocabulary_mixture` only; ours,
            not the paper's): the image tokens' mixture weights are pulled towards the words of the row's
            targets. Set per stage; 0 = off.
        resume_from_checkpoint: `auto` resumes from the newest checkpoint in output_dir if any; a path; or null.
    """

    output_dir: str = "runs/eve"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: int | None = 2
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    report_to: str = "none"
    dataloader_num_workers: int = 0
    ddp_timeout: int = 1800
    vocabulary_loss_coef: float = 0.0
    resume_from_checkpoint: str | None = "auto"


@dataclass
class Recipe:
    """A whole stage recipe."""

    stage: int
    model: ModelSpec
    data: DataSpec
    trainable: list[TrainableRule]
    training: TrainingSpec = field(default_factory=TrainingSpec)
    lora: LoraSpec | None = None
    evf: EvfSpec | None = None
    expect_trainable: int | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage}: use 1, 2 or 3.")
        if not self.trainable:
            raise ConfigError("trainable is empty; list at least one parameter-name regex.")
        if self.evf is not None and self.stage != 3:
            raise ConfigError(f"evf is a stage-3 section, but stage={self.stage}.")
        if self.lora is not None and self.stage == 1:
            raise ConfigError("lora is a stage-2 section; stage 1 trains the projector only.")
        coef = self.training.vocabulary_loss_coef
        if coef < 0:
            raise ConfigError(f"training.vocabulary_loss_coef={coef}: use a weight >= 0 (0 = off).")
        if coef > 0 and self.model.init_from is None and not self.model.vocabulary_mixture:
            raise ConfigError(
                f"training.vocabulary_loss_coef={coef}: the caption-word loss needs model.vocabulary_mixture: "
                "true; set one or the other."
            )
        if self.model.dtype == "bfloat16" and not self.training.bf16:
            raise ConfigError(
                "model.dtype=bfloat16 keeps the frozen weights in bf16 and trains fp32 copies of the trainable "
                "ones, which needs bf16 compute: set training.bf16: true (or model.dtype: float32)."
            )


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _scalar(tp, value, path: str):
    """`value` checked against the field's scalar type (`float` also takes ints and YAML 1.1 strings such as
    `3e-3`, which PyYAML leaves as text); other types pass through."""
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, bool, str) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}.")
    return value


def build(cls, data, where: str):
    """Builds dataclass `cls` from `data`, recursing into nested dataclasses and lists of them."""
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping, got {type(data).__name__} {data!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {unknown} in {where or 'the recipe top level'}; known keys: {sorted(known)}."
        )
    kwargs = {}
    for name, value in data.items():
        tp = _unwrap_optional(hints[name])
        path = f"{where}.{name}" if where else name
        if value is not None and dataclasses.is_dataclass(tp):
            value = build(tp, value, path)
        elif value is not None and typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            if dataclasses.is_dataclass(item):
                value = [build(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        elif value is not None:
            value = _scalar(tp, value, path)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or 'recipe'}: {err}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override {item!r} is not of the form section.key=value.")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r}: {part} is not a section.")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads, overrides and validates a recipe YAML.

    Raises:
        ConfigError: naming the file and the key at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Recipe {path} is not valid YAML: {err}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return build(Recipe, data, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
