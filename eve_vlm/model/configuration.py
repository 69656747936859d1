"""`EveConfig`: the configuration of an Eve vision-language model.

It nests a `vision_config` (any Hugging Face vision tower: CLIP, SigLIP, DINOv2, ...) and a `text_config` (any
causal LM whose decoder layers have `.mlp`), like transformers' `LlavaConfig`, and adds the projector, the
image-placeholder token and, once stage 3 has run, the Elastic Vision FFN options (`evf`).

The number of image tokens per image is derived, never stored: image size / patch size gives the patch grid,
and the projector maps the grid to its output grid (see `projector.num_projected_tokens`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from eve_vlm.errors import ConfigError
from eve_vlm.model.evf import validate_options
from eve_vlm.model.projector import PROJECTOR_KINDS, num_projected_tokens

PLACEMENTS = ("alternate", "all", "first_half", "second_half")


@dataclass
class EvfConfig:
    """Options of the Elastic Vision FFN layers inserted in stage 3 (eve-method.md section 2).

    Attributes:
        layers: Indices of the decoder layers whose FFN is an EVF.
        num_experts: Experts per EVF layer; expert 0 is the frozen language FFN.
        top_k: Experts chosen per token.
        allocation: Token-allocation policy deciding which tokens an over-full expert keeps
            (`rts`, `position`, `bpr`, `gbpr`, `img_gbpr`, `modality`).
        capacity_factor: Capacity factor in training mode.
        eval_capacity_factor: Capacity factor in eval mode (2.0 keeps every token when num_experts=2).
        min_capacity: Lower bound on the per-expert capacity.
        combine: `soft` (expert output times router probability), `hard` (weight 1) or
            `straight_through` (weight 1 in the forward, the soft weight's gradient to the router).
        balance_loss: `switch`, `l1` or `none`.
        use_residual: DeepSpeed residual MoE: mix the MoE output with the dense language FFN.
        modality_loss_coef: Weight of the auxiliary modality routing loss in training (0 = off, the paper's
            router); see `ElasticVisionFFN`.
        detach_router_input: The router reads detached hidden states, so the routing losses train the router
            alone (False = the paper's); see `ElasticVisionFFN`.
    """

    layers: list[int] = field(default_factory=list)
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

    def __post_init__(self) -> None:
        validate_options(
            num_experts=self.num_experts,
            top_k=self.top_k,
            allocation=self.allocation,
            capacity_factors={
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
            },
            min_capacity=self.min_capacity,
            combine=self.combine,
            balance_loss=self.balance_loss,
            modality_loss_coef=self.modality_loss_coef,
        )
        self.layers = sorted({int(i) for i in self.layers})

    @classmethod
    def from_dict(cls, options: dict) -> EvfConfig:
        """Builds from a plain dict, naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"Unknown EVF option(s) {unknown}; known options are {sorted(known)}.")
        return cls(**options)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_placement(placement: str | list[int], num_layers: int) -> list[int]:
    """Turns a placement (`alternate`, `all`, `first_half`, `second_half` or explicit indices) into indices.

    Raises:
        ConfigError: for an unknown placement name or an index outside `[0, num_layers)`.
    """
    if isinstance(placement, str):
        named = {
            "alternate": range(0, num_layers, 2),
            "all": range(num_layers),
            "first_half": range(num_layers // 2),
            "second_half": range(num_layers // 2, num_layers),
        }
        if placement not in named:
            raise ConfigError(
                f"EVF placement {placement!r} is unknown; use one of {PLACEMENTS} or a list of ints."
            )
        return list(named[placement])
    layers = sorted({int(i) for i in placement})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"EVF layer index(es) {bad} out of range: the language model has {num_layers} decoder layers "
            f"(valid indices 0..{num_layers - 1})."
        )
    if not layers:
        raise ConfigError("EVF placement is an empty list; give at least one decoder layer index.")
    return layers


class EveConfig(PreTrainedConfig):
    r"""Configuration of `EveForConditionalGeneration`.

    Args:
        vision_config: Config of the vision tower (any `AutoModel` vision model); default DINOv2.
        text_config: Config of the causal LM (any `AutoModelForCausalLM`); default Llama.
        image_size: Input image side in pixels; defaults to `vision_config.image_size`. It need not be a
            multiple of the patch size (see `patch_grid`).
        vision_feature_layer: Hidden-state index taken from the vision tower (-2: penultimate), or a list of
            indices whose features are concatenated on the channel axis (as transformers' Llava allows), e.g.
            `[0, -2]` to give the projector the patch embeddings, where colour is linear, next to deep features.
        vision_feature_norm: Standardise each patch feature (LayerNorm without parameters) before the
            projector.
        projector_type: `mlp2x_gelu`, `ldp` or `ldpv2`.
        projector_grid: Output grid side of `ldpv2`.
        vocabulary_mixture: Turn each projected image token into a mixture of the LM's input word embeddings
            (`VocabularyMixture`; ours, not the paper's); off: the projector's output goes to the LM as is.
        vocabulary_loss_coef: Weight of the caption-word loss on the mixture weights, added to the loss in
            training mode only (`caption_word_loss`; needs `vocabulary_mixture`); 0 = off. Each stage sets it
            from its recipe's `training.vocabulary_loss_coef`.
        image_token: Text of the image placeholder.
        image_token_id: Token id of the placeholder (set by the processor builder).
        freeze_vision_tower: Keep the tower frozen (the default, as in the paper).
        lora: peft `LoraConfig` options once stage 2 has added unmerged LoRA adapters, else None.
        evf: `EvfConfig` options as a dict once stage 3 has inserted EVF layers, else None.
        aux_loss_coef: Weight of the summed balance loss in the training loss.
        base_language_model: The base LLM the model was built from at stage 1, `{"path", "sha256"}` (the
            folder and `assets.weights_sha256` of its weights), the reference of `eve eval language`; None
            for a model built in memory.
    """

    model_type = "eve"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }
    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_size: int | None = None
    vision_feature_layer: int | list[int] = -2
    vision_feature_norm: bool = False
    projector_type: str = "mlp2x_gelu"
    projector_grid: int | None = None
    vocabulary_mixture: bool = False
    vocabulary_loss_coef: float = 0.0
    image_token: str = "<image>"
    image_token_id: int | None = None
    freeze_vision_tower: bool = True
    lora: dict | None = None
    evf: dict | None = None
    aux_loss_coef: float = 0.01
    base_language_model: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.image_size is None:
            self.image_size = int(self.vision_config.image_size)
        self.validate_eve()

    def validate_eve(self) -> None:
        """Checks the Eve-specific fields; raises `ConfigError` naming the key at fault."""
        if self.projector_type not in PROJECTOR_KINDS:
            raise ConfigError(
                f"projector_type={self.projector_type!r} is unknown; choose one of {sorted(PROJECTOR_KINDS)}."
            )
        if self.vocabulary_loss_coef < 0:
            raise ConfigError(
                f"vocabulary_loss_coef={self.vocabulary_loss_coef}: use a weight >= 0 (0 = off)."
            )
        if self.vocabulary_loss_coef > 0 and not self.vocabulary_mixture:
            raise ConfigError(
                f"vocabulary_loss_coef={self.vocabulary_loss_coef}: the caption-word loss needs "
                "vocabulary_mixture: true; set vocabulary_loss_coef to 0 or turn the mixture on."
            )
        patch = int(self.vision_config.patch_size)
        if self.image_size < patch:
            raise ConfigError(
                f"image_size={self.image_size} is smaller than the vision tower's patch_size={patch}; use at "
                f"least {patch}."
            )
        num_layers = int(self.vision_config.num_hidden_layers)
        layers = self.vision_feature_layers
        if not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and -num_layers - 1 <= i <= num_layers
            for i in layers
        ):
            raise ConfigError(
                f"vision_feature_layer={self.vision_feature_layer} must be an index (or a non-empty list of "
                f"indices) into the tower's {num_layers + 1} hidden states."
            )
        num_projected_tokens(self.projector_type, self.patch_grid, self.projector_grid)  # validates the grid
        if self.evf is not None:
            evf = self.evf_config
            resolve_placement(evf.layers, int(self.text_config.num_hidden_layers))

    @property
    def vision_feature_layers(self) -> list[int]:
        """`vision_feature_layer` as a list."""
        layer = self.vision_feature_layer
        return list(layer) if isinstance(layer, (list, tuple)) else [layer]

    @property
    def vision_feature_size(self) -> int:
        """Channels of the features the projector receives: the tower's width times the layers taken."""
        return int(self.vision_config.hidden_size) * len(self.vision_feature_layers)

    @property
    def patch_grid(self) -> int:
        """Side of the square patch grid the vision tower produces: image_size // patch_size.

        A size that is not a multiple of the patch is used as the tower itself uses it: its patch embedding is a
        convolution with stride = kernel = patch, which drops the last image_size % patch pixel rows and
        columns (SigLIP-so400m at 384 px with 14-px patches gives the 27 x 27 grid of its 729 position
        embeddings, and the right and bottom 6 px are not seen).
        """
        return self.image_size // int(self.vision_config.patch_size)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image: the projector's output length."""
        return num_projected_tokens(self.projector_type, self.patch_grid, self.projector_grid)

    @property
    def evf_config(self) -> EvfConfig | None:
        """The EVF options as a typed dataclass, or None before stage 3."""
        return None if self.evf is None else EvfConfig.from_dict(dict(self.evf))
