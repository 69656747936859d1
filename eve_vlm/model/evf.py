"""Elastic Vision FFN (EVF): the decoder FFN turned into a small mixture of experts for image tokens.

Expert 0 is the language model's own FFN (the same module object, frozen); experts 1..E-1 are trainable vision
FFNs, by default copies of it. A router `Linear(D, E, bias=False)` (`Router`: fp32 weights, fp32 logits under
autocast too) scores every token; the experts are chosen by top-k (`allocation.assign_experts`), a
token-allocation policy (`allocation.py`) decides which assignments an over-full expert keeps, and the kept
ones are dispatched by gathers on the token dimension (`dispatch.py`: one `index_select` grouping the tokens
by expert, one with the inverse permutation back), so the cost is linear in the number of tokens; dropped
tokens get 0 from the expert branch.

Elastic guarantee: when a batch has no image token, the output is `language_ffn(hidden_states)` itself,
bit for bit (no router, no weight, no residual mix), so the text path of the language model is unchanged.

Two calls: `route(hidden_states, image_mask, ...)` returns an `EVFOutput` (output, balance loss, statistics);
`forward(hidden_states)` is the FFN-slot call a decoder layer makes (`self.mlp(hidden_states)`), which routes
with the `RoutingInputs` its layer bound for that call (see `decoder_layer.py`) and returns the output tensor.

Shape letters: B batch, T tokens per sequence, D hidden size, S = B * T flattened tokens, E experts,
K experts chosen per token (top_k).

Derived from DeepSpeed `deepspeed/moe/sharded_moe.py` (top1gating: capacity, RTS, soft combine weight =
router probability, Switch balance loss `l_aux`; `deepspeed/moe/layer.py` `use_residual`), MoE-LLaVA
(Lin et al. 2024) and Eve (Rang et al. 2025, arXiv 2501.04322) for the layer placement and the frozen
language expert, and V-MoE (Riquelme et al. 2021) for batch-prioritized routing. Our readings, not fixed by the
paper or its code: the `l1` balance loss, the GBPR / Img-GBPR / per-sequence BPR policies, renormalising the
combine weights over the k chosen experts for top_k > 1, and the routing statistics.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eve_vlm.errors import ConfigError
from eve_vlm.model.allocation import ALLOCATION_POLICIES, assign_experts, expert_capacity, get_policy
from eve_vlm.model.dispatch import RoutingStats, dispatch, routing_stats
from eve_vlm.model.lora import adapters_disabled, lora_layers

__all__ = ["EVFOutput", "ElasticVisionFFN", "Router", "RoutingInputs", "RoutingRecorder", "RoutingStats"]

COMBINE_MODES = ("soft", "hard", "straight_through")
BALANCE_LOSSES = ("switch", "l1", "none")
ROUTER_INIT_STD = 0.02


class Router(nn.Linear):
    """The EVF router, `Linear(D, E, bias=False)` created in fp32, whose logits are computed in fp32 whatever the
    input's dtype, under autocast too (autocast would run a linear layer in bf16/fp16, whatever its inputs).

    Being a module call (not a read of `weight`), it goes through the hooks accelerate adds for `device_map`
    and offloading. `EveForConditionalGeneration._keep_in_fp32_modules_strict` keeps it fp32 on load.
    """

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__(hidden_size, num_experts, bias=False, dtype=torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., E) fp32 logits."""
        if not torch.is_autocast_enabled(x.device.type):
            return F.linear(x.float(), self.weight.float())
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


class Binding:
    """The context manager `ElasticVisionFFN.bind` returns: sets the EVF's bound routing inputs on entry and
    puts the previous ones back on exit. A plain class writing the instance dict (not a generator through
    `nn.Module.__setattr__`): it runs twice per EVF layer and decoding step."""

    __slots__ = ("evf", "previous", "value")

    def __init__(self, evf: ElasticVisionFFN, value: tuple[RoutingInputs, int] | None) -> None:
        self.evf = evf
        self.value = value
        self.previous = None

    def __enter__(self) -> None:
        state = self.evf.__dict__
        self.previous = state["_bound"]
        state["_bound"] = self.value

    def __exit__(self, *exc) -> None:
        self.evf.__dict__["_bound"] = self.previous


