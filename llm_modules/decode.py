"""The decoding loop: cached incremental steps (LLMModule.step), sampling, stop conditions, streaming.

Per new token the cost is one step of the module (see `LLMModule.step`); the prompt is processed
in one pass. Works with anything that has `step`, `forward`, `tokenizer`, `generation.position_limit`
and `source` like an LLMModule (nothing here imports the model).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .schedule import due, lag, unsure


@dataclass
class Session:
    """A conversation's decoding state, kept from one turn to the next (one row): when the next turn's prompt
    starts with everything read so far, only its new tokens are read (`LLMModule.resume`)."""

    state: Any = None


@torch.no_grad()
def full_forward_logits(module: Any, ids: Tensor, mask: Tensor, prompt_len: int | None = None,
                        prompt_answers: Tensor | None = None, catch_ups: Tensor | None = None) -> Tensor:
    """Last-position logits from a full forward over everything so far (the reference's way: no caches).

    Tokens after `prompt_len` are the answer being generated (what prompt conditioning keeps from the source);
    `prompt_answers` [B, prompt_len] marks earlier turns' answers inside the prompt; `catch_ups` [B, T - prompt_len]
    the generated positions where the adaptive schedule's source caught up.
    """
    if prompt_len is None:
        return module(ids, mask).logits[:, -1].float()
    answer = (torch.arange(ids.shape[1], device=ids.device) >= prompt_len).long().expand_as(ids).clone()
    if prompt_answers is not None:
        answer[:, :prompt_len] = prompt_answers
    extra = {}
    if catch_ups is not None:
        extra["catch_ups"] = torch.cat([torch.zeros_like(ids[:, :prompt_len], dtype=torch.bool), catch_ups], 1)
    return module(ids, mask, answer_mask=answer, **extra).logits[:, -1].float()


def _uncached_step(module: Any, ids: Tensor, mask: Tensor, prompt_len: int, answer_mask: Tensor | None,
                   catch: Tensor | None, threshold: float | None, made: int,
                   max_gap: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Logits after the last of `ids` by full recomputation, applying the adaptive schedule as cached decoding does
    (`incremental._adaptive_step`): where a row is unsure, again with the source caught up through its last token."""
    if catch is None:  # no adaptive schedule
        return full_forward_logits(module, ids, mask, prompt_len, answer_mask), None
    catch = torch.cat([catch, catch.new_zeros(catch.shape[0], 1)], 1)
    logits = full_forward_logits(module, ids, mask, prompt_len, answer_mask, catch)
    if made <= module.config.answer_source_tokens:  # read by the source as prompt anyway
        return logits, catch
    answer = module.prompt_answers((torch.arange(ids.shape[1], device=ids.device) >= prompt_len).long().expand_as(ids))
    gap = lag(answer, torch.cat([torch.zeros_like(ids[:, :prompt_len], dtype=torch.bool), catch], 1))
    rows = unsure(logits, threshold if threshold is not None else module.config.source_entropy) | due(
        gap, max_gap if max_gap is not None else module.config.source_max_gap)
    if bool(rows.any()):
        catch[:, -1] = rows
        logits = torch.where(rows[:, None], full_forward_logits(module, ids, mask, prompt_len, answer_mask, catch),
                             logits)
    return logits, catch


def process_logits(
    logits: Tensor,
    seen: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> Tensor:
    """Apply repetition penalty, temperature, top-k and top-p (in that order, as transformers does)."""
    logits = logits.clone()
    if repetition_penalty != 1.0:
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
        logits.scatter_(1, seen, picked)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first is always kept).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def cut_text(text: str, stop_strings: Sequence[str] = (), eos: str | None = None) -> str:
    """Generated text up to the end of sequence, and up to (including) the first stop string."""
    if eos and eos in text:
        text = text[: text.index(eos)]
    ends = [text.index(s) + len(s) for s in stop_strings if s and s in text]
    return text[: min(ends)] if ends else text


def context_limit(module: Any) -> int | None:
    """Positions a prompt plus its answer may take: the trunk's and the source's position limits."""
    src = getattr(module.source.model.config, "max_position_embeddings", None) if module.source is not None else None
    limits = [x for x in (module.generation.position_limit, src) if x]
    return min(limits) if limits else None


def prepare_prompt(module: Any, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int,
                   truncate: str | None = None) -> tuple[Tensor, Tensor]:
    """Check the prompt fits the context; with truncate='left' cut it from the left, with a warning
    (callers holding an answer mask cut it to the returned length)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    limit = context_limit(module)
    if limit:
        room = limit - max_new_tokens
        longest = int(attention_mask.sum(-1).max())
        if longest > room:
            if truncate != "left" or room <= 0:
                raise ValueError(
                    f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the context limit of "
                    f"{limit} positions; shorten it or cut it with --truncate left"
                )
            warnings.warn(f"prompt cut from the left: {longest} -> {room} tokens to fit the context limit", stacklevel=3)
            input_ids, attention_mask = input_ids[:, -room:], attention_mask[:, -room:]
    return input_ids, attention_mask


def decode(
    module: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
    use_cache: bool = True,
    truncate: str | None = None,
    answer_mask: Tensor | None = None,
    session: Session | None = None,
    source_entropy: float | None = None,
    source_max_gap: int | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (next_tokens [B], raw logits [B, V], finished [B]) once per new token.

    Finished rows keep receiving `pad_token_id`. Stops when every row has finished.
    `answer_mask` [B, T] marks earlier turns' answers inside the prompt (see `data.encode_prompt`):
    prompt conditioning reads them as it was trained to. `session` carries the caches to the next turn.
    `source_entropy` and `source_max_gap` override the adaptive schedule's settings (`ModuleConfig`).
    """
    tok = module.tokenizer
    if eos_token_id is None and tok is not None:
        eos_token_id = tok.eos_token_id
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       device=input_ids.device, dtype=torch.long)
    if pad_token_id is None:
        pad_token_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    use_cache = use_cache and module.supports_cache
    input_ids, attention_mask = prepare_prompt(module, input_ids, attention_mask, max_new_tokens, truncate)
    if answer_mask is not None:
        answer_mask = answer_mask[:, -input_ids.shape[1]:]
    gen = None
    if do_sample:
        gen = torch.Generator(device=input_ids.device)
        gen.manual_seed(seed if seed is not None else torch.seed())
    was_training = module.training
    module.eval()
    try:
        B = input_ids.shape[0]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        seen = input_ids
        texts = [""] * B
        ids, mask = input_ids, attention_mask.long()
        state, catch = None, None
        if use_cache:
            logits, state = _first_step(module, input_ids, attention_mask, answer_mask, session)
            if hasattr(state, "source_max_gap"):  # an LLM Module's DecodeState
                state.source_entropy, state.source_max_gap = source_entropy, source_max_gap
        else:
            logits = full_forward_logits(module, ids, mask, input_ids.shape[1], answer_mask)
            if getattr(getattr(module, "config", None), "source_adaptive", 0):
                catch = torch.zeros_like(ids[:, :0], dtype=torch.bool)
        for made in range(1, max_new_tokens + 1):
            scores = process_logits(logits, seen, temperature=temperature if do_sample else 1.0,
                                    top_k=top_k if do_sample else None, top_p=top_p if do_sample else None,
                                    repetition_penalty=repetition_penalty)
            if do_sample:
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(1)
            else:
                nxt = scores.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            done_now = torch.isin(nxt, eos) & ~finished
            if stop_strings and tok is not None:
                for i in range(B):
                    if not finished[i]:
                        texts[i] += tok.decode([int(nxt[i])], skip_special_tokens=False)
                        if any(s in texts[i][-(len(s) + 32):] for s in stop_strings):
                            done_now[i] = True
            yield nxt, logits, finished | done_now
            finished = finished | done_now
            if bool(finished.all()) or made == max_new_tokens:
                return  # the last token is not fed: nothing would read its logits
            seen = torch.cat([seen, nxt[:, None]], 1)
            if use_cache:
                if session is not None:
                    session.state = None  # a step cut short (Ctrl-C) leaves its caches half-written
                logits, state = module.step(nxt[:, None], state)
                if session is not None:
                    session.state = state
            else:
                ids = torch.cat([ids, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
                logits, catch = _uncached_step(module, ids, mask, input_ids.shape[1], answer_mask, catch,
                                               source_entropy, made, source_max_gap)
    finally:
        module.train(was_training)


def _first_step(module: Any, input_ids: Tensor, attention_mask: Tensor, answer_mask: Tensor | None,
                session: Session | None) -> tuple[Tensor, Any]:
    """The prompt's step: from scratch, or going on from the session's state when the prompt continues it."""
    if session is None or not hasattr(module, "resume"):
        return module.step(input_ids, None, attention_mask, answer_mask=answer_mask)
    earlier, session.state = session.state, None  # a step cut short (Ctrl-C) leaves its caches half-written
    logits, session.state = module.resume(earlier, input_ids, attention_mask, answer_mask)
    return logits, session.state


def generate(
    module: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    streamer: Callable[[Tensor], None] | None = None,
    **kwargs: Any,
) -> Tensor:
    """Prompt plus new tokens [B, T + n], like transformers' `generate` (arguments: see `decode`).

    `streamer(tokens [B])` is called with each new token as it is produced.
    """
    input_ids, attention_mask = prepare_prompt(
        module, input_ids, attention_mask, kwargs.get("max_new_tokens", 256), kwargs.pop("truncate", None)
    )
    out = [input_ids]
    for nxt, _, _ in decode(module, input_ids, attention_mask, **kwargs):
        out.append(nxt[:, None])
        if streamer is not None:
            streamer(nxt)
    return torch.cat(out, 1)
