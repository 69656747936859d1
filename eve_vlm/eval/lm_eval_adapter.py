"""Run lm-evaluation-harness tasks (MMLU, PIQA, ...) on an Eve model's text path.

`eve_hflm(model, tokenizer)` returns lm-eval's own `HFLM` (`lm_eval.models.huggingface`) around
`EveTextModel`, a thin module that calls the Eve model with `input_ids` only (no `pixel_values`), so every
request takes the elastic text path (LoRA off, EVF layers on their language FFN) and scores exactly as the
base LLM does. Loglikelihood and generation tasks both work; `lm_eval.simple_evaluate(model=eve_hflm(...))`
then runs any task, including local YAML tasks (`TaskManager(include_path=...)`).

Needs the `eval` extra (`pip install "eve-vlm[eval]"`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EveTextModel", "eve_hflm"]


class EveTextModel(nn.Module):
    """The text path of an Eve model, shaped like a transformers causal LM for lm-eval.

    Args:
        model: An `EveForConditionalGeneration`.

    Attributes:
        config: The language model's config (lm-eval reads `max_position_embeddings` etc. from it).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.eve = model
        self.config = model.config.text_config
        self.name_or_path = getattr(model, "name_or_path", "eve")

    @property
    def device(self) -> torch.device:
        return self.eve.device

    @property
    def dtype(self) -> torch.dtype:
        return self.eve.dtype

    def tie_weights(self) -> None:
        """No-op: the Eve model's weights are already tied as loaded (lm-eval calls this)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Logits of text-only `input_ids` (B, T) through the Eve model."""
        return self.eve(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Text-only generation through the Eve model."""
        return self.eve.generate(input_ids=input_ids, **kwargs)


def eve_hflm(model: nn.Module, tokenizer, *, batch_size: int = 8, max_length: int | None = None, **kwargs):
    """An lm-eval `HFLM` evaluating `model`'s text path.

    Args:
        model: An `EveForConditionalGeneration` (put in eval mode).
        tokenizer: Its tokenizer (`EveProcessor.tokenizer`).
        batch_size: Requests per forward.
        max_length: Context length for lm-eval (default: from the language model's config).
        **kwargs: Further `HFLM` arguments.

    Raises:
        ImportError: lm-eval is not installed (install the `eval` extra).
    """
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(
            'lm-eval is not installed; run pip install "eve-vlm[eval]" (or "lm-eval>=0.4").'
        ) from e
    model.eval()
    return HFLM(
        pretrained=EveTextModel(model),
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        max_length=max_length,
        **kwargs,
    )
