"""`VocabularyMixture`: image tokens as soft mixtures of the language model's own word embeddings.

Shape letters: I images, N image tokens per image, B text rows, D language-model hidden size, V vocabulary
size.

The projector's output `q` (I, N, D) is read as a query against the LM's input embedding table `E` (V, D): each
image token becomes `softmax(s * cos(q, E)) @ E`, a convex mixture of word embeddings, with `s` a learnt
logit scale (CLIP's parameterisation: `s = exp(logit_scale)`, capped at 100). The image tokens then lie where
the LM's words lie, so the LM can compare them with the words of a question in the way it compares words.

This is ours, not the Eve paper's (whose projector is an unconstrained LDP). It is in the spirit of Ovis
(Lu et al. 2024, arXiv 2405.20797), whose image tokens are probability-weighted mixtures over a learnt visual
embedding table; here the table is the LM's own input embeddings, frozen with the rest of the LM, so the
option adds one parameter. With it off (the default) the projector's output goes to the LM unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

MAX_LOGIT_SCALE = 100.0


class VocabularyMixture(nn.Module):
    """Maps projected image tokens to mixtures of the LM's word embeddings.

    Args:
        init_scale: The starting logit scale `s` (the inverse of a softmax temperature over cosines).
    """

    def __init__(self, init_scale: float = 1 / 0.07) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def mixture_weights(self, queries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(I, N, D) queries, (V, D) table -> (I, N, V) mixture weights over the vocabulary (rows sum to 1).

        Computed in fp32 with autocast off: at a scale of 100, a bf16 cosine would be off by up to ~0.4 logits.
        """
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        with torch.autocast(queries.device.type, enabled=False):
            cosines = F.normalize(queries.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T  # (I, N, V)
            return torch.softmax(scale.float() * cosines, dim=-1)

    def forward(self, queries: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, N, D) queries, (V, D) effective input embeddings -> (I, N, D) image tokens in the table's dtype
        and their (I, N, V) fp32 mixture weights."""
        weights = self.mixture_weights(queries, table)
        return weights.to(table.dtype) @ table, weights


def caption_word_loss(
    weights: torch.Tensor,  # (I, N, V)
    image_rows: torch.Tensor,  # (I,) long
    labels: torch.Tensor,  # (B, T), -100 where ignored
    ignore_ids: list[int],
) -> torch.Tensor:
    """The caption-word loss: an image's tokens name the words of its text and not the other rows' words.

    For image i in row r, with `m_i[c]` the largest mixture weight any of its N tokens puts on word c, the loss
    is `-mean_c log m_i[c]` over the target tokens c of row r (the caption, the answer; repeats counted,
    `ignore_ids` and -100 left out) plus `-mean_c' log(1 - m_i[c'])` over the words c' that other rows of the
    batch target and row r does not (in-batch negatives); the result is the mean over the images whose row has
    a target. It gives the mixture a direct signal towards the words of the text about the image (as SPAE,
    arXiv 2306.17842, and V2L, arXiv 2403.07874, map images onto a frozen LLM's vocabulary), where the
    language-model loss alone, through a softmax over V words that starts near uniform, barely moves it. The
    maximum lets each word claim a token of its own (with the mean over tokens every token drifted towards the
    words all captions share, "A" and ".", first); the negatives make the words depend on the image (without
    them, 16 tokens that list every colour and shape of easy-VQA, the same for every image, met the positive
    term).

    Returns:
        A scalar; 0 (with a gradient path) when no image's row has a target.
    """
    vocab = weights.shape[-1]
    keep = (labels >= 0) & (labels < vocab)
    targets = labels.where(keep, 0)
    for token in ignore_ids:
        keep &= labels != token
    counts = torch.zeros(labels.shape[0], vocab, dtype=weights.dtype, device=weights.device)
    counts.scatter_add_(1, targets, keep.to(weights.dtype))  # (B, V) target counts per row
    negatives = ((counts.sum(0, keepdim=True) > 0) & (counts == 0)).to(weights.dtype)  # (B, V)
    counts, negatives = counts[image_rows], negatives[image_rows]  # (I, V)
    totals = counts.sum(-1)  # (I,)
    best = weights.amax(dim=1)  # (I, V)
    positive = -(counts * torch.log(best.clamp(min=1e-12))).sum(-1) / totals.clamp(min=1)
    negative = -(negatives * torch.log1p(-best.clamp(max=1 - 1e-6))).sum(-1) / negatives.sum(-1).clamp(min=1)
    has_target = totals > 0
    if not bool(has_target.any()):
        return weights.sum() * 0
    return (positive + negative)[has_target].mean()


def special_token_ids(text_config) -> list[int]:
    """The bos, eos and pad ids a language model's config names (each an int, a list or None), which the
    caption-word loss leaves out."""
    ids = [getattr(text_config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")]
    return sorted(
        {int(t) for one in ids if one is not None for t in (one if isinstance(one, list) else [one])}
    )


def image_rows(image_mask: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """(B, T) placeholder mask -> (I,) the row of each image, images in placeholder order (row by row, as
    `merge_image_features` writes them)."""
    per_row = image_mask.sum(dim=1) // tokens_per_image  # (B,)
    return torch.repeat_interleave(torch.arange(len(per_row), device=image_mask.device), per_row)
