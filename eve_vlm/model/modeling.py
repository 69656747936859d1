"""`EveForConditionalGeneration`: vision tower -> projector -> placeholder merge -> unmodified causal LM.

Features:
- Any transformers causal LM (`AutoModelForCausalLM`) and any vision tower (`AutoModel`), composed, not forked;
  the LM's parameter names stay those of the base model under the `language_model.` prefix.
- Image features fill the `<image>` placeholder positions with `masked_scatter` after a count check
  (as transformers' `LlavaForConditionalGeneration`); the placeholder id may lie outside the LM vocabulary.
- Stage 3 (`add_elastic_vision_ffns`) gives chosen decoder layers an `ElasticVisionFFN` as their `mlp`; the
  layers keep their family's class (as a subclass) and forward, and the image mask reaches their EVF as one
  forward argument, `evf_routing` (see `decoder_layer.py`).
- The elastic guarantee, per sequence: a sequence with no image token runs only the language FFNs with weight 1
  and without LoRA, so its logits are the base LLM's, also inside a batch with image sequences.
- Typed output: logits, loss = CE + aux_loss_coef * sum of EVF balance losses, aux loss, per-layer routing.

Derived from transformers' `models/llava/modeling_llava.py` and the Eve paper (arXiv 2501.04322).
Shapes: B batch, T tokens, N images, Ni tokens per image, D LM hidden size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from eve_vlm.errors import CheckpointError, ConfigError, ImageTokenMismatchError
from eve_vlm.model.base_view import base_view
from eve_vlm.model.configuration import EveConfig, EvfConfig, resolve_placement
from eve_vlm.model.decoder_layer import RoutingInputs, RoutingRecorder, evf_modules, insert_evf_layers
from eve_vlm.model.evf import RoutingStats
from eve_vlm.model.folder import check_eve_folder
from eve_vlm.model.lora import adapters_disabled, adapters_per_row, add_lora, lora_layers
from eve_vlm.model.projector import build_projector
from eve_vlm.model.vision import EveVisionEncoder
from eve_vlm.model.vocabulary_mixture import (
    VocabularyMixture,
    caption_word_loss,
    image_rows,
    special_token_ids,
)


class EachTime(AbstractContextManager):
    """A context manager that makes a fresh `make()` context each time it is entered (a generator-based one can
    be entered only once)."""

    def __init__(self, make: Callable[[], AbstractContextManager]):
        self.make = make
        self.entered: list[AbstractContextManager] = []

    def __enter__(self):
        context = self.make()
        self.entered.append(context)
        return context.__enter__()

    def __exit__(self, *exc):
        return self.entered.pop().__exit__(*exc)


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits a loss on `labels` needs, and the targets there.

    Args:
        labels: (B, T) targets, -100 where ignored (unshifted, as causal LMs take them).

    Returns:
        `(positions, shift_labels)`: (K,) sorted positions p whose next token `labels[:, p + 1]` is a target in
        at least one row (one set for the batch, as transformers' `logits_to_keep` takes it), and the (B, K)
        targets of those positions, -100 where a row has none there.
    """
    following = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    positions = (following != -100).any(dim=0).nonzero().squeeze(1)
    return positions, following[:, positions]


@dataclass
class EveCausalLMOutput(CausalLMOutputWithPast):
    """Output of `EveForConditionalGeneration.forward`: transformers' causal-LM output plus Eve's fields.

    Attributes:
        loss: CE + aux_loss_coef * aux_loss (+ the weighted modality routing loss of EVF layers that use one)
            when labels are given.
        logits: (B, T, V) next-token logits; (B, K, V) at the K positions kept by `logits_to_keep` (in training
            with labels, by default only the positions whose next token is a target).
        past_key_values / cache: The KV cache when `use_cache`, under the name of the installed transformers
            (`cache` from 5.24, which still reads `past_key_values`).
        aux_loss: Sum of the EVF layers' balance losses (0 without EVF layers or when routing is not recorded).
        routing: Routing statistics of each EVF layer, keyed by decoder-layer index (None when routing is not
            recorded: see `forward`'s `output_routing`).
        image_hidden_states: (N, Ni, D) projected image features when images were given.
    """

    aux_loss: torch.FloatTensor | None = None
    routing: dict[int, RoutingStats] | None = None
    image_hidden_states: torch.FloatTensor | None = None


LM_OUTPUT_FIELDS = frozenset(f.name for f in fields(CausalLMOutputWithPast)) - {"loss"}


