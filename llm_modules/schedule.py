"""When the knowledge source reads the answer under prompt conditioning: its read schedule.

Under prompt conditioning the source reads the prompt (and the first `answer_source_tokens` answer tokens); the
rest of the answer reaches it only at *catch-ups*, where it reads every answer token it has not read yet in one
forward. A catch-up position t is then read as a prompt position is, which is what token conditioning gives every
position: the trunk's input there comes from the source's state at t (not the token's own embedding), the bridge
reads the source through t, the knowledge path adds the source's own prediction there, the lookup reads its top-k
there. The answer positions after it read the source up to it (`masks.prompt_limits` of the answer mask without
the catch-ups), until the next one.

Schedules (ModuleConfig):
- none: the source never reads the answer (pure fast mode);
- `source_every` K: a catch-up at every K-th answer token, fixed in advance (`masks.every_catch_ups`);
- `source_adaptive` p: decoding catches up where the module is unsure, its next-token entropy over
  `source_entropy` nats at a position (`unsure`), so where a fact is about to be stated rather than inside the
  template around it; with `source_max_gap` M also wherever the source is M answer tokens behind. Which positions that will be depends on the module's own predictions, so training draws
  them at random, each answer token a catch-up with probability p (`draw_catch_ups`): the module learns to read
  the source however stale its last catch-up is, and to use a fresh one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .masks import every_catch_ups, prompt_limits

EVAL_SEED = 0  # outside training, drawn catch-ups come from this seed, so validation losses compare


def entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) over the last dimension."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def unsure(logits: Tensor, threshold: float) -> Tensor:
    """[B] bool: the rows whose next-token distribution (`logits` [B, V]) has an entropy over `threshold` nats."""
    return entropy(logits) > threshold


def lag(answer: Tensor, catch_ups: Tensor) -> Tensor:
    """[B]: answer tokens since the source last read one, the last position included (`answer` [B, T]: prompt
    conditioning's answer positions, the first `answer_source_tokens` excluded; `catch_ups` [B, T])."""
    read = prompt_limits((answer & ~catch_ups).long())[:, -1]
    return answer.shape[-1] - 1 - read


def due(gap: Tensor, max_gap: int) -> Tensor:
    """[B] bool: the rows whose source has not read the last `max_gap` answer tokens (`gap` [B]: answer tokens since
    the last one it read, the new one included); none for 0."""
    return gap >= max_gap if max_gap > 0 else torch.zeros_like(gap, dtype=torch.bool)


def draw_catch_ups(answer: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """[B, T] bool: each answer position (`answer` [B, T] bool) a catch-up with probability `rate`."""
    u = torch.rand(answer.shape, generator=generator, device="cpu" if generator is not None else answer.device)
    return answer & (u.to(answer.device) < rate)


def catch_ups_for(config: Any, answer: Tensor | None, given: Tensor | None = None,
                  training: bool = False) -> Tensor | None:
    """[B, T] bool: the answer positions (`answer`, prompt conditioning's) where the source has read through, for a
    whole-sequence forward: `given` (what decoding recorded), else the module's schedule, adaptive ones drawn
    (from the global generator in training, from `EVAL_SEED` outside it). None when the source never catches up."""
    if answer is None:
        return None
    if given is not None:
        return given.to(answer.device).bool() & answer
    if config.source_every:
        return every_catch_ups(answer.long(), config.source_every)
    if config.source_adaptive:
        generator = None if training else torch.Generator().manual_seed(EVAL_SEED)
        return draw_catch_ups(answer, config.source_adaptive, generator)
    return None
