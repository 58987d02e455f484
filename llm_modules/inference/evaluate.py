"""Evaluation of saved modules (and plain causal LMs beside them): greedy answers, exact match of the
answer between solution markers, and teacher-forced perplexity on a dataset."""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import torch

from ..data import (
    DataError, Example, Formatter, encode_prompt, ensure_pad_token, iter_rows, left_padded, pad_id, parse_row,
)
from ..decode import cut_text
from ..loss import evaluate_loss

SOLUTION_RE = re.compile(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.S)


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


def load_any(path: str) -> Any:
    """An LLM Module folder, or any transformers causal LM (id or path) for comparison."""
    from ..model import CONFIG_NAME, LLMModule

    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return LLMModule.from_pretrained(path).eval()
    from transformers import AutoModelForCausalLM

    from ..knowledge_source import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.tokenizer = load_tokenizer(path)
    return model


@torch.no_grad()
def answer_prompts(model: Any, prompts: Sequence[str | Example], max_new_tokens: int = 256, batch_size: int = 8,
                   stop_strings: Sequence[str] = ("<|end_of_solution|>",)) -> list[str]:
    """Greedy answers of an LLM Module or a plain causal LM to already formatted prompts: text, or token ids
    with the answer mask of earlier turns (`data.encode_prompt`)."""
    tok = ensure_pad_token(model.tokenizer)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = [p if isinstance(p, Example) else encode_prompt(tok, "raw", p) for p in prompts[i : i + batch_size]]
        ids, mask, answers = left_padded(batch, tok.pad_token_id)
        if hasattr(model, "bridge"):
            gen = model.generate(ids.to(model.device), mask.to(model.device), max_new_tokens=max_new_tokens,
                                 stop_strings=list(stop_strings), answer_mask=answers.to(model.device))
        else:
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        rows = tok.batch_decode(gen[:, ids.shape[1]:].cpu(), skip_special_tokens=False)
        out += [cut_text(row, stop_strings, tok.eos_token) for row in rows]
    return out


def read_conversations(data: str, limit: int | None = None, skip_bad_rows: bool = False) -> list[Any]:
    """The conversations of a dataset (the first `limit`); a bad row is a one-line error unless skipped."""
    convs = []
    for where, row in iter_rows(data):
        try:
            convs.append(parse_row(row, where))
        except DataError:
            if not skip_bad_rows:
                raise
        if limit and len(convs) >= limit:
            break
    if not convs:
        raise ValueError(f"{data}: no rows to evaluate")
    return convs


def last_turn(tokenizer: Any, fmt: str, conv: Any) -> tuple[Example, str]:
    """(the prompt of a conversation's last answer, laid out as training does, and that answer)."""
    # parse_row guarantees every assistant turn follows a user turn.
    last = max(i for i, (r, _) in enumerate(conv.turns) if r == "assistant")
    history, question = conv.turns[: last - 1], conv.turns[last - 1][1]
    return encode_prompt(tokenizer, fmt, question, history, conv.system), conv.turns[last][1]


def evaluate_dataset(module: Any, data: str, fmt: str | None = None, max_new_tokens: int = 256,
                     batch_size: int = 8, limit: int | None = None, skip_bad_rows: bool = False) -> dict[str, float]:
    """Perplexity on the answers (teacher-forced) and exact match of generated answers, for any supported dataset."""
    fmt = fmt or module.config.prompt.format
    convs = read_conversations(data, limit, skip_bad_rows)
    examples = [Formatter(module.tokenizer, fmt, "assistant").encode(c) for c in convs]
    loss = evaluate_loss(module, examples, batch_size, pad_id(module.tokenizer))
    prompts, refs = zip(*(last_turn(module.tokenizer, fmt, c) for c in convs))
    preds = answer_prompts(module, prompts, max_new_tokens, batch_size)
    return {"rows": len(convs), "loss": loss["loss"], "perplexity": loss["perplexity"],
            "exact_match": exact_match(preds, refs)}