def merge_image_features(
    inputs_embeds: torch.Tensor,  # (B, T, D)
    image_mask: torch.Tensor,  # (B, T) bool
    image_features: torch.Tensor,  # (N, Ni, D)
) -> torch.Tensor:
    """Writes the image features into the placeholder positions, in order.

    Raises:
        ImageTokenMismatchError: when the number of placeholders is not images x tokens per image.
    """
    num_images, per_image = image_features.shape[:2]
    placeholders = int(image_mask.sum())
    if placeholders != num_images * per_image:
        raise ImageTokenMismatchError(
            f"The text holds {placeholders} image placeholder tokens but {num_images} image(s) were given, which "
            f"need {num_images * per_image} ({per_image} per image). Put exactly one <image> in the text per "
            "image and let EveProcessor expand it."
        )
    mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype))


class EvePreTrainedModel(PreTrainedModel):
    config: EveConfig
    config_class = EveConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Eve adds no attention of its own: these say only that the choice may be passed on to the LM and the
    # tower, which check their own support (`from_pretrained(attn_implementation=...)`).
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # EVF routers load in fp32 whatever dtype the rest loads in (`Router` computes in fp32).
    _keep_in_fp32_modules = ["mlp.router"]
    _keep_in_fp32_modules_strict = ["mlp.router"]
    # The loss adds the EVF balance loss per micro-batch, so the Trainer must not expect a token-count-normalised
    # loss (it divides by the gradient-accumulation steps instead).
    accepts_loss_kwargs = False


