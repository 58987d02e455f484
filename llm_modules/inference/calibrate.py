"""The adaptive read schedule set by a budget of source reads instead of an entropy in nats.

A threshold in nats does not carry over from one module to another: on the long-answer benchmark 5 nats read the
source at 4% of the answer tokens for one seed's module and 13% for another's, and the one that read 4% fell into a
confident loop it never asked the source about. What a user decides is a cost, the share of answer tokens at which
the source catches up, so `calibrate_entropy` finds the threshold that spends it: the lowest entropy threshold whose
measured read share on the user's prompts stays within the budget (bisection; the share falls as the threshold
rises). Reads are counted as `write_counting_reads` writes, one prompt at a time, so a row never reads because
another row of its batch did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..data import Example, encode_prompt
from ..decode import cut_text, decode


@dataclass
class Calibration:
    budget: float
    threshold: float  # nats: the module's next-token entropy over which the source catches up
    reads_per_token: float  # measured on the prompts at `threshold`
    tokens: int  # answer tokens written at `threshold`
    tried: list[tuple[float, float]] = field(default_factory=list)  # (threshold, reads per token), in order


@torch.no_grad()
def write_counting_reads(module: Any, prompts: Sequence[str | Example], max_new_tokens: int,
                         source_entropy: float | None = None, source_max_gap: int | None = None,
                         stop_strings: Sequence[str] = ("\n",)) -> tuple[list[str], float, int]:
    """An LLM Module's greedy answers, one prompt at a time (each stops at its own end), and the knowledge source's
    forwards while they were written per answer token: 1 - 1 / n under token conditioning, 1 / K when it catches up
    every K tokens, what the text asked for under the adaptive schedule (`source_entropy`, `source_max_gap` override
    the module's settings). Returns (answers, forwards per token, tokens written)."""
    tok = module.tokenizer
    texts, reads, written = [], 0, 0
    real = module.source.forward
    calls: list[int] = []
    module.source.forward = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        for prompt in prompts:
            example = prompt if isinstance(prompt, Example) else encode_prompt(tok, "raw", prompt)
            ids = torch.tensor([example.input_ids], device=module.device)
            answer = torch.tensor([example.answer], device=module.device) if example.answer else None
            calls.clear()
            out = [int(t) for t, _, _ in decode(module, ids, max_new_tokens=max_new_tokens, answer_mask=answer,
                                                stop_strings=tuple(stop_strings), source_entropy=source_entropy,
                                                source_max_gap=source_max_gap)]
            reads, written = reads + len(calls) - 1, written + len(out)  # the first call reads the prompt
            texts.append(cut_text(tok.decode(out), tuple(stop_strings), tok.eos_token))
    finally:
        module.source.forward = real
    return texts, reads / max(written, 1), written


def calibrate_entropy(module: Any, prompts: Sequence[str | Example], budget: float, max_new_tokens: int = 128,
                      steps: int = 8, stop_strings: Sequence[str] = ("\n",),
                      log: Callable[[str], None] | None = None) -> Calibration:
    """The lowest entropy threshold (nats) at which the module's source reads at most `budget` of the answer tokens
    it writes for `prompts` (greedy), found by `steps` bisections between 0 and the largest possible entropy."""
    if not getattr(module.config, "source_adaptive", 0):
        raise ValueError("calibration sets the adaptive schedule: this module has none (trained with "
                         "source_adaptive 0)")
    if not 0.0 < budget < 1.0:
        raise ValueError(f"the read budget is a share of answer tokens in (0, 1), got {budget}")
    if not prompts:
        raise ValueError("calibration needs prompts")

    def share(threshold: float) -> tuple[float, int]:
        _, reads, tokens = write_counting_reads(module, prompts, max_new_tokens, threshold, None, stop_strings)
        tried.append((threshold, reads))
        if log is not None:
            log(f"  {threshold:.3f} nats: {reads:.3f} source reads per answer token ({tokens} tokens)")
        return reads, tokens

    tried: list[tuple[float, float]] = []
    hi = math.log(module.config.vocab_size or len(module.tokenizer))  # nothing is ever over it
    best = (hi, *share(hi))
    if best[1] > budget:
        raise ValueError(f"even with no entropy read the source reads {best[1]:.3f} of the answer tokens (its "
                         f"source_max_gap {module.config.source_max_gap}), over the budget {budget}")
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        reads, tokens = share(mid)
        if reads <= budget:
            hi, best = mid, (mid, reads, tokens)
        else:
            lo = mid
    return Calibration(budget, best[0], best[1], best[2], tried)
