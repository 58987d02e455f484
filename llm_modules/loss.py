"""Losses: shifted next-token cross-entropy (full or chunked over a large vocabulary), and the
token-weighted teacher-forced loss of a model over a list of examples."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .data import IGNORE, Example, collate


def _ce_sum(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
    """Sum of cross-entropy over rows of `hidden` [N, S] without materialising [N, V] logits.

    Each chunk's logits are recomputed in backward (activation checkpointing), so peak memory
    holds one chunk of fp32 logits instead of all of them.
    """
    if hidden.shape[0] <= chunk_size:
        return _ce_sum(hidden, weight, labels)  # one chunk: nothing to save by recomputing
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[i : i + chunk_size], labels[i : i + chunk_size]
        if (y != IGNORE).any():
            total = total + checkpoint(_ce_sum, h, weight, y, use_reentrant=False)
    return total


def shifted_loss(
    labels: Tensor,
    *,
    logits: Tensor | None = None,
    hidden: Tensor | None = None,
    head_weight: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, int]:
    """(mean next-token cross-entropy, number of targets): position t predicts labels[t + 1].

    From `logits` [B, T, V] when given; otherwise from `hidden` [B, T, S] and the head's weight,
    running the head only where there is a target, in chunks of `chunk_size` rows when asked.
    """
    shift = labels[:, 1:].reshape(-1)
    n = int((shift != IGNORE).sum())
    if logits is not None:
        total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shift,
                                ignore_index=IGNORE, reduction="sum")
    else:
        assert hidden is not None and head_weight is not None
        keep = shift != IGNORE
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
        total = chunked_cross_entropy(h, head_weight, shift[keep], chunk_size or max(1, h.shape[0]))
    return total / max(n, 1), n


@torch.no_grad()
def evaluate_loss(model: Any, examples: Sequence[Example], batch_size: int = 8, pad_id: int = 0,
                  features: Any = None, autocast: Callable[[], Any] | None = None) -> dict[str, float]:
    """Mean cross-entropy over every labelled token of `examples`, and its perplexity.

    `model(input_ids, attention_mask, labels=..., source_states=..., return_logits=False, ...)`
    returns an object with `loss` and `num_tokens` (an LLMModule, or a wrapped causal LM);
    `features` (a FeatureCache) supplies source states instead of running the source.
    """
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = {k: v.to(model.device) for k, v in collate(chunk, pad_id).items()}
            states = features.batch(chunk, model.device) if features is not None else None
            top = features.top(chunk, model.device) if features is not None else None
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                            source_states=states, return_logits=False, loss_chunk_size=4096,
                            answer_mask=batch["answer_mask"], source_top=top)
            total += float(out.loss) * out.num_tokens
            count += out.num_tokens
    finally:
        model.train(was)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
