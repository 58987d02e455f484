"""Masks and positions for the knowledge source, the bridge and the small trunk, in one place.

The segment-id convention: every batch carries one `attention_mask` of shape [B, T] whose values are
    0       padding (never attended to, never a target);
    1       a token of an ordinary row (one example per row, left or right padded);
    1, 2, … the examples of a *packed* row, numbered in order (`data.collate_packed` writes them).
A row is packed when any value exceeds 1. Within a packed row no attention crosses an example
boundary (source, bridge and trunk alike) and positions restart at 0 for each example.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_packed(attention_mask: Tensor) -> bool:
    """Packed rows number their examples 1, 2, ... in the mask; plain rows hold only 0 and 1."""
    return attention_mask.dim() == 2 and bool(attention_mask.max() > 1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over real tokens whatever the padding side; padding gets 0 (never read)."""
    return ((attention_mask > 0).long().cumsum(-1) - 1).clamp(min=0)


def reference_position_ids(attention_mask: Tensor) -> Tensor:
    """0..T-1 whatever the padding: what the reference code fed its trunk."""
    T = attention_mask.shape[1]
    return torch.arange(T, device=attention_mask.device).expand_as(attention_mask)


def packed_inputs(segment_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(additive 4-D mask [B, 1, T, T], position ids [B, T]) for rows packing several examples.

    Attention stays causal and inside each example; positions restart at 0 for each example.
    The mask is additive (0 / dtype min), which every architecture accepts (GPT-Neo adds it).
    """
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    positions = torch.where(segment_ids > 0, idx - first, torch.zeros_like(idx))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = same & (segment_ids[:, None, :] > 0) & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=idx.device)  # padding rows stay finite
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=idx.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min), positions


def decoder_inputs(attention_mask: Tensor, dtype: torch.dtype, reference: bool = False) -> tuple[Tensor, Tensor]:
    """(attention mask, position ids) to run a transformers decoder (source or trunk) on a batch.

    Plain rows keep the 0/1 mask; packed rows get the block-diagonal 4-D mask. `reference` gives
    the reference code's positions (0..T-1 whatever the padding).
    """
    if is_packed(attention_mask):
        return packed_inputs(attention_mask, dtype)
    mask = (attention_mask > 0).long()
    return mask, reference_position_ids(mask) if reference else position_ids_from_mask(mask)


def prompt_limits(answer_mask: Tensor) -> Tensor:
    """[B, T]: the last source position each query may read under prompt conditioning.

    A prompt position t reads up to t; a position inside an answer reads up to the last prompt token
    before that answer (the answer's own tokens never reach the source). Earlier turns' answers,
    as text before a later prompt, are read by that later prompt's positions.
    """
    T = answer_mask.shape[-1]
    idx = torch.arange(T, device=answer_mask.device).expand_as(answer_mask)
    return torch.where(answer_mask > 0, torch.full_like(idx, -1), idx).cummax(-1).values


def every_catch_ups(answer_mask: Tensor, every: int) -> Tensor:
    """[B, T] bool: the answer positions where the source catches up when it does so every `every` answer tokens:
    answer token j (0-based in its answer) when j + 1 is a multiple of `every` (none for 0). A catch-up position is
    then read as prompt is (`llm_modules.schedule`): `prompt_limits(answer & ~catch_ups)` gives what each reads."""
    answer = answer_mask > 0
    if every <= 0:
        return torch.zeros_like(answer)
    idx = torch.arange(answer_mask.shape[-1], device=answer_mask.device).expand_as(answer_mask)
    j = idx - prompt_limits(answer_mask) - 1
    return answer & ((j + 1) % every == 0)


def turn_starts(answer_mask: Tensor) -> Tensor:
    """[B, T]: where each position's turn starts, the first token after the last answer completed before it (0 in
    the first turn); a position inside an answer belongs to the turn of the prompt before it."""
    done = answer_mask > 0
    idx = torch.arange(done.shape[-1], device=done.device).expand_as(done)
    after = torch.zeros_like(done)
    after[..., 1:] = done[..., :-1] & ~done[..., 1:]  # the first position after an answer
    return torch.where(after, idx, torch.zeros_like(idx)).cummax(-1).values


def within_turn(allowed: Tensor, answer_mask: Tensor | None) -> Tensor:
    """`allowed` [B, Tq, Tk] (the last Tq of the positions in `answer_mask` [B, T] reading source positions
    0..Tk-1) kept to each query's own turn; unchanged without an answer mask. A row that would keep nothing
    (right padding after an answer, never read) stays as it was: an empty row would make softmax NaN, and a NaN
    in an ignored row still poisons the gradients."""
    if answer_mask is None:
        return allowed
    starts = turn_starts(answer_mask)[:, -allowed.shape[1]:]
    keys = torch.arange(allowed.shape[-1], device=allowed.device)
    kept = allowed & (keys >= starts[..., None])
    return torch.where(kept.any(-1, keepdim=True), kept, allowed)


def delay_answers(answer_mask: Tensor, n: int) -> Tensor:
    """`answer_mask` with the first `n` tokens of each answer span unmarked (read by the source, as prompt)."""
    if n <= 0:
        return answer_mask
    idx = torch.arange(answer_mask.shape[-1], device=answer_mask.device).expand_as(answer_mask)
    start = prompt_limits(answer_mask) + 1  # inside an answer: its first position
    return ((answer_mask > 0) & (idx - start >= n)).to(answer_mask.dtype)


def cross_attention_mask(
    key_mask: Tensor,
    query_len: int,
    *,
    causal: bool = True,
    past_len: int = 0,
    key_limit: Tensor | None = None,
) -> Tensor:
    """Boolean mask [B, 1, Tq, Tk] (True = may attend) for the bridge's cross-attention.

    `key_mask` is [B, Tk] in the segment-id convention above. Query i sits at absolute position
    past_len + i. With `causal`, it reads keys at positions <= its own; it never reads padding or
    another segment. `key_limit` [B, Tq] (prompt conditioning, see `prompt_limits`) caps the last key
    each query reads. A query with nothing to read (a padding position) reads its own key so softmax
    stays finite; its output is never used.
    """
    B, Tk = key_mask.shape
    device = key_mask.device
    q_pos = torch.arange(past_len, past_len + query_len, device=device)
    k_pos = torch.arange(Tk, device=device)
    allowed = (key_mask > 0)[:, None, :].expand(B, query_len, Tk)
    if causal:
        allowed = allowed & (k_pos[None, None, :] <= q_pos[None, :, None])
    if query_len == Tk and past_len == 0 and is_packed(key_mask):
        allowed = allowed & (key_mask[:, :, None] == key_mask[:, None, :])
    if key_limit is not None:
        allowed = allowed & (k_pos[None, None, :] <= key_limit[:, :, None])
    own = k_pos[None, None, :] == q_pos[None, :, None]
    empty = ~allowed.any(-1, keepdim=True)
    allowed = allowed | (empty & own)
    return allowed[:, None]