@dataclass
class EVFOutput:
    """Output of `ElasticVisionFFN.forward`.

    Attributes:
        hidden_states: [B, T, D] FFN output, same dtype as the input.
        aux_loss: 0-dim balance loss (carries gradient to the router; zero when no balance loss applies).
        stats: Routing statistics (None when not asked for: `route(..., with_stats=False)`).
        router_loss: 0-dim modality routing loss, already weighted by `modality_loss_coef` (None when that
            coefficient is 0 or the layer is not training).
    """

    hidden_states: Tensor
    aux_loss: Tensor
    stats: RoutingStats | None
    router_loss: Tensor | None = None


class RoutingRecorder:
    """Collects the `EVFOutput` of every EVF layer during one forward pass of the model.

    Only the first record per layer is kept, so a gradient-checkpointing recompute does not overwrite it.
    """

    def __init__(self) -> None:
        self.outputs: dict[int, EVFOutput] = {}

    def record(self, layer_idx: int, output: EVFOutput) -> None:
        self.outputs.setdefault(layer_idx, output)


@dataclass(frozen=True)
class RoutingInputs:
    """What an EVF needs besides the hidden states, for one forward pass of the decoder.

    Attributes:
        image_mask: [B, T] bool, True at image tokens.
        has_image: [B] bool, whether each sequence holds an image, its KV cache included (None: from
            `image_mask`).
        token_mask: [B, T] bool, False at padding (None: no padding).
        recorder: Where each EVF layer records its `EVFOutput` (None: not recorded).
    """

    image_mask: Tensor
    has_image: Tensor | None = None
    token_mask: Tensor | None = None
    recorder: RoutingRecorder | None = None


