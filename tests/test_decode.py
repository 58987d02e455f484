import itertools

import pytest
import torch

from llm_modules.decode import decode, process_logits

from conftest import LARGE, SMALL
from conftest import run_decode as _run


def _prompts(tok, texts):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("large,small", list(itertools.product(LARGE, SMALL)))
def test_cached_decoding_equals_full_recomputation(build, large, small):
    m = build(large, small, seed=1)
    ids, mask = _prompts(m.tokenizer, ["The city of the river was founded in", "Sum 5 and 5"])
    t_cache, l_cache = _run(m, ids, mask, True)
    t_full, l_full = _run(m, ids, mask, False)
    assert t_cache.shape == (2, 64)
    assert torch.equal(t_cache, t_full)
    assert (l_cache - l_full).abs().max() <= 1e-4


def test_batched_left_padded_equals_single(build):
    m = build(seed=2)
    texts = ["The blue river of the north", "A"]
    ids, mask = _prompts(m.tokenizer, texts)
    batch, _ = _run(m, ids, mask, True, n=16)
    for i, t in enumerate(texts):
        one, _ = _run(m, *_prompts(m.tokenizer, [t]), True, n=16)
        assert torch.equal(one[0], batch[i])


def test_sampling_is_seeded_and_respects_top_k(build):
    m = build(seed=3)
    ids, mask = _prompts(m.tokenizer, ["The year"])
    a, _ = _run(m, ids, mask, True, n=20, do_sample=True, top_k=5, temperature=0.9, seed=7)
    b, _ = _run(m, ids, mask, True, n=20, do_sample=True, top_k=5, temperature=0.9, seed=7)
    c, _ = _run(m, ids, mask, True, n=20, do_sample=True, top_k=5, temperature=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every sampled token is among the 5 best of its step
    toks, logits = _run(m, ids, mask, True, n=20, do_sample=True, top_k=5, seed=9)
    top5 = logits.topk(5, -1).indices
    assert bool((top5 == toks[..., None]).any(-1).all())


def test_process_logits_top_p_repetition_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)  # 0.644, 0.237, 0.087, 0.032
    out = process_logits(logits, torch.tensor([[0]]), top_p=0.85)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = process_logits(logits, torch.tensor([[0, 3]]), repetition_penalty=2.0)
    assert out.tolist() == [[1.0, 1.0, 0.0, -2.0]]
    assert abs(probs[0, 0].item() - 0.6439) < 1e-3


def test_stops_at_eos_and_stop_string(build):
    m = build(seed=4)
    ids, mask = _prompts(m.tokenizer, ["The"])
    free, _ = _run(m, ids, mask, True, n=10)
    first = int(free[0, 3])
    steps = list(decode(m, ids, mask, max_new_tokens=10, eos_token_id=first))
    assert len(steps) == 4 and bool(steps[-1][2].all())
    text = m.tokenizer.decode(free[0, :3])
    stop = text[-2:] if len(text) >= 2 else text
    steps = list(decode(m, ids, mask, max_new_tokens=10, eos_token_id=[], stop_strings=[stop]))
    assert len(steps) <= 3


@pytest.mark.parametrize("rows,n", [(3, 3), (3, 5), (1, 1)])
def test_stop_strings_that_never_match_leave_the_length_alone(build, rows, n):
    """max_new_tokens tokens for every row, whatever the batch size (a row loop once cut this short), and no step
    is run for the last one."""
    m = build(seed=4)
    ids, mask = _prompts(m.tokenizer, ["The", "Sum 5", "A long river"][:rows])
    calls = []
    real = m.step
    m.step = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    steps = list(decode(m, ids, mask, max_new_tokens=n, eos_token_id=[], stop_strings=["never occurs"]))
    assert len(steps) == n and not bool(steps[-1][2].any())
    assert len(calls) == n  # the prompt, then n - 1 tokens fed


def test_too_long_prompt_is_clear_error_or_cut_left(build):
    m = build()  # 256 positions
    ids = torch.randint(10, 100, (1, 250))
    with pytest.raises(ValueError, match="prompt of 250 tokens \\+ max_new_tokens 10 exceeds the context limit of 256"):
        m.generate(ids, max_new_tokens=10)
    with pytest.warns(UserWarning, match="cut from the left: 250 -> 246"):
        out = m.generate(ids, max_new_tokens=10, truncate="left", eos_token_id=[])
    assert out.shape == (1, 256) and torch.equal(out[0, :246], ids[0, 4:])


def test_cut_text_at_eos_and_first_stop():
    from llm_modules.decode import cut_text

    assert cut_text("a <|end_of_solution|> b <|x|>", ["<|x|>", "<|end_of_solution|>"]) == "a <|end_of_solution|>"
    assert cut_text("abc<eos>def<|x|>", ["<|x|>"], "<eos>") == "abc"
    assert cut_text("plain", [], None) == "plain"
