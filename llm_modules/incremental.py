"""Incremental decoding of an LLM Module: what it keeps between steps, and how each step reads new tokens.

Three caches: the knowledge source's KV cache, the bridge's cross-attention keys/values over the source
positions read (appended, never recomputed) and the small trunk's KV cache; with the knowledge lookup also
its keys and top-k tables over the source positions. Each call reads new tokens and returns the logits after
the last one, equal to `LLMModule.forward` over the whole text so far.

Under prompt conditioning the source reads the prompt and the first `answer_source_tokens` answer tokens; later
answer tokens reach the trunk alone (`_answer_step`: no source step), except at the schedule's catch-ups
(llm_modules.schedule), where the source reads every answer token it has not read in one forward (`_read`) and the
catch-up position is read as a prompt position is (its trunk input comes from the source's state there): with
`source_every` K at the K-th unread one; with `source_adaptive` where the step without the source leaves the module
unsure (`_adaptive_step`: that step is taken back and done again with the source). In a batch the source catches up
for every row when one row needs it (one forward), and each row reads only up to its own catch-ups, so each row's
answer is the one it would get alone. A conversation's next turn can go on from the state its previous turn left
(`resume`): the source first catches up on the answer it skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .knowledge import LookupMemory
from .masks import cross_attention_mask, every_catch_ups, position_ids_from_mask, prompt_limits, within_turn
from .schedule import due, lag, unsure


@dataclass
class DecodeState:
    """What `step` carries from one call to the next: the caches, and what they have read."""

    attention_mask: Tensor  # [B, T] over every token fed so far (0 = left padding)
    ids: Tensor  # [B, T] the tokens fed (a later turn must start with them to reuse this state)
    answer_mask: Tensor  # [B, T] 1 on answer tokens (earlier turns' answers, and the one being written)
    catch_ups: Tensor  # [B, T] bool: the answer positions where the source caught up (read through them)
    source_mask: Tensor  # [B, Ts] over what the source has read (prompt conditioning: not the answer's tail)
    source_cache: Any = None  # the knowledge source's KV cache
    trunk_cache: Any = None  # the small trunk's KV cache
    bridge_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per layer, [B, H, Ts, Dh]
    answer_fed: int = 0  # answer tokens fed (prompt conditioning: the first `answer_source_tokens` reach the source)
    lookup: LookupMemory | None = None  # knowledge lookup: keys and top-k predictions of the source positions read
    source_entropy: float | None = None  # the adaptive schedule's threshold (None: the module's `source_entropy`)
    source_max_gap: int | None = None  # the adaptive schedule's bound (None: the module's `source_max_gap`)
    wants_source: Callable[[Tensor], Tensor] | None = None  # adaptive: logits [B, V] -> rows [B] to catch up (None:
    # entropy over the threshold); a benchmark sets it to read the source at a chosen rate

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    @classmethod
    def empty(cls, like: Tensor) -> "DecodeState":
        none = like.new_zeros(like.shape[0], 0, dtype=torch.long)
        return cls(attention_mask=none, ids=none, answer_mask=none, catch_ups=none.bool(), source_mask=none)

    def append(self, ids: Tensor, attention_mask: Tensor, answer_mask: Tensor) -> None:
        self.ids = torch.cat([self.ids, ids], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, attention_mask.long()], dim=1)
        self.answer_mask = torch.cat([self.answer_mask, answer_mask.long()], dim=1)
        self.catch_ups = torch.cat([self.catch_ups, torch.zeros_like(ids, dtype=torch.bool)], dim=1)

    def drop_last(self) -> None:
        """Take back the last token fed by `_answer_step` (the trunk's cache too; nothing else read it)."""
        self.ids, self.attention_mask = self.ids[:, :-1], self.attention_mask[:, :-1]
        self.answer_mask, self.catch_ups = self.answer_mask[:, :-1], self.catch_ups[:, :-1]
        self.trunk_cache.crop(-1)


@torch.no_grad()
def step(module: Any, new_ids: Tensor, state: DecodeState | None = None, attention_mask: Tensor | None = None,
         answer_mask: Tensor | None = None) -> tuple[Tensor, DecodeState]:
    """Feed `new_ids` [B, n]: the whole prompt first (`attention_mask`, `answer_mask` for it), then the answer a
    token at a time; return the logits after the last one [B, V] and the state for the next call."""
    ones = torch.ones_like(new_ids)
    if state is None:
        answer = answer_mask if answer_mask is not None else ones * 0
        return _read(module, new_ids, attention_mask if attention_mask is not None else ones, answer,
                     DecodeState.empty(new_ids))
    cfg = module.config
    if cfg.conditioning == "prompt":
        if (cfg.source_every or cfg.source_adaptive) and new_ids.shape[1] > 1:  # a catch-up may fall inside: one token at a time
            for i in range(new_ids.shape[1]):
                logits, state = step(module, new_ids[:, i:i + 1], state)
            return logits, state
        state.answer_fed += new_ids.shape[1]
        past_start = state.answer_fed - cfg.answer_source_tokens  # answer tokens fed past the first N
        if past_start > 0 and cfg.source_adaptive:
            return _adaptive_step(module, new_ids, state)
        if past_start > 0 and not (cfg.source_every and past_start % cfg.source_every == 0):
            return _answer_step(module, new_ids, state)
        # else: one of the first N, or the K-th unread answer token: the source catches up (`_read`)
    return _read(module, new_ids, ones, ones, state)  # tokens fed to a state are the answer being written


@torch.no_grad()
def resume(module: Any, state: DecodeState | None, input_ids: Tensor, attention_mask: Tensor | None = None,
           answer_mask: Tensor | None = None) -> tuple[Tensor, DecodeState]:
    """`step(input_ids)` for a conversation's next turn: when `state` has read a prefix of `input_ids` [1, T],
    only the rest is read, by every cache; otherwise everything is, afresh. Equal to reading it all anew."""
    if not _continues(module, state, input_ids, attention_mask, answer_mask):
        return step(module, input_ids, None, attention_mask, answer_mask)
    new = input_ids[:, state.length:]
    answer = answer_mask[:, state.length:] if answer_mask is not None else new * 0
    state.answer_fed = 0  # the turn's prompt ends here: the next answer starts
    return _read(module, new, torch.ones_like(new), answer, state)


def _continues(module: Any, state: DecodeState | None, input_ids: Tensor, attention_mask: Tensor | None,
               answer_mask: Tensor | None) -> bool:
    """Whether `input_ids` (one row, no padding) goes on from what `state` has read, with answers marked alike."""
    if state is None or input_ids.shape[0] != 1 or input_ids.shape[1] <= state.length:
        return False
    if attention_mask is not None and not bool((attention_mask > 0).all()):
        return False
    past = state.length
    if not torch.equal(input_ids[:, :past], state.ids):
        return False
    marked = answer_mask[:, :past] > 0 if answer_mask is not None else torch.zeros_like(state.ids, dtype=torch.bool)
    return module.config.conditioning != "prompt" or torch.equal(marked, state.answer_mask > 0)


def _read(module: Any, new_ids: Tensor, new_attention: Tensor, new_answer: Tensor, state: DecodeState,
          catch: Tensor | None = None) -> tuple[Tensor, DecodeState]:
    """The source reads what it has not read yet (an answer's tail it skipped, then `new_ids`); the bridge and
    the trunk read `new_ids`, answer tokens under prompt conditioning as training lays them out. `catch` [B]: the
    rows for which the last new token is an adaptive catch-up (the others read the source up to their last one)."""
    past, n = state.length, new_ids.shape[1]
    skipped = state.ids[:, state.source_mask.shape[1]:]
    unread = torch.cat([skipped, new_ids], dim=1)
    source_mask = torch.cat([state.source_mask, torch.ones_like(skipped), new_attention.long()], dim=1)
    state.append(new_ids, new_attention, new_answer)
    positions = position_ids_from_mask(source_mask)[:, -unread.shape[1]:]
    h, state.source_cache = module.source(unread, source_mask, positions, cache=state.source_cache, use_cache=True)
    p, kvs = module.bridge.project_source(h)
    if state.bridge_kv:
        kvs = [(torch.cat([k0, k], 2), torch.cat([v0, v], 2)) for (k0, v0), (k, v) in zip(state.bridge_kv, kvs)]
    state.bridge_kv, state.source_mask = kvs, source_mask
    marked = module.prompt_answers(state.answer_mask)  # None in token conditioning
    if marked is not None:
        _mark_catch_ups(module, state, marked, n, catch)
        marked = marked & ~state.catch_ups  # a catch-up position is read as prompt is
    if marked is not None and bool(marked[:, -n:].any()):
        xmask = cross_attention_mask(source_mask, n, causal=True, past_len=past,
                                     key_limit=prompt_limits(marked.long())[:, -n:])
        embeds = module.bridge.stream(p[:, -n:], kvs, xmask, module.answer_embeddings(new_ids), marked[:, -n:])
    else:
        xmask = cross_attention_mask(source_mask, n, causal=True, past_len=past)
        embeds = module.bridge.stream(p[:, -n:], kvs, xmask)
    hidden, state.trunk_cache = module.generation(embeds, state.attention_mask,
                                                  position_ids_from_mask(state.attention_mask)[:, -n:],
                                                  cache=state.trunk_cache, use_cache=True)
    src_logits = module.source_logits(h[:, -1]) if module.knowledge is not None else None
    # As in training, the knowledge path adds nothing where the source has not read through (an answer position).
    stale = marked[:, -1] if marked is not None else None
    return module.output_logits(hidden[:, -1], src_logits, stale,
                                lookup=_lookup(module, h, xmask, state)).float(), state


def _mark_catch_ups(module: Any, state: DecodeState, marked: Tensor, n: int, catch: Tensor | None) -> None:
    """Record which of the `n` new positions are catch-ups: the fixed schedule's, or the rows in `catch`."""
    every = module.config.source_every
    if every:
        state.catch_ups[:, -n:] = every_catch_ups(marked.long(), every)[:, -n:]
    elif catch is not None:
        state.catch_ups[:, -1] = catch & marked[:, -1]


def _answer_step(module: Any, new_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
    """Prompt conditioning, inside the answer: no source step. The new tokens' own embeddings query the cached
    keys/values of the source states read (each row up to its last catch-up), then one trunk step and the head."""
    ones = torch.ones_like(new_ids)
    state.append(new_ids, ones, ones)
    n = new_ids.shape[1]
    limits = prompt_limits((module.prompt_answers(state.answer_mask) & ~state.catch_ups).long())[:, -n:]
    xmask = cross_attention_mask(state.source_mask, n, causal=False, key_limit=limits)
    embeds = module.bridge.stream(None, state.bridge_kv, xmask, module.answer_embeddings(new_ids))
    hidden, state.trunk_cache = module.generation(embeds, state.attention_mask,
                                                  position_ids_from_mask(state.attention_mask)[:, -n:],
                                                  cache=state.trunk_cache, use_cache=True)
    return module.output_logits(hidden[:, -1], lookup=_lookup(module, None, xmask, state)).float(), state


def _adaptive_step(module: Any, new_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
    """The adaptive schedule: a step without the source; where a row is unsure of the next token, that step is
    taken back and done again with the source caught up on the answer through the new token (one forward for the
    batch). Rows that were sure keep their first logits."""
    logits, state = _answer_step(module, new_ids, state)
    if state.wants_source is not None:
        rows = state.wants_source(logits)
    else:
        cfg = module.config
        threshold = state.source_entropy if state.source_entropy is not None else cfg.source_entropy
        max_gap = state.source_max_gap if state.source_max_gap is not None else cfg.source_max_gap
        gap = lag(module.prompt_answers(state.answer_mask), state.catch_ups)
        rows = unsure(logits, threshold) | due(gap, max_gap)
    if not bool(rows.any()):
        return logits, state
    state.drop_last()
    again, state = _read(module, new_ids, torch.ones_like(new_ids), torch.ones_like(new_ids), state, catch=rows)
    return torch.where(rows[:, None], again, logits), state


def _lookup(module: Any, new_states: Tensor | None, xmask: Tensor,
            state: DecodeState) -> tuple[LookupMemory, Tensor, Tensor] | None:
    """The lookup's inputs for the last new position (the source positions it reads, within its turn); its memory
    grows by the source states just read."""
    if module.lookup is None:
        return None
    if new_states is not None:
        more = module.lookup.memory(new_states, module.source_logits)
        state.lookup = more if state.lookup is None else state.lookup.extend(more)
    rows = torch.arange(xmask.shape[0], device=xmask.device)
    return state.lookup, rows, within_turn(xmask[:, 0, -1:], state.answer_mask)[:, 0]
