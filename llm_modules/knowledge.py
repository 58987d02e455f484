"""The knowledge path: the source's own next-token prediction joins the module's output.

The paper's design hands the source's states to a small model that must re-learn, through a new
head, which token each state means. A held-out fact whose answer was never a training target then
never comes out: measured with a real source, 0% of test facts whose answer was never a training target
(README, "What it achieves": `llm-modules demo --world facts`, 0 of 149 over 3 seeds). The knowledge path
adds the source's next-token log-probabilities, read by its own frozen output head, to the module's
logits, scaled per position by a learned gate:

    logits_t = head(h_t) + scale(h_t) * log_softmax(source_head(H_t))      scale = softplus(w.h_t + b) >= 0

With the new head zero-initialised and scale starting at 1, the module starts as the source
(a product of experts with nothing but the source) and training learns what to add or take away.

`lookup` generalises it to positions where the source has not predicted the next token itself: under prompt
conditioning the source never reads the answer, and the fact a question asks for may be predicted anywhere in the
prompt (after "Recall: The capital of Japan is", not after the chat markers that end it). Position t attends over
the source positions it may read (the bridge's own cross-attention mask) and takes a mixture of the source's
next-token distributions there (each kept as its top k):

    logits_t = head(h_t) + scale(h_t) * log(sum_j a_tj p_source(. | j) + eps),   a_t = softmax_j(q(h_t) . k(H_j))

A pointer to what the source predicted where: it costs no source step and no vocabulary-sized matrix product per
generated token (t attends over at most T_prompt * k stored entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

class KnowledgePath(nn.Module):
    """Per-position gate on the source's log-probabilities (the source's head itself stays frozen, in the source)."""

    def __init__(self, stream_dim: int):
        super().__init__()
        self.scale = _gate(stream_dim)

    def forward(self, hidden: Tensor, source_logits: Tensor, vocab_size: int) -> Tensor:
        """scale(h) * log p_source, over the module's vocabulary; hidden [.., S], source_logits [.., V_source]."""
        logp = source_logits.float().log_softmax(-1)
        if logp.shape[-1] >= vocab_size:
            logp = logp[..., :vocab_size]  # rows past the tokenizer (embedding padding) never occur
        else:
            # Tokens the source cannot predict (added to the tokenizer after it was trained): very unlikely.
            logp = F.pad(logp, (0, vocab_size - logp.shape[-1]), value=-30.0)
        return F.softplus(self.scale(hidden)).float() * logp


def _gate(stream_dim: int) -> nn.Linear:
    """softplus(w.h + b) with w = 0 and softplus(b) = 1: the knowledge term starts at full weight."""
    scale = nn.Linear(stream_dim, 1)
    nn.init.zeros_(scale.weight)
    nn.init.constant_(scale.bias, math.log(math.e - 1.0))
    return scale


@dataclass
class LookupMemory:
    """What a lookup reads at source positions: attention keys and the source's top-k next-token predictions."""

    keys: Tensor  # [B, Ts, D]
    ids: Tensor  # [B, Ts, k] token ids
    probs: Tensor  # [B, Ts, k] their probabilities (float32)

    def extend(self, more: "LookupMemory") -> "LookupMemory":
        """Memory over more source positions (decoding in token conditioning: the source read new tokens)."""
        return LookupMemory(*(torch.cat([a, b], 1) for a, b in
                              ((self.keys, more.keys), (self.ids, more.ids), (self.probs, more.probs))))


