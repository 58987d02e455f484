"""Terminal front ends: streamed one-shot generation and a multi-turn chat."""

from __future__ import annotations

import sys
from typing import Any, Callable, TextIO

import torch

from ..data import Example, default_stop_strings, encode_prompt
from ..decode import Session, decode, prepare_prompt
from .text import AnswerText


class TextStreamer:
    """Prints an answer as its tokens arrive; a stop sequence ends it and is not printed."""

    def __init__(self, tokenizer: Any, out: TextIO = sys.stdout, stop_strings: list[str] | None = None):
        self.out = out
        self.answer = AnswerText(tokenizer, stop_strings or [])

    def put(self, token_id: int) -> None:
        if not self.answer.stopped:
            self._write(self.answer.add(token_id))

    def end(self) -> None:
        """The answer is over (or was interrupted): print what was held back as a possible stop's start."""
        self._write(self.answer.flush())

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def text(self, keep_stop: bool = False) -> str:
        """The answer as printed; with `keep_stop`, followed by the stop sequence that ended it."""
        return self.answer.text + ((self.answer.stop or "") if keep_stop else "")


def answer(module: Any, prompt: str | Example, gen_kwargs: dict[str, Any], on_token: Callable[[int], None],
           truncate: str | None = None, session: Session | None = None) -> list[int]:
    """Stream one answer to `prompt` (text, or ids with the answer mask of earlier turns from `encode_prompt`);
    `session` keeps the caches of the conversation's earlier turns, so a turn reads only its new tokens."""
    tok = module.tokenizer
    if isinstance(prompt, str):
        prompt = encode_prompt(tok, "raw", prompt)
    ids = torch.tensor([prompt.input_ids], device=module.device)
    answers = torch.tensor([prompt.answer or [0] * ids.shape[1]], device=module.device)
    ids, mask = prepare_prompt(module, ids, torch.ones_like(ids), gen_kwargs.get("max_new_tokens", 256), truncate)
    out: list[int] = []
    for nxt, _, finished in decode(module, ids, mask, answer_mask=answers, session=session, **gen_kwargs):  # decode cuts it to ids
        t = int(nxt[0])
        out.append(t)
        if t != tok.eos_token_id:
            on_token(t)
        if bool(finished[0]):
            break
    return out


def chat_loop(module: Any, fmt: str, gen_kwargs: dict[str, Any], system: str | None = None,
              truncate: str | None = None, inp: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Multi-turn chat: /reset clears the history, /exit quits; Ctrl-C stops the current answer only."""
    tok = module.tokenizer
    stops = gen_kwargs.setdefault("stop_strings", default_stop_strings(tok, fmt))
    history: list[tuple[str, str]] = []
    session = Session()
    out.write("llm-modules chat: /reset clears the history, /exit quits, Ctrl-C stops an answer.\n")
    while True:
        try:
            q = inp("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if q in ("/exit", "/quit"):
            return
        if q == "/reset":
            history, session = [], Session()
            out.write("(history cleared)\n")
            continue
        if not q:
            continue
        streamer = TextStreamer(tok, out, stops)
        out.write("module> ")
        try:
            answer(module, encode_prompt(tok, fmt, q, history, system), gen_kwargs, streamer.put, truncate, session)
            streamer.end()
        except KeyboardInterrupt:
            streamer.end()
            out.write(" [stopped]")
        except ValueError as e:
            out.write(f"\nerror: {e}\n")
            continue
        out.write("\n")
        history.append(("user", q))
        # The answer as written (a leading space included: re-encoded, it gives back the tokens the caches
        # read, so the next turn goes on from them). The paper's closing marker is part of the answers it was
        # trained on; a chat template closes the turn itself, so its end-of-turn marker must not be in it twice.
        history.append(("assistant", streamer.text(keep_stop=fmt == "paper")))

