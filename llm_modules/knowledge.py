"""The knowledge path: the source's own next-token prediction joins the module's output.

The paper's design hands the source's states to a small model that must re-learn, through a new
head, which token each state means. A held-out fact whose answer was never a training target then
never comes out: measured with a real source, 0% of held-out capitals (PAPER.md). The knowledge path
adds the source's next-token log-probabilities, read by its own frozen output head, to the module's
logits, scaled per position by a learned gate:

    logits_t = head(h_t) + scale(h_t) * log_softmax(source_head(H_t))      scale = softplus(w.h_t + b) >= 0

With the new head zero-initialised and scale starting at 1, the module starts as the source
(a product of experts with nothing but the source) and training learns what to add or take away.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KNOWLEDGE_PATHS = ("none", "logits")


class KnowledgePath(nn.Module):
    """Per-position gate on the source's log-probabilities (the source's head itself stays frozen, in the source)."""

    def __init__(self, stream_dim: int):
        super().__init__()
        self.scale = nn.Linear(stream_dim, 1)
        nn.init.zeros_(self.scale.weight)
        nn.init.constant_(self.scale.bias, math.log(math.e - 1.0))  # softplus(b) = 1 at the start

    def forward(self, hidden: Tensor, source_logits: Tensor, vocab_size: int) -> Tensor:
        """scale(h) * log p_source, over the module's vocabulary; hidden [.., S], source_logits [.., V_source]."""
        logp = source_logits.float().log_softmax(-1)
        if logp.shape[-1] >= vocab_size:
            logp = logp[..., :vocab_size]  # rows past the tokenizer (embedding padding) never occur
        else:
            # Tokens the source cannot predict (added to the tokenizer after it was trained): very unlikely.
            logp = F.pad(logp, (0, vocab_size - logp.shape[-1]), value=-30.0)
        return F.softplus(self.scale(hidden)).float() * logp


def distill_loss(logits: Tensor, source_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over `mask`ed positions of T^2 * KL(p_source || p_module) at temperature T (vocabularies aligned
    by cutting the source's to the module's)."""
    V = logits.shape[-1]
    s = (logits[mask].float() / temperature).log_softmax(-1)
    t = (source_logits[mask][..., :V].float() / temperature).log_softmax(-1)
    if not mask.any():
        return logits.new_zeros((), dtype=torch.float32)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
