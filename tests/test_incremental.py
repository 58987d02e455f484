"""Incremental decoding state: a conversation's next turn goes on from the caches of the turn before."""

import pytest
import torch

from llm_modules.decode import Session

from conftest import run_decode as _run


@pytest.mark.parametrize("extra", [
    {},  # token conditioning: the source has read everything fed
    {"knowledge_path": "lookup", "lookup_top_k": 4},
    {"conditioning": "prompt"},  # the source catches up on the last answer, which only the trunk read
    {"conditioning": "prompt", "knowledge_path": "lookup", "answer_source_tokens": 1},
    {"conditioning": "prompt", "knowledge_path": "logits", "answer_source_tokens": 2},
    {"conditioning": "prompt", "knowledge_path": "lookup", "source_every": 4},  # caught up on 8 of the 9 fed
])
def test_a_session_reads_only_a_turns_new_tokens_and_equals_reading_it_all(build, extra):
    """Turn 2 of a conversation, going on from turn 1's caches, gives the tokens and logits of reading the whole
    conversation afresh; the source reads only what it has not read. A prompt that does not go on from the
    session's tokens is read afresh."""
    m = build("large_qwen2", "small_gpt_neo", seed=7, **extra).eval()
    with torch.no_grad():
        m.generation.lm_head.weight.normal_(0, 0.3)  # a head that is not all zeros (knowledge path)
    tok = m.tokenizer
    first = torch.tensor([tok("User: capital of France? Assistant:").input_ids])
    session = Session()
    gen = _run(m, first, None, True, n=10, session=session)[0]
    assert session.state is not None and session.state.length == first.shape[1] + 9  # the last token is not fed
    follow = torch.tensor([tok(" User: and of Spain? Assistant:").input_ids])
    ids = torch.cat([first, gen, torch.tensor([[tok.eos_token_id]]), follow], 1)
    answer = torch.zeros_like(ids)
    answer[:, first.shape[1]:first.shape[1] + 11] = 1  # the first answer and its EOS
    reads = []
    real = m.source.forward
    m.source.forward = lambda *a, **k: (reads.append(a[0].shape[1]), real(*a, **k))[1]
    resumed = _run(m, ids, None, True, n=12, answer_mask=answer, session=session)
    n, every = extra.get("answer_source_tokens", 0), extra.get("source_every", 0)
    read = n + ((9 - n) // every * every if every else 0)  # of the 9 answer tokens fed in turn 1
    unread = 10 - read if extra.get("conditioning") == "prompt" else 1
    assert reads[0] == unread + 1 + follow.shape[1] < ids.shape[1]
    reads.clear()
    fresh = _run(m, ids, None, True, n=12, answer_mask=answer)
    assert reads[0] == ids.shape[1]
    assert torch.equal(resumed[0], fresh[0]) and (resumed[1] - fresh[1]).abs().max() <= 1e-4
    other = ids.clone()
    other[0, 2] = (other[0, 2] + 1) % m.config.vocab_size  # an edited history: not a continuation
    reads.clear()
    edited = _run(m, other, None, True, n=4, answer_mask=answer, session=session)
    assert reads[0] == ids.shape[1]
    assert torch.equal(edited[0], _run(m, other, None, True, n=4, answer_mask=answer)[0])