class ElasticVisionFFN(nn.Module):
    """Mixture of a frozen language FFN (expert 0) and trainable vision FFNs (experts 1..E-1).

    Args:
        language_ffn: The language model's FFN. Kept as `self.language_ffn` (the same object, not a copy)
            and frozen in place: its parameters get `requires_grad=False`.
        vision_ffn: FFN of expert 1 (experts 2.. are copies of it); None = deep copies of `language_ffn`.
            Vision FFNs are made trainable. Experts are called on [1, n, D] gathered tokens, so they must
            act token by token (any FFN does).
        hidden_size: D.
        num_experts: E >= 2, the language FFN included.
        top_k: Experts per token, 1..E.
        allocation: Token-allocation policy, a key of `ALLOCATION_POLICIES`.
        capacity_factor: Capacity factor in training mode (`self.training`).
        eval_capacity_factor: Capacity factor in eval mode; 2.0 with E=2 drops nothing.
        min_capacity: Lower bound on the per-expert capacity.
        combine: `soft`: expert output times the router probability of that expert (DeepSpeed; not
            renormalised for top_k=1, renormalised over the k chosen experts for top_k > 1);
            `hard`: weight 1 (top_k=1 only), so the router learns from the balance loss alone;
            `straight_through`: `p / p.detach()`, worth 1 in the forward (the layer computes what `hard`
            computes, so inserting copies of the FFN changes nothing) while the router gets the gradient the
            soft weight `p` would give, scaled by 1/p (top_k=1 only; our option, not in DeepSpeed).
        balance_loss: `switch`: `E * sum_e(mean_prob_e * fraction_e)`; `l1`: `sum_e |mean_prob_e -
            fraction_e|`; `none`. fraction_e = share of tokens whose first choice is e, before capacity.
            Always 0 with `modality` allocation.
        use_residual: DeepSpeed residual MoE: `c0 * moe(x) + c1 * language_ffn(x)` with
            `c = softmax(coefficient(x))`; `coefficient` is created in the language FFN's dtype.
        modality_loss_coef: Weight of an auxiliary routing loss in training mode [ours, not the paper's]: the
            mean cross-entropy of the router against the image mask (image tokens -> the vision experts
            together, text tokens -> the language FFN). 0 (default) = the paper's plain router.
        detach_router_input: The router reads the hidden states detached [ours, not the paper's]: the balance
            and modality losses, and the router's share of the language-model loss, train the router alone,
            not the layers below it (the projector, earlier vision FFNs), which then learn from the
            language-model loss alone. False (default) = the paper's router, whose gradient reaches them.
        seed: Seed of a private CPU generator for the `rts` policy; None = torch's global RNG. Under
            activation checkpointing keep None: checkpointing restores the global RNG state for the
            recompute, not a private generator's, so a seeded `rts` would pick other tokens on recompute.

    Raises:
        ConfigError: An option is out of range or unknown.
    """

    def __init__(
        self,
        *,
        language_ffn: nn.Module,
        vision_ffn: nn.Module | None = None,
        hidden_size: int,
        num_experts: int = 2,
        top_k: int = 1,
        allocation: str = "img_gbpr",
        capacity_factor: float = 1.5,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 0,
        combine: str = "soft",
        balance_loss: str = "switch",
        use_residual: bool = False,
        modality_loss_coef: float = 0.0,
        detach_router_input: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        validate_options(
            num_experts=num_experts,
            top_k=top_k,
            allocation=allocation,
            capacity_factors={
                "capacity_factor": capacity_factor,
                "eval_capacity_factor": eval_capacity_factor,
            },
            min_capacity=min_capacity,
            combine=combine,
            balance_loss=balance_loss,
            modality_loss_coef=modality_loss_coef,
        )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.allocation = allocation
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.combine = combine
        self.balance_loss = balance_loss
        self.use_residual = use_residual
        self.modality_loss_coef = modality_loss_coef
        self.detach_router_input = detach_router_input
        self._policy = get_policy(allocation)
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

        self.language_ffn = language_ffn.requires_grad_(False)
        first = vision_ffn if vision_ffn is not None else copy.deepcopy(language_ffn)
        vision = [first] + [copy.deepcopy(first) for _ in range(num_experts - 2)]
        self.vision_ffns = nn.ModuleList(ffn.requires_grad_(True) for ffn in vision)
        self.router = Router(hidden_size, num_experts)
        ffn_dtype = next(language_ffn.parameters()).dtype
        self.coefficient = nn.Linear(hidden_size, 2, dtype=ffn_dtype) if use_residual else None
        self._bound: tuple[RoutingInputs, int] | None = None
        self.reset_parameters()

    def set_allocation(self, allocation: str) -> None:
        """Switches the token-allocation policy (e.g. to compare policies on a trained model)."""
        validate_options(
            num_experts=self.num_experts,
            top_k=self.top_k,
            allocation=allocation,
            capacity_factors={"capacity_factor": self.capacity_factor},
            min_capacity=self.min_capacity,
            combine=self.combine,
            balance_loss=self.balance_loss,
        )
        self.allocation = allocation
        self._policy = get_policy(allocation)

    @property
    def experts(self) -> list[nn.Module]:
        """All experts, language FFN first: `[language_ffn, *vision_ffns]`."""
        return [self.language_ffn, *self.vision_ffns]

    def reset_parameters(self) -> None:
        """Initialise the router to N(0, 0.02^2) (small logits, near-uniform but untied probabilities) and the
        residual coefficient layer to PyTorch's Linear default. The FFNs are left as they are."""
        nn.init.normal_(self.router.weight, std=ROUTER_INIT_STD)
        if self.coefficient is not None:
            self.coefficient.reset_parameters()

    def forward(self, hidden_states: Tensor) -> Tensor:
        """The call a decoder layer makes on its FFN, `mlp(hidden_states)`: (B, T, D) -> (B, T, D).

        Routes with the `RoutingInputs` that the layer bound for this call (`bind`), records the `EVFOutput` in
        their recorder, and returns its hidden states. With nothing bound (the language model run on its own)
        there is no image: the output is `language_ffn(hidden_states)`.
        """
        bound = self._bound
        if bound is None:
            return self.language_output(hidden_states)
        inputs, layer_idx = bound
        recorder = inputs.recorder
        if recorder is None and hidden_states.shape[:2] == (1, 1) and inputs.token_mask is None:
            return self._one_token(hidden_states, inputs)
        out = self.route(
            hidden_states,
            inputs.image_mask,
            inputs.has_image,
            inputs.token_mask,
            with_stats=recorder is not None,
        )
        if recorder is not None:
            recorder.record(layer_idx, out)
        return out.hidden_states

    def language_lora_layers(self) -> list:
        """The LoRA layers of the language FFN, found once (a module walk per call costs ~1 ms per decoding
        step over 15 EVF layers); `forget_lora_layers` clears it when LoRA is added or merged."""
        cached = self.__dict__.get("_language_lora_cache")
        if cached is None:
            cached = self.__dict__["_language_lora_cache"] = lora_layers(self.language_ffn)
        return cached

    def forget_lora_layers(self) -> None:
        """Clears `language_lora_layers` (after LoRA layers were added to or merged out of the language FFN)."""
        self.__dict__.pop("_language_lora_cache", None)

    def _one_token(self, hidden_states: Tensor, inputs: RoutingInputs) -> Tensor:
        """A decoding step of one sequence, nothing recorded: what `route` computes for it, without its batch
        bookkeeping. One token can never exceed a capacity (at least 1 per expert, and its top-k experts are
        distinct), so no policy runs. Without gradients and with top-1 routing the choice is made on the E router
        logits as Python numbers (one host read), the expert runs on the [1, 1, D] input as it is, and the output
        is scaled only by a soft combine: on a 2-core CPU each tensor operation costs about 2% of a SmolLM2-135M
        FFN on one token."""
        has_image = inputs.image_mask.any() if inputs.has_image is None else inputs.has_image
        if not bool(has_image):
            return self.language_output(hidden_states)
        if self.top_k > 1 or self.coefficient is not None or torch.is_grad_enabled():
            x = hidden_states[0]  # (1, D)
            probs = self.router(x).softmax(dim=-1)
            expert_idx, weights = assign_experts(
                probs, inputs.image_mask[0], top_k=self.top_k, allocation=self.allocation
            )
            out = self._with_residual(
                x, dispatch(self.experts, x, expert_idx, None, self._combine_weights(weights))
            )
            return out.unsqueeze(0)
        logits = self.router(hidden_states).tolist()[0][0]  # E floats
        if self.allocation == "modality":  # hard routing by modality, weight 1 (see `assign_experts`)
            if not bool(inputs.image_mask.any()):
                return self.language_ffn(hidden_states)
            return self.vision_ffns[max(range(1, self.num_experts), key=logits.__getitem__) - 1](
                hidden_states
            )
        expert = max(range(self.num_experts), key=logits.__getitem__)  # the first maximum, as `topk`
        out = (self.language_ffn if expert == 0 else self.vision_ffns[expert - 1])(hidden_states)
        if self.combine != "soft":  # `hard` and `straight_through` weigh the output by 1 in the forward pass
            return out
        top = logits[expert]
        return out * (1.0 / sum(math.exp(value - top) for value in logits))  # the softmax probability

    def language_output(self, hidden_states: Tensor) -> Tensor:
        """`language_ffn(hidden_states)`, the base LLM's FFN: a LoRA adapter on it (stage 2) is off. Nothing
        else is computed."""
        layers = self.__dict__.get("_language_lora_cache")
        if layers is None:
            layers = self.language_lora_layers()
        if not layers or all(
            layer.disable_adapters for layer in layers
        ):  # none, or off (the model's text path)
            return self.language_ffn(hidden_states)
        with adapters_disabled(layers):
            return self.language_ffn(hidden_states)

    @property
    def bound_inputs(self) -> RoutingInputs | None:
        """The routing inputs bound for the current call (`bind`), or None outside one."""
        return None if self._bound is None else self._bound[0]

    def bind(self, inputs: RoutingInputs | None, layer_idx: int) -> Binding:
        """Makes `inputs` the routing inputs of the `forward` calls inside the `with` block (`layer_idx` keys the
        recorded output); the previous binding is restored on exit."""
        return Binding(self, None if inputs is None else (inputs, layer_idx))

    def route(
        self,
        hidden_states: Tensor,
        image_mask: Tensor,
        has_image: Tensor | None = None,
        token_mask: Tensor | None = None,
        with_stats: bool = True,
    ) -> EVFOutput:
        """Route, allocate, dispatch and combine.

        Args:
            hidden_states: [B, T, D].
            image_mask: [B, T] bool, True at image tokens.
            has_image: [B] bool, whether each sequence holds an image (its KV cache included); default
                `image_mask.any(dim=1)`. Sequences without one take the language FFN with weight 1, so a
                text-only request gives the base LLM's output even inside a batch with images; during KV-cache
                decoding the model passes True for image requests, whose new tokens are text but routed.
            token_mask: [B, T] bool, False at padding positions (default: no padding). Padding takes the
                language FFN with weight 1 and is left out of routing, capacity, the balance and modality
                losses and the statistics, so a row's output does not depend on how much padding its batch has.
            with_stats: Build the routing statistics (`EVFOutput.stats`; None without them). The model asks for
                them when it records routing (training, or `output_routing=True`).

        Returns:
            `EVFOutput`; for sequences without an image, `language_ffn(hidden_states)` exactly.
        """
        device = hidden_states.device  # the masks come from the embedding's device under a device map
        image_mask = image_mask.to(device)
        has_image = image_mask.any(dim=1) if has_image is None else has_image.to(device)
        token_mask = None if token_mask is None else token_mask.to(device)
        if not bool(has_image.any()):
            if not with_stats:
                return EVFOutput(self.language_output(hidden_states), self._zero(hidden_states), None)
            return self._language_only(hidden_states, token_mask)
        if bool(has_image.all()):
            return self._routed(hidden_states, image_mask, token_mask, with_stats)
        rows, other = (None, None) if token_mask is None else (token_mask[has_image], token_mask[~has_image])
        routed = self._routed(hidden_states[has_image], image_mask[has_image], rows, with_stats)
        out = torch.empty_like(hidden_states, dtype=routed.hidden_states.dtype)
        out[has_image] = routed.hidden_states
        if not with_stats:
            out[~has_image] = self.language_output(hidden_states[~has_image]).to(out.dtype)
            return EVFOutput(out, routed.aux_loss, None, routed.router_loss)
        text = self._language_only(hidden_states[~has_image], other)
        out[~has_image] = text.hidden_states.to(out.dtype)
        stats = routed.stats.plus_language_only(text.stats)
        return EVFOutput(out, routed.aux_loss, stats, routed.router_loss)

    def _routed(
        self, hidden_states: Tensor, image_mask: Tensor, token_mask: Tensor | None, with_stats: bool
    ) -> EVFOutput:
        batch, seq_len, dim = hidden_states.shape
        x = hidden_states.reshape(batch * seq_len, dim)  # (S, D)
        mask = image_mask.reshape(-1).to(torch.bool)  # (S,)
        valid = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        if valid is None or bool(valid.all()):
            out, aux, stats, router_loss = self._route_tokens(x, mask, (batch, seq_len, None), with_stats)
            return EVFOutput(out.view(batch, seq_len, dim), aux, stats, router_loss)
        real = valid.nonzero().squeeze(1)  # (N,) routed positions
        pad = (~valid).nonzero().squeeze(1)
        routed, aux, stats, router_loss = self._route_tokens(
            x[real], mask[real], (batch, seq_len, real), with_stats
        )
        out = torch.empty_like(x, dtype=routed.dtype)
        out[real] = routed
        out[pad] = self.language_ffn(x[pad].unsqueeze(0)).squeeze(0).to(out.dtype)
        return EVFOutput(out.view(batch, seq_len, dim), aux, stats, router_loss)

    def _route_tokens(
        self, x: Tensor, mask: Tensor, layout: tuple[int, int, Tensor | None], with_stats: bool
    ) -> tuple[Tensor, Tensor, RoutingStats | None, Tensor | None]:
        """Routes the S tokens `x` [S, D] (image mask [S]; `layout` = (batch, sequence length, positions of
        the S tokens in the flattened batch, None = all), from which each token's sequence is found when a
        policy needs it): `(out [S, D], aux loss, statistics or None, modality loss or None)`.

        When the capacity is at least the number of assignments no expert can be over it, so the policy is
        not run and every assignment is kept (what any policy would keep): the eval-mode case with two
        experts, and every decoding step."""
        logits = self.router(x.detach() if self.detach_router_input else x)  # (S, E) fp32
        probs = logits.softmax(dim=-1)
        expert_idx, weights = assign_experts(probs, mask, top_k=self.top_k, allocation=self.allocation)
        capacity = self._capacity(expert_idx.numel())
        keep = None
        if capacity < expert_idx.numel():
            batch, seq_len, positions = layout
            sequence_ids = torch.arange(batch, device=x.device).repeat_interleave(seq_len)  # (B*T,)
            if positions is not None:
                sequence_ids = sequence_ids[positions]
            keep = self._policy(
                probs, expert_idx, mask, capacity, sequence_ids=sequence_ids, generator=self._generator
            )
        out = self._with_residual(
            x, dispatch(self.experts, x, expert_idx, keep, self._combine_weights(weights))
        )
        stats = (
            routing_stats(expert_idx, keep, mask, self.num_experts, capacity, probs) if with_stats else None
        )
        router_loss = None
        if self.modality_loss_coef > 0 and self.training:
            router_loss = self.modality_loss_coef * modality_routing_loss(logits, mask)
        aux = self._balance_loss(probs, expert_idx) if with_stats or self.training else self._zero(x)
        return out, aux, stats, router_loss

    def _with_residual(self, x: Tensor, out: Tensor) -> Tensor:
        """Residual MoE (`use_residual`): `c0 * out + c1 * language_ffn(x)`; otherwise `out`."""
        if self.coefficient is None:
            return out
        coef = self.coefficient(x).softmax(dim=-1)  # (S, 2)
        dense = self.language_ffn(x.unsqueeze(0)).squeeze(0)
        return out * coef[:, :1] + dense * coef[:, 1:]

    @staticmethod
    def _zero(like: Tensor) -> Tensor:
        return torch.zeros((), device=like.device)

    def _language_only(self, hidden_states: Tensor, token_mask: Tensor | None = None) -> EVFOutput:
        num_tokens = hidden_states.shape[0] * hidden_states.shape[1]
        device = hidden_states.device
        zeros = torch.zeros(self.num_experts, dtype=torch.long, device=device)
        text = zeros.clone()
        text[0] = num_tokens if token_mask is None else token_mask.sum()  # padding is not counted
        stats = RoutingStats(
            zeros, text, zeros.clone(), text.clone(), num_tokens, torch.zeros((), device=device)
        )
        # The text path is the base LLM's FFN: a LoRA adapter on it (stage 2) is off for these rows.
        with adapters_disabled(self.language_lora_layers()):
            out = self.language_ffn(hidden_states)
        return EVFOutput(out, torch.zeros((), device=device), stats)

    def _capacity(self, num_assignments: int) -> int:
        if self.allocation == "modality":
            return num_assignments
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(num_assignments, self.num_experts, factor, self.min_capacity)

    def _combine_weights(self, weights: Tensor) -> Tensor | None:
        """The weights of the experts' outputs; None where every weight is 1 and carries no gradient (`hard`,
        and `straight_through` without gradients), so the outputs are not multiplied at all."""
        if self.combine == "hard" or (self.combine == "straight_through" and not torch.is_grad_enabled()):
            return None
        if self.combine == "straight_through":
            return weights / weights.detach()
        if self.top_k > 1:
            return weights / weights.sum(dim=-1, keepdim=True)
        return weights

    def _balance_loss(self, probs: Tensor, expert_idx: Tensor) -> Tensor:
        if self.balance_loss == "none" or self.allocation == "modality":
            return torch.zeros((), device=probs.device)
        mean_prob = probs.mean(dim=0)  # (E,)
        fraction = torch.bincount(expert_idx[:, 0], minlength=self.num_experts).float() / probs.shape[0]
        if self.balance_loss == "switch":
            return self.num_experts * (mean_prob * fraction).sum()
        return (mean_prob - fraction).abs().sum()


def modality_routing_loss(router_logits: Tensor, image_mask: Tensor) -> Tensor:
    """Mean cross-entropy of the router against the modality of each token [ours]: image tokens should go to
    the vision experts (1..E-1, their probabilities summed), text tokens to the language FFN (expert 0).

    Args:
        router_logits: [S, E] fp32.
        image_mask: [S] bool.
    """
    log_probs = router_logits.log_softmax(dim=-1)
    log_language = log_probs[:, 0]
    log_vision = log_probs[:, 1:].logsumexp(dim=-1)
    return -torch.where(image_mask, log_vision, log_language).mean()


def validate_options(
    *,
    num_experts,
    top_k,
    allocation,
    capacity_factors,
    min_capacity,
    combine,
    balance_loss,
    modality_loss_coef=0.0,
):
    """Raise `ConfigError` naming the first option that is out of range or unknown."""
    if num_experts < 2:
        raise ConfigError(
            f"num_experts={num_experts} must be >= 2 (the language FFN and at least one vision FFN)."
        )
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k={top_k} must be between 1 and num_experts={num_experts}.")
    if allocation not in ALLOCATION_POLICIES:
        raise ConfigError(
            f"allocation={allocation!r} is unknown; choose one of {sorted(ALLOCATION_POLICIES)}."
        )
    if allocation == "modality" and top_k != 1:
        raise ConfigError(f"top_k={top_k} is not allowed with allocation='modality'; it needs top_k=1.")
    for name, value in capacity_factors.items():
        if not value > 0:
            raise ConfigError(f"{name}={value} must be > 0.")
    if min_capacity < 0:
        raise ConfigError(f"min_capacity={min_capacity} must be >= 0.")
    if combine not in COMBINE_MODES:
        raise ConfigError(f"combine={combine!r} is unknown; choose one of {list(COMBINE_MODES)}.")
    if combine in ("hard", "straight_through") and top_k != 1:
        raise ConfigError(
            f"combine={combine!r} needs top_k=1 (got top_k={top_k}); use combine='soft' for top_k > 1."
        )
    if balance_loss not in BALANCE_LOSSES:
        raise ConfigError(f"balance_loss={balance_loss!r} is unknown; choose one of {list(BALANCE_LOSSES)}.")
    if not modality_loss_coef >= 0:
        raise ConfigError(f"modality_loss_coef={modality_loss_coef} must be >= 0.")