class KnowledgeLookup(nn.Module):
    """Attention from the module's states to source positions, whose values are the source's predictions there."""

    EPS = 1e-6  # floor of the mixture: a token no attended position predicts gets log(eps), not -inf
    CHUNK = 256  # query rows per chunk: memory is rows x Ts x k

    def __init__(self, stream_dim: int, source_dim: int, key_dim: int = 64, top_k: int = 32):
        super().__init__()
        self.top_k = top_k
        self.query = nn.Linear(stream_dim, key_dim)
        self.key = nn.Linear(source_dim, key_dim)
        self.scale = _gate(stream_dim)

    def memory(self, source_states: Tensor, source_logits: Callable[[Tensor], Tensor] | None = None,
               top: tuple[Tensor, Tensor] | None = None) -> LookupMemory:
        """Keys and top-k predictions of every source position: `top` = (ids, probs) [B, T, k] as the feature cache
        stores them, or computed by `source_logits`, the source's frozen head."""
        ids, probs = top if top is not None else top_predictions(source_states, source_logits, self.top_k, self.CHUNK)
        return LookupMemory(self.key(source_states.to(self.key.weight.dtype)), ids.long(), probs.float())

    def forward(self, hidden: Tensor, memory: LookupMemory, rows: Tensor, allowed: Tensor, vocab_size: int) -> Tensor:
        """scale(h) * log(mixture) [N, V] for N query states `hidden` [N, S]; `rows` [N] is each query's batch row
        and `allowed` [N, Ts] the source positions it may read."""
        batch_rows, counts = torch.unique_consecutive(rows, return_counts=True)
        if len(counts) * 8 > len(rows):  # a query or few per batch row (decoding a batch): one pass over copies
            return self._mixture(hidden, memory.keys[rows], *_clean(memory.ids[rows], memory.probs[rows], vocab_size),
                                 allowed, vocab_size)
        # Runs of queries on one batch row (a whole sequence, or its targets) share that row's memory: no copies.
        out, start = [], 0
        for b, n in zip(batch_rows.tolist(), counts.tolist()):
            ids, probs = _clean(memory.ids[b], memory.probs[b], vocab_size)
            for i in range(start, start + n, self.CHUNK):
                j = min(i + self.CHUNK, start + n)
                out.append(self._mixture(hidden[i:j], memory.keys[b], ids, probs, allowed[i:j], vocab_size))
            start += n
        return torch.cat(out)

    def _mixture(self, hidden: Tensor, keys: Tensor, ids: Tensor, probs: Tensor, allowed: Tensor, vocab_size: int) -> Tensor:
        """The term for queries `hidden` [n, S] over keys [Ts, D] / ids, probs [Ts, k] shared by all of them, or
        [n, Ts, D] / [n, Ts, k] one set per query."""
        q = self.query(hidden).float()
        scores = (q[:, None, :] @ keys.float().transpose(-1, -2)).squeeze(1) / math.sqrt(q.shape[-1])
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        weights = (att[..., None] * probs).flatten(1)  # [n, Ts * k]
        mix = weights.new_zeros(len(hidden), vocab_size)
        mix.scatter_add_(1, ids.flatten(-2).expand(len(hidden), -1), weights)
        return F.softplus(self.scale(hidden)).float() * (mix + self.EPS).log()


@torch.no_grad()
def top_predictions(source_states: Tensor, source_logits: Callable[[Tensor], Tensor], k: int,
                    chunk: int = 256) -> tuple[Tensor, Tensor]:
    """(ids, probs) [..., T, k] of the source's k most likely next tokens at each position, its head run over chunks
    of positions so the [..., T, V_source] logits never exist at once. The head is frozen: no gradients."""
    ids, probs = [], []
    for part in source_states.split(chunk, dim=-2):
        top = source_logits(part).float().log_softmax(-1).topk(k, dim=-1)
        ids.append(top.indices)
        probs.append(top.values.exp())
    return torch.cat(ids, -2), torch.cat(probs, -2)


def _clean(ids: Tensor, probs: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Source rows past the module's vocabulary (embedding padding) are never real tokens: weight 0, a valid index."""
    valid = ids < vocab_size
    return ids.clamp_max(vocab_size - 1), probs * valid


def distill_loss(logits: Tensor, source_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over `mask`ed positions of T^2 * KL(p_source || p_module) at temperature T (vocabularies aligned
    by cutting the source's to the module's)."""
    V = logits.shape[-1]
    s = (logits[mask].float() / temperature).log_softmax(-1)
    t = (source_logits[mask][..., :V].float() / temperature).log_softmax(-1)
    if not mask.any():
        return logits.new_zeros((), dtype=torch.float32)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
