"""The terminal chat: what is printed and what the next turn's prompt carries of the answers before it."""

import io
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

import llm_modules.inference.chat as chat


@pytest.mark.parametrize("fmt,stop,kept", [
    ("chat_template", "<|im_end|>", "Paris<|im_end|>\n"),  # the template closes the turn: once, not twice
    ("paper", "<|end_of_solution|>", "Paris <|end_of_solution|>"),  # the paper's answers end in their marker
])
def test_stop_is_not_printed_and_the_history_reads_as_trained(fx, monkeypatch, fmt, stop, kept):
    tok = AutoTokenizer.from_pretrained(fx["tokenizer"])
    written = "Paris " + stop + " and more" if fmt == "paper" else "Paris" + stop + " and more"
    prompts = []

    def fake_answer(module, prompt, gen_kwargs, on_token, truncate=None, session=None):
        prompts.append(tok.decode(prompt.input_ids, skip_special_tokens=False))
        for t in tok(written, add_special_tokens=False).input_ids:
            on_token(t)  # the module goes on after the stop: nothing of it may show
        return []

    monkeypatch.setattr(chat, "answer", fake_answer)
    questions = iter(["capital of France?", "and of Spain?", "/exit"])
    out = io.StringIO()
    chat.chat_loop(SimpleNamespace(tokenizer=tok), fmt, {"max_new_tokens": 8}, system="Be brief.",
                   inp=lambda p: next(questions), out=out)
    printed = out.getvalue()
    assert printed.count("module> Paris" + (" " if fmt == "paper" else "") + "\n") == 2
    assert stop not in printed and "and more" not in printed
    assert kept in prompts[1] and stop + stop not in prompts[1] and "and more" not in prompts[1]


def test_turns_share_one_session_until_reset(fx, monkeypatch):
    """The chat keeps one decoding session per conversation (a turn reads only its new tokens); /reset starts
    another."""
    tok = AutoTokenizer.from_pretrained(fx["tokenizer"])
    sessions = []

    def fake_answer(module, prompt, gen_kwargs, on_token, truncate=None, session=None):
        sessions.append(session)
        return []

    monkeypatch.setattr(chat, "answer", fake_answer)
    questions = iter(["a", "b", "/reset", "c", "/exit"])
    chat.chat_loop(SimpleNamespace(tokenizer=tok), "paper", {}, inp=lambda p: next(questions), out=io.StringIO())
    assert sessions[0] is not None and sessions[0] is sessions[1] and sessions[2] is not sessions[1]


def test_the_history_keeps_the_answer_as_written_so_the_next_turn_can_reuse_the_caches(fx, monkeypatch):
    """An answer written with a leading space goes back into the history with it: re-encoded it gives back the
    tokens the module wrote (which the session's caches hold); stripped, it would not."""
    tok = AutoTokenizer.from_pretrained(fx["tokenizer"])
    written = tok(" sum is ten", add_special_tokens=False).input_ids
    assert tok(tok.decode(written).strip(), add_special_tokens=False).input_ids != written  # the strip would matter
    prompts = []

    def fake_answer(module, prompt, gen_kwargs, on_token, truncate=None, session=None):
        prompts.append(prompt.input_ids)
        for t in written:
            on_token(t)
        return written

    monkeypatch.setattr(chat, "answer", fake_answer)
    questions = iter(["q1", "q2", "/exit"])
    chat.chat_loop(SimpleNamespace(tokenizer=tok), "plain", {}, inp=lambda p: next(questions), out=io.StringIO())
    first, second = prompts
    assert second[:len(first) + len(written)] == first + written
