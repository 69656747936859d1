"""Choosing trainable parameters by name regex, with the matched counts printed and checked.

Every parameter is frozen, then the parameters whose name matches a rule are unfrozen. Before training the
table of rules and matched counts is printed; a rule that matches nothing, or matches another count than its
`expect`, stops the run (as big_vision's `make_mask_trees` and litgpt's pinned trainable counts).

`trainable_to_fp32` then gives the chosen parameters fp32 storage (master weights), whatever dtype the frozen
rest was loaded in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from eve_vlm.errors import ConfigError
from eve_vlm.train.recipe import TrainableRule


@dataclass
class RuleMatch:
    pattern: str
    tensors: int
    parameters: int
    expect: int | None


def apply_trainable_rules(
    model: nn.Module, rules: list[TrainableRule], expect_total: int | None = None, log=print
) -> list[RuleMatch]:
    """Freezes everything, unfreezes the parameters matched by `rules`, prints and checks the counts.

    Raises:
        ConfigError: a rule matches nothing, a count differs from its `expect`, or the total differs from
            `expect_total`.
    """
    compiled = []
    for rule in rules:
        try:
            compiled.append(re.compile(rule.pattern))
        except re.error as err:
            raise ConfigError(f"trainable pattern {rule.pattern!r} is not a valid regex: {err}") from None
    seen: set[int] = set()
    matches = [RuleMatch(rule.pattern, 0, 0, rule.expect) for rule in rules]
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        for regex, match in zip(compiled, matches, strict=True):
            if regex.search(name):
                param.requires_grad_(True)
                match.tensors += 1
                if id(param) not in seen:
                    match.parameters += param.numel()
                seen.add(id(param))
                break
    total = sum(m.parameters for m in matches)
    log("trainable parameters by rule:")
    for m in matches:
        expect = "" if m.expect is None else f" (expected {m.expect:,})"
        log(f"  {m.pattern:<60} {m.tensors:>5} tensors {m.parameters:>14,} params{expect}")
    log(f"  {'total':<60} {'':>13} {total:>14,} params")
    for m in matches:
        if m.tensors == 0:
            raise ConfigError(
                f"trainable rule {m.pattern!r} matches no parameter; check the regex against model names."
            )
        if m.expect is not None and m.expect != m.parameters:
            raise ConfigError(
                f"trainable rule {m.pattern!r} matches {m.parameters:,} parameters, expected {m.expect:,}."
            )
    if expect_total is not None and expect_total != total:
        raise ConfigError(
            f"{total:,} trainable parameters, but the recipe's expect_trainable is {expect_total:,}."
        )
    return matches


def trainable_to_fp32(model: nn.Module) -> int:
    """Casts every trainable floating-point parameter that is not fp32 to fp32, in place; returns how many.

    The frozen parameters keep their dtype (bf16 saves memory), autocast computes in bf16, and the optimizer
    creates its state like the parameters, so the weights it updates and its moments are fp32. Kept in bf16,
    most of them would never move: an Adam step of about the learning rate (2e-5) is below half the spacing
    between neighbouring bf16 values for any weight with |w| > ~0.005, so the update rounds away.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast
