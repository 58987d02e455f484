"""Prompt conditioning (fast mode): answer tokens never reach the source; decoding runs no source step."""


import pytest
import torch

from llm_modules.masks import prompt_limits
from llm_modules.model import LLMModule



def _case(m, T=12, prompt=5, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, m.config.vocab_size, (rows, T), generator=g)
    answer = (torch.arange(T) >= prompt).long().expand(rows, T).clone()
    return ids, answer


def test_prompt_limits():
    a = torch.tensor([[0, 0, 1, 1, 0, 1, 1]])  # prompt, answer, a second prompt, its answer
    assert prompt_limits(a).tolist() == [[0, 1, 1, 1, 4, 4, 4]]


def test_source_every_is_validated_and_saved(build, tmp_path):
    from llm_modules.config import ModuleConfig

    with pytest.raises(ValueError, match="source_every 4 needs conditioning 'prompt'"):
        ModuleConfig(large_model="x", source_every=4)
    with pytest.raises(ValueError, match="source_every must be an integer >= 0"):
        ModuleConfig(large_model="x", conditioning="prompt", source_every=-1)
    m = build(conditioning="prompt", source_every=4)
    m.save_pretrained(tmp_path / "m")
    assert LLMModule.from_pretrained(tmp_path / "m").config.source_every == 4
    assert ModuleConfig.from_dict({"large_model": "x", "conditioning": "prompt"}).source_every == 0  # older folders


def test_answer_logits_depend_on_the_prompt_only_through_the_source(build):
    m = build(conditioning="prompt", seed=1).eval()
    ids, answer = _case(m)
    with torch.no_grad():
        states, _ = m.source(ids)
        base = m(ids, answer_mask=answer, source_states=states).logits
        later = ids.clone()
        later[:, 9] = (ids[:, 9] + 3) % m.config.vocab_size  # a later answer token
        other = states.clone()
        other[:, 5:] += torch.randn_like(other[:, 5:])  # the source's states at answer positions
        prompt = states.clone()
        prompt[:, 2] += torch.randn_like(prompt[:, 2])  # the source's state of one prompt token
        a = m(later, answer_mask=answer, source_states=states).logits
        b = m(ids, answer_mask=answer, source_states=other).logits
        c = m(ids, answer_mask=answer, source_states=prompt).logits
    assert (a[:, :9] - base[:, :9]).abs().max() <= 1e-6  # positions before the change
    assert (b - base).abs().max() <= 1e-6  # answer-position states are never read
    assert (c[:, 5:] - base[:, 5:]).abs().max() > 1e-4  # answers read the prompt's states
    token = build(seed=1).eval()
    with torch.no_grad():
        assert (token(ids, source_states=other).logits[:, 5:] - token(ids, source_states=states).logits[:, 5:]).abs().max() > 1e-4


@pytest.mark.parametrize("large,small,extra", [
    ("large_qwen2", "small_gpt_neo", {}), ("large_llama", "small_gpt2", {"tie_answer_embeddings": False}),
    ("large_qwen2", "small_qwen2", {"knowledge_path": "logits"}),
    ("large_qwen2", "small_gpt_neo", {"knowledge_path": "logits", "answer_source_tokens": 2}),
    ("large_llama", "small_gpt_neo", {"knowledge_path": "lookup", "lookup_top_k": 5}),
    ("large_qwen2", "small_gpt2", {"knowledge_path": "lookup", "answer_source_tokens": 1}),
    # the source catching up on the answer every K tokens
    ("large_qwen2", "small_gpt_neo", {"source_every": 3}),
    ("large_llama", "small_gpt_neo", {"knowledge_path": "lookup", "source_every": 2, "answer_source_tokens": 1}),
    ("large_qwen2", "small_qwen2", {"knowledge_path": "logits", "source_every": 5}),
])
def test_cached_decoding_equals_full_recomputation_without_source_steps(build, large, small, extra):
    from llm_modules.decode import decode

    m = build(large, small, conditioning="prompt", seed=2, **extra).eval()
    with torch.no_grad():
        m.generation.lm_head.weight.normal_(0, 0.3)  # a head that is not all zeros (knowledge path)
    tok = m.tokenizer
    tok.padding_side = "left"
    enc = tok(["The city of the river was founded in", "Sum 5 and 5"], return_tensors="pt", padding=True)
    calls = []
    real = m.source.forward
    m.source.forward = lambda *a, **k: (calls.append(a[0].shape[1]), real(*a, **k))[1]
    def run(cache):
        return [(t, lg) for t, lg, _ in decode(m, enc.input_ids, enc.attention_mask, max_new_tokens=64,
                                               eos_token_id=[], use_cache=cache)]

    runs = [run(True)]
    k, every = extra.get("answer_source_tokens", 0), extra.get("source_every", 0)
    # The prompt in one pass, k answer tokens one by one, then no source step, or one pass over every K tokens of the
    # 63 fed (the 64th token is never fed).
    assert calls == [enc.input_ids.shape[1]] + [1] * k + ([every] * ((63 - k) // every) if every else [])
    runs.append(run(False))
    assert torch.equal(torch.stack([t for t, _ in runs[0]]), torch.stack([t for t, _ in runs[1]]))
    assert max((x - y).abs().max().item() for (_, x), (_, y) in zip(*runs)) <= 1e-4
    assert len(runs[0]) == 64


def test_trains_saves_and_reloads(tiny_train_config, tmp_path):
    from llm_modules.training import train

    r = train(tiny_train_config(conditioning="prompt", tie_answer_embeddings=False, epochs=3,
                                output_dir=str(tmp_path / "p")), log=lambda s: None)
    assert r.best_val_loss < 0.7 * r.first_val_loss
    m = LLMModule.from_pretrained(tmp_path / "p" / "best")
    assert m.config.conditioning == "prompt" and m.answer_embed is not None
    assert "answer_embed.weight" in m.trainable_state_dict()


def test_prompt_conditioning_needs_a_causal_bridge():
    from llm_modules.config import ModuleConfig

    with pytest.raises(ValueError, match="conditioning 'prompt' needs attention 'causal'"):
        ModuleConfig(conditioning="prompt", attention="reference")


def test_chat_prompt_reads_earlier_answers_as_trained(build):
    """Decoding after a history (answer mask from `encode_prompt`) equals the training forward of the whole
    conversation at the new answer, cached or not; marking the history as plain prompt would differ."""
    from llm_modules.data import Conversation, Formatter, encode_prompt
    from llm_modules.decode import decode

    m = build(conditioning="prompt", seed=3).eval()
    with torch.no_grad():
        m.generation.lm_head.weight.normal_(0, 0.3)  # larger logits, so a wrong layout shows
    turns = [("user", "sum of 5 and 5"), ("assistant", "it is ten, " * 6), ("user", "sum of 2 and 3"), ("assistant", "five")]
    full = Formatter(m.tokenizer, "paper").encode(Conversation("Be brief.", turns))
    p = encode_prompt(m.tokenizer, "paper", "sum of 2 and 3", turns[:2], "Be brief.")
    n = len(p.input_ids)
    ids, answer = torch.tensor([p.input_ids]), torch.tensor([p.answer])
    with torch.no_grad():
        want = m(torch.tensor([full.input_ids]), answer_mask=torch.tensor([full.answer])).logits[0, n - 1]

    def first(cache, mask):
        return next(decode(m, ids, answer_mask=mask, max_new_tokens=1, eos_token_id=[], use_cache=cache))[1][0]

    assert (first(True, answer) - want).abs().max() <= 1e-4
    assert (first(False, answer) - want).abs().max() <= 1e-4
    assert (first(True, torch.zeros_like(answer)) - want).abs().max() > 2e-3  # 20x the tolerance above


def test_answer_embeddings_are_their_own_table_when_the_head_starts_at_zero(build):
    """With the knowledge path the head starts at zero; tied to it, every answer token would enter the trunk
    as the same vector. By default such a module gets its own table, and distinct tokens differ."""
    fast = build(conditioning="prompt", knowledge_path="logits")
    assert fast.answer_embed is not None
    e = fast.answer_embeddings(torch.tensor([[5, 6]]))
    assert (e[0, 0] - e[0, 1]).abs().max() > 1e-3
    plain = build(conditioning="prompt")
    assert plain.answer_embed is None  # tied to the (randomly initialised) head
    assert build(conditioning="prompt", knowledge_path="logits", tie_answer_embeddings=True).answer_embed is None


def test_the_source_reads_the_first_answer_tokens_when_asked(build):
    """answer_source_tokens=2: the first two answer tokens are read by the source like prompt; from the third
    on, answer logits ignore the source's states past them."""
    m = build(conditioning="prompt", answer_source_tokens=2, seed=4).eval()
    ids, answer = _case(m)  # prompt 0-4, answer 5-11
    with torch.no_grad():
        states, _ = m.source(ids)
        base = m(ids, answer_mask=answer, source_states=states).logits
        late = states.clone()
        late[:, 7:] += torch.randn_like(late[:, 7:])  # states from the third answer token on
        early = states.clone()
        early[:, 6] += torch.randn_like(early[:, 6])  # the second answer token's state
        a = m(ids, answer_mask=answer, source_states=late).logits
        b = m(ids, answer_mask=answer, source_states=early).logits
    assert (a - base).abs().max() <= 1e-6
    assert (b[:, 7:] - base[:, 7:]).abs().max() > 1e-4
