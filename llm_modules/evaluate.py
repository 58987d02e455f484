"""Evaluation: token-weighted loss / perplexity, and exact-match of answers between solution markers."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Sequence

import torch

from .data import Example, collate

SOLUTION_RE = re.compile(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.S)


@torch.no_grad()
def evaluate_loss(module: Any, examples: Sequence[Example], batch_size: int = 8, pad_id: int = 0,
                  features: Any = None, autocast: Any = None) -> dict[str, float]:
    """Mean cross-entropy over every labelled token of `examples`, and its perplexity."""
    was = module.training
    module.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = {k: v.to(module.device) for k, v in collate(chunk, pad_id).items()}
            source_states = features.batch(chunk, module.device) if features is not None else None
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = module(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                             source_states=source_states, return_logits=False, loss_chunk_size=4096)
            total += float(out.loss) * out.num_tokens
            count += out.num_tokens
    finally:
        module.train(was)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def extract_answer(text: str) -> str:
    """The answer between <|begin_of_solution|> and <|end_of_solution|> (or after the opening marker), stripped."""
    m = SOLUTION_RE.search(text)
    ans = m.group(1) if m else text
    return " ".join(ans.split()).strip().rstrip(".")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions whose extracted answer equals the reference's (whitespace- and case-folded)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(extract_answer(p).lower() == extract_answer(r).lower() for p, r in zip(predictions, references))
    return hits / len(references)