class EveForConditionalGeneration(EvePreTrainedModel, GenerationMixin):
    """An Eve vision-language model.

    Args:
        config: The model configuration. With `config.evf` set, the EVF layers are built too, so a stage-3
            checkpoint loads with `from_pretrained`.
    """

    def __init__(self, config: EveConfig):
        super().__init__(config)
        self.vision_tower = EveVisionEncoder.from_config(
            config.vision_config,
            image_size=config.image_size,
            feature_layer=config.vision_feature_layers,
            feature_norm=config.vision_feature_norm,
        )
        self.projector = build_projector(
            config.projector_type,
            vision_hidden=config.vision_feature_size,
            text_hidden=int(config.text_config.hidden_size),
            grid=config.projector_grid,
        )
        self.vocabulary_mixture = VocabularyMixture() if config.vocabulary_mixture else None
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        if config.lora is not None:
            add_lora(self.language_model, config.lora)
        if config.evf is not None:
            insert_evf_layers(self.language_model, config.evf_config)
        self.post_init()  # collects the children's `_no_split_modules`, the `Evf<...>` layer classes included
        self.freeze_defaults()

    def freeze_defaults(self) -> None:
        """Freezes what the method keeps frozen: the vision tower (unless configured otherwise) and every EVF's
        language FFN. Training recipes choose the rest."""
        if self.config.freeze_vision_tower:
            self.vision_tower.requires_grad_(False)
        for evf in self.evf_layers.values():
            evf.language_ffn.requires_grad_(False)

    # --- transformers plumbing -------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # --- stage 2 ----------------------------------------------------------------------------------------------
    def add_lora(self, **options) -> None:
        """Adds unmerged LoRA adapters to the language model (stage 2); `options` are `peft.LoraConfig` fields.

        Batches without images run with the adapters off, so text-only outputs stay the base LLM's.
        """
        if self.config.lora is not None:
            raise ConfigError("This model already has LoRA adapters.")
        add_lora(self.language_model, options)
        self._forget_lora_layers()
        self.config.lora = {k: list(v) if isinstance(v, (set, tuple)) else v for k, v in options.items()}

    def merge_lora(self) -> int:
        """Merges the LoRA adapters into dense weights (the text path then changes); returns how many."""
        from eve_vlm.model.lora import merge_lora

        merged = merge_lora(self.language_model)
        self._forget_lora_layers()
        self.config.lora = None
        return merged

    # --- stage 3 ----------------------------------------------------------------------------------------------
    def add_elastic_vision_ffns(self, placement: str | list[int] = "alternate", **options) -> list[int]:
        """Turns this model into an EVF model in place (stage 3).

        Args:
            placement: `alternate` (0, 2, 4, ...), `all`, `first_half`, `second_half`, or layer indices.
            **options: `EvfConfig` fields (num_experts, top_k, allocation, capacity_factor, ...).

        Returns:
            The converted layer indices.
        """
        num_layers = int(self.config.text_config.num_hidden_layers)
        evf = EvfConfig.from_dict({**options, "layers": resolve_placement(placement, num_layers)})
        if self.config.evf is not None:
            raise ConfigError(
                "This model already has Elastic Vision FFNs; convert a plain (stage 1/2) model."
            )
        before = set(self.language_model._no_split_modules or ())
        insert_evf_layers(self.language_model, evf)
        self._forget_lora_layers()
        # As `post_init` would collect them now: the `Evf<...>` layer classes in, a class no layer has left out.
        own = set(self._no_split_modules or ()) - before
        self._no_split_modules = own | self.language_model._no_split_modules
        self.config.evf = evf.to_dict()
        return evf.layers

    @property
    def evf_layers(self) -> dict:
        """The `ElasticVisionFFN` of each EVF layer, by decoder-layer index."""
        return evf_modules(self.language_model)

    # --- forward ----------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, Ni, D) projected image tokens."""
        return self._image_tokens(pixel_values)[0]

    def _image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 3, H, W) images -> (N, Ni, D) image tokens and, with `vocabulary_mixture`, their (N, Ni, V)
        mixture weights over the vocabulary (else None)."""
        queries = self.projector(self.vision_tower(pixel_values))
        if self.vocabulary_mixture is None:
            return queries, None
        return self.vocabulary_mixture(queries, self.input_embedding_table())

    def input_embedding_table(self) -> torch.Tensor:
        """(V, D): what the LM's input embedding gives for each token id, the rows times `embed_scale` for
        transformers' scaled word embeddings (Gemma's `sqrt(D)`)."""
        embedding = self.get_input_embeddings()
        # transformers' scaled embeddings (Gemma 1-3) hold their factor as `embed_scale`; the others have none.
        scale = getattr(embedding, "embed_scale", None)
        if scale is None:
            return embedding.weight
        return embedding.weight * torch.as_tensor(scale, dtype=embedding.weight.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        has_image: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_routing: bool | None = None,
        **kwargs,  # to the language model: the KV cache (`past_key_values`, `cache` from transformers 5.24), ...
    ) -> EveCausalLMOutput:
        """Runs the model.

        Args:
            input_ids: (B, T) token ids with `image_token_id` placeholders.
            pixel_values: (N, 3, H, W), one per image, in placeholder order.
            image_mask: (B, T) bool; only needed with `inputs_embeds` (else derived from `input_ids`).
            has_image: (B,) bool, whether each sequence holds an image anywhere, the KV cache included.
                Default: whether its tokens here hold one; required (ConfigError) with a non-empty KV cache
                once the model has LoRA or EVF layers. `generate` passes it, so decoding steps after an
                image prompt keep the multimodal path (LoRA on, EVF routing) although new tokens are text.
            labels: (B, T) targets, -100 where ignored (placeholder positions are always ignored); shifted
                inside like transformers' causal LMs.
            logits_to_keep: As in transformers' causal LMs: 0 keeps every position, an int N the last N, a 1D
                tensor those positions. With labels in training mode, 0 keeps only the positions whose next
                token is a target in some row of the batch (`label_positions`): the LM head and the loss skip
                the rest (images, questions, padding), which gives the same loss for a fraction of the
                head's cost; `logits` then holds those positions only.
            output_routing: Record the EVF layers' routing: `routing` (per-layer statistics) and `aux_loss`.
                Default: in training mode (the balance loss is part of the loss), not in eval mode, where the
                EVF layers then compute only their outputs (as transformers' MoE models leave
                `output_router_logits` off for inference).
        """
        if inputs_embeds is None:
            image_mask = input_ids == self.config.image_token_id
            # The placeholder id may be outside the LM vocabulary: embed a valid id, then overwrite.
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        elif image_mask is None:
            image_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        if has_image is None:
            cache = next((v for v in kwargs.values() if isinstance(v, Cache)), None)
            multimodal = self.config.lora is not None or self.config.evf is not None
            if multimodal and cache is not None and cache.get_seq_length() > 0:
                # Whether a row holds an image is in the cache, not in this step's tokens: guessing from
                # them would run an image request's new tokens on the text path (LoRA off, no routing).
                raise ConfigError(
                    "Decoding with a non-empty KV cache needs has_image: pass has_image=(B,) bool, True for the "
                    "rows whose prompt held an image (model.generate does this itself)."
                )
            has_image = image_mask.any(dim=1)
        any_image = bool(has_image.any())  # the one host read of it

        image_features = mixture_weights = None
        if pixel_values is not None:
            image_features, mixture_weights = self._image_tokens(pixel_values)
            inputs_embeds = merge_image_features(inputs_embeds, image_mask, image_features)
        elif image_mask.any():
            raise ImageTokenMismatchError(
                f"The text holds {int(image_mask.sum())} image placeholder tokens but no pixel_values were given."
            )

        recorder = None
        record = self.training if output_routing is None else output_routing
        if self.config.evf is not None and (record or any_image):
            # Without an image and with nothing to record, nothing is bound: each EVF layer is its language FFN.
            recorder = RoutingRecorder() if record else None
            # Padding (attention_mask 0 at the new positions) takes the language FFN and is never routed.
            # Checked once here, not in every EVF layer: without padding the layers get no mask at all.
            token_mask = None
            if attention_mask is not None and attention_mask.dim() == 2:
                token_mask = attention_mask[:, -inputs_embeds.shape[1] :].to(torch.bool)
                if bool(token_mask.all()):
                    token_mask = None
            kwargs["evf_routing"] = RoutingInputs(image_mask, has_image, token_mask, recorder)
        shift_labels = None
        if labels is not None:
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)
            if self.training and isinstance(logits_to_keep, int) and logits_to_keep == 0:
                logits_to_keep, shift_labels = label_positions(labels)
        language_model = None if recorder is not None or any_image else self._base_language_model()
        with self._text_path_context(has_image) if language_model is None else nullcontext():
            out = (language_model or self.language_model)(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        aux_loss, routing, router_loss = self._collect_routing(recorder, inputs_embeds)
        loss = None
        if labels is not None:
            targets = (
                {"labels": labels} if shift_labels is None else {"labels": None, "shift_labels": shift_labels}
            )
            loss = self.language_model.loss_function(
                logits=out.logits, vocab_size=self.config.text_config.vocab_size, **targets
            )
            if self.config.evf is not None:
                loss = loss + self.config.aux_loss_coef * aux_loss
                if router_loss is not None:
                    loss = loss + router_loss
            if mixture_weights is not None and self.training and self.config.vocabulary_loss_coef > 0:
                rows = image_rows(image_mask, mixture_weights.shape[1])
                words = caption_word_loss(
                    mixture_weights, rows, labels, special_token_ids(self.config.text_config)
                )
                loss = loss + self.config.vocabulary_loss_coef * words
        # The language model's logits, cache, hidden states and attentions, under the installed version's names
        # (an LM's extra outputs, such as a MoE LM's router logits, are not carried).
        lm_fields = {key: value for key, value in out.items() if key in LM_OUTPUT_FIELDS}
        return EveCausalLMOutput(
            **lm_fields, loss=loss, aux_loss=aux_loss, routing=routing, image_hidden_states=image_features
        )

    def _text_path_context(self, has_image: torch.Tensor):
        """The elastic guarantee for LoRA, per sequence: the adapters are off for every sequence without an
        image. A batch without images runs with them switched off; a batch mixing text-only and image
        sequences applies them per row (`adapters_per_row`), so a text-only row gets the base LLM's output
        whatever its batch-mates. The LoRA layers inside EVF modules are left to the EVF, which calls them on
        regrouped tokens and runs its text rows with their adapters off. Under activation checkpointing the
        same switch is set again for each layer's recomputation in backward (`_checkpoint_contexts`)."""
        if self.config.lora is None or bool(has_image.all()):
            return nullcontext()
        layers, outside_evf = self._lora_layers()
        if not bool(has_image.any()):
            recompute = partial(adapters_disabled, layers, flags_only=True)
            return self._kept_for_recompute(partial(adapters_disabled, layers), recompute)
        per_row = partial(adapters_per_row, outside_evf, has_image)
        return self._kept_for_recompute(per_row, per_row)

    def _base_language_model(self) -> nn.Module | None:
        """For an inference call without any image: the base LLM's modules (`base_view`: the language model
        without its LoRA and EVF layers, sharing its weights), which compute what the switched text path
        computes with a Python call less per LoRA and EVF layer. None when training or computing gradients,
        or where no view can be built."""
        if self.training or torch.is_grad_enabled():
            return None
        view = self.__dict__.get("_base_view")
        if view is None or not view.current():
            view = self.__dict__["_base_view"] = base_view(self.language_model)
        return view.module

    @contextmanager
    def _kept_for_recompute(
        self, switch: Callable[[], AbstractContextManager], recompute: Callable[[], AbstractContextManager]
    ):
        """Runs the forward under `switch()` and keeps `recompute`, the same switch for a recomputation, while
        it runs, for `_checkpoint_contexts`."""
        self.__dict__["_text_path_recompute"] = recompute
        try:
            with switch():
                yield
        finally:
            self.__dict__.pop("_text_path_recompute", None)

    def _checkpoint_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """`context_fn` of every checkpointed layer call (torch's non-reentrant checkpointing calls it in the
        forward): nothing for the forward, and for the recomputation in backward, which runs after this model's
        forward has returned, the LoRA switch that forward ran under (entered anew for every recomputation: a
        graph kept with `retain_graph` is recomputed once per backward)."""
        recompute = self.__dict__.get("_text_path_recompute")
        return nullcontext(), EachTime(recompute) if recompute is not None else nullcontext()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        """transformers' activation checkpointing (non-reentrant), with each layer recomputed under the LoRA
        switch of its forward (`_checkpoint_contexts`): without it, a text-only batch's recomputation would run
        LoRA, which its forward did not. Reentrant checkpointing cannot take that context and is refused."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"] or "context_fn" in kwargs:
            raise ConfigError(
                "Eve models checkpoint activations without reentrancy and with their own context_fn (the "
                "recomputation must switch LoRA as the forward did); leave use_reentrant and context_fn unset."
            )
        kwargs["context_fn"] = self._checkpoint_contexts
        super().activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    def _forget_lora_layers(self) -> None:
        """Clears the LoRA layer lists of the model and of its EVF layers (see `_lora_layers`) and the base view
        (`_base_language_model`): the structure they were found in has changed."""
        self.__dict__.pop("_lora_layers_cache", None)
        self.__dict__.pop("_base_view", None)
        for evf in self.evf_layers.values():
            evf.forget_lora_layers()

    def _lora_layers(self) -> tuple[list, list]:
        """The language model's LoRA layers, all and those outside EVF modules, found once per structure:
        a module walk costs about 4 ms on a SmolLM2-135M model, on every decoding step. `add_lora`,
        `merge_lora` and `add_elastic_vision_ffns`, the methods that change the structure, clear it."""
        cached = self.__dict__.get("_lora_layers_cache")
        if cached is None:
            in_evf = {id(layer) for evf in self.evf_layers.values() for layer in lora_layers(evf)}
            layers = lora_layers(self.language_model)
            outside = [layer for layer in layers if id(layer) not in in_evf]
            cached = self.__dict__["_lora_layers_cache"] = (layers, outside)
        return cached

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        # `input_ids` is the whole sequence so far: remember which rows hold an image for the decoding steps.
        inputs["has_image"] = (input_ids == self.config.image_token_id).any(dim=1)
        return inputs

    @staticmethod
    def _collect_routing(
        recorder: RoutingRecorder | None, like: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, RoutingStats] | None, torch.Tensor | None]:
        """Summed balance loss, per-layer statistics and the summed (already weighted) modality routing loss
        (None when no layer computed one)."""
        zero = torch.zeros((), dtype=torch.float32, device=like.device)
        if recorder is None:
            return zero, None, None
        outputs = dict(sorted(recorder.outputs.items()))
        # Each layer's losses live on its own device when a device map spreads the layers.
        aux = sum((o.aux_loss.to(zero.device, torch.float32) for o in outputs.values()), zero)
        router = [
            o.router_loss.to(zero.device, torch.float32)
            for o in outputs.values()
            if o.router_loss is not None
        ]
        return aux, {i: o.stats for i, o in outputs.items()}, sum(router, zero) if router else None

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """`PreTrainedModel.from_pretrained`, raising `CheckpointError` on missing or unexpected weights.

        Args:
            strict: Raise when the checkpoint does not match the config (default). Pass False to get
                transformers' behaviour (missing weights freshly initialised, a warning).
        """
        want_info = kwargs.pop("output_loading_info", False)
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(where, (str, os.PathLike)) and os.path.isdir(where):
            check_eve_folder(where)  # before any allocation: a base LLM's folder would build a huge model
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model.freeze_defaults()
        if not strict:
            return (model, info) if want_info else model
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if missing or unexpected:
            raise CheckpointError(
                f"Checkpoint {where} does not match its config: {len(missing)} missing weight(s) "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''} and {len(unexpected)} unexpected weight(s) "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Check that config.json (evf, projector_type, "
                "text/vision configs) belongs to these weights, or load with strict=False."
            )
        return (model, info) if want_info else model
