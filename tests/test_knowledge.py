"""The knowledge path: the module starts as the source, stays causal, decodes with caches, saves and trains."""

import dataclasses
import json

import pytest
import torch

from llm_modules.knowledge import KnowledgePath, distill_loss, top_predictions
from llm_modules.model import LLMModule


def _ids(m, n=10, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, m.config.vocab_size, (rows, n), generator=g)


def _source_logp(m, ids):
    with torch.no_grad():
        h, _ = m.source(ids)
        return m.source.next_token_logits(h).float().log_softmax(-1)[..., : m.config.vocab_size]


def test_module_starts_as_the_source(build):
    m = build(knowledge_path="logits").eval()
    ids = _ids(m)
    with torch.no_grad():
        got = m(ids).logits.float().log_softmax(-1)
    torch.testing.assert_close(got, _source_logp(m, ids), atol=1e-5, rtol=0)
    plain = build().eval()  # the paper's design starts anywhere but at the source
    with torch.no_grad():
        assert (plain(ids).logits.float().log_softmax(-1) - _source_logp(m, ids)).abs().max() > 0.5


def _check_causal_and_cached(m, ids):
    """Changing token 7 changes nothing before it and position 7 itself; 24 cached decoding steps equal full
    recomputation (greedy tokens identical, logits within 1e-4)."""
    from llm_modules.decode import decode

    ids2 = ids.clone()
    ids2[0, 7] = (ids[0, 7] + 5) % m.config.vocab_size
    with torch.no_grad():
        a, b = m(ids).logits, m(ids2).logits
    assert (a[0, :7] - b[0, :7]).abs().max() <= 1e-5 and (a[0, 7] - b[0, 7]).abs().max() > 1e-3
    runs = [[(t, lg) for t, lg, _ in decode(m, ids, None, max_new_tokens=24, eos_token_id=[], use_cache=c)]
            for c in (True, False)]
    assert [int(t) for t, _ in runs[0]] == [int(t) for t, _ in runs[1]]
    assert max((x - y).abs().max().item() for (_, x), (_, y) in zip(*runs)) <= 1e-4


def test_knowledge_path_is_causal_and_caches_like_full_recomputation(build):
    m = build("large_llama", "small_gpt2", knowledge_path="logits", seed=3).eval()
    with torch.no_grad():  # a trained-looking head, so the check is not trivial
        m.generation.lm_head.weight.normal_(0, 0.5)
        m.knowledge.scale.weight.normal_(0, 0.5)
    _check_causal_and_cached(m, _ids(m, 12, 1))


@pytest.mark.parametrize("chunk", [None, 3])
def test_target_only_loss_equals_the_full_one(build, chunk):
    """Also in chunks of 3 targets, recomputed in backward (8 targets: chunks of 3, 3, 2)."""
    m = build(knowledge_path="logits", seed=4).eval()
    with torch.no_grad():
        m.generation.lm_head.weight.normal_(0, 0.3)
    ids = _ids(m, 9)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt, then the answer
    full = m(ids, labels=labels)
    only = m(ids, labels=labels, return_logits=False, loss_chunk_size=chunk)
    assert only.logits is None and only.num_tokens == full.num_tokens == 2 * 4
    assert abs(full.loss.item() - only.loss.item()) <= 1e-5
    ga = torch.autograd.grad(full.loss, m.knowledge.scale.weight)[0]
    gb = torch.autograd.grad(only.loss, m.knowledge.scale.weight)[0]
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_save_load_and_counts(build, tmp_path):
    from llm_modules.info import parameter_counts

    m = build(knowledge_path="logits").eval()
    with torch.no_grad():
        m.knowledge.scale.bias.fill_(0.3)
    m.save_pretrained(tmp_path / "k")
    m2 = LLMModule.from_pretrained(tmp_path / "k").eval()
    assert m2.source.head is not None and abs(m2.knowledge.scale.bias.item() - 0.3) < 1e-7
    ids = _ids(m)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)
    counts = parameter_counts(m2)
    assert counts["knowledge path gate"] == m.generation.hidden_size + 1
    assert counts["trained"] == sum(v.numel() for v in m2.trainable_state_dict().values())


def test_distill_loss_is_zero_at_the_source_and_positive_elsewhere():
    src = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert abs(distill_loss(src, src, mask).item()) < 1e-6
    assert distill_loss(torch.zeros(2, 5, 11), src, mask).item() > 0.1
    assert distill_loss(src, src, torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0


def test_gate_scales_source_log_probs_per_position():
    k = KnowledgePath(4)
    h, src = torch.randn(3, 4), torch.randn(3, 7)
    out = k(h, src, vocab_size=6)
    torch.testing.assert_close(out, src.log_softmax(-1)[:, :6])  # softplus(b) = 1 at the start
    wider = k(h, src, vocab_size=9)
    assert wider.shape == (3, 9) and (wider[:, 7:] == -30.0).all()


@pytest.mark.parametrize("path,extra", [("logits", {"distill_weight": 1.0}),
                                        ("lookup", {"conditioning": "prompt", "lookup_top_k": 8})])
def test_training_with_knowledge_path_and_feature_cache(tiny_train_config, tmp_path, monkeypatch, path, extra):
    """The recipe path end to end: states from the cache; the source loaded for its head only (knowledge path
    and distillation), or not at all (the lookup: its tables are in the cache)."""
    from llm_modules.knowledge_source import KnowledgeSource
    from llm_modules.training import train

    cfg = tiny_train_config(knowledge_path=path, feature_cache=True, epochs=2, output_dir=str(tmp_path / "k"),
                            cache_dir=str(tmp_path / "cache"), **extra)
    assert cfg.needs_source_head == (path == "logits")
    r = train(cfg, log=lambda s: None)
    if path == "lookup":  # once the cache is built, training never loads the source
        def boom(*a, **k):
            raise AssertionError("the knowledge source was loaded")

        with monkeypatch.context() as mp:
            mp.setattr(KnowledgeSource, "from_pretrained", boom)
            again = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "again")), log=lambda s: None)
        assert again.best_val_loss == r.best_val_loss
    assert r.best_val_loss < r.first_val_loss
    saved = json.loads((tmp_path / "k" / "best" / "llm_module.json").read_text())
    assert saved["knowledge_path"] == path
    m = LLMModule.from_pretrained(tmp_path / "k" / "best")
    gate = (m.knowledge if path == "logits" else m.lookup).scale.bias.item()
    assert gate != KnowledgePath(4).scale.bias.item()  # the gate trained
    if path == "lookup":
        assert m.config.lookup_top_k == 8 and m.lookup.top_k == 8


# -- knowledge lookup -----------------------------------------------------------------------------
def test_lookup_points_at_what_the_source_predicted_where():
    """Attention on one source position brings that position's predictions; a token no position predicts
    gets the floor; source rows past the module's vocabulary are dropped, not folded onto its last token."""
    from llm_modules.knowledge import KnowledgeLookup, LookupMemory

    k = KnowledgeLookup(stream_dim=4, source_dim=3, key_dim=2, top_k=2)
    with torch.no_grad():
        k.query.weight.copy_(torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0]]))
        k.query.bias.zero_()
    keys = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [0.0, 0.0]]])  # position 0 answers "x", position 1 "y"
    ids = torch.tensor([[[3, 4], [6, 9], [1, 2]]])
    probs = torch.tensor([[[0.9, 0.1], [0.7, 0.3], [0.5, 0.5]]])
    memory = LookupMemory(keys, ids, probs)
    h = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    allowed = torch.ones(2, 3, dtype=torch.bool)
    out = k(h, memory, torch.zeros(2, dtype=torch.long), allowed, vocab_size=8)
    assert out.shape == (2, 8)
    assert out[0].argmax() == 3 and out[1].argmax() == 6  # each query copies its position's top prediction
    assert abs(out[0, 3].item() - torch.tensor(0.9).log().item()) < 1e-3
    assert out[0, 0].item() < -13  # nobody predicts token 0: log(eps)
    # Token 9 is past the vocabulary of 8: its mass is dropped, token 7 does not get it.
    assert out[1, 7].item() < -13
    # Masking position 1 away: query 1 can only read positions 0 and 2.
    masked = k(h, memory, torch.zeros(2, dtype=torch.long), torch.tensor([[1, 1, 1], [1, 0, 1]]).bool(), 8)
    assert masked[1].argmax() != 6 and masked[1, 6].item() < -13


def test_lookup_runs_of_queries_share_their_rows_memory_and_equal_one_query_at_a_time():
    """A whole sequence's queries (runs on one batch row, read in chunks) and decoding's one query per row (read
    through per-query copies) are two ways to the same numbers, gradients included."""
    from llm_modules.knowledge import KnowledgeLookup, LookupMemory

    torch.manual_seed(0)
    k = KnowledgeLookup(stream_dim=8, source_dim=6, key_dim=4, top_k=3)
    k.CHUNK = 4  # runs of 10 and 7 queries cross chunk boundaries
    states = torch.randn(2, 9, 6)
    top = torch.randn(2, 9, 12).softmax(-1).topk(3)
    rows = torch.tensor([0] * 10 + [1] * 7)
    h = torch.randn(17, 8, requires_grad=True)
    allowed = torch.rand(17, 9) > 0.3
    allowed[:, 0] = True

    def run(together: bool):
        memory = LookupMemory(k.key(states), top.indices, top.values)
        if together:
            out = k(h, memory, rows, allowed, vocab_size=10)  # ids 10 and 11 are past the vocabulary
        else:
            out = torch.cat([k(h[i:i + 1], memory, rows[i:i + 1], allowed[i:i + 1], 10) for i in range(17)])
        return (out, *torch.autograd.grad(out.sum(), [h, k.key.weight, k.query.weight]))

    for a, b in zip(run(True), run(False)):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("conditioning", ["prompt", "token"])
def test_lookup_reads_the_source_predictions_of_its_own_turn_only(build, conditioning):
    """In a conversation's second turn the lookup points at what the source predicted in the current question (whose
    states already read the whole conversation), not at the first question's cue: changing the first turn's top-k
    tables leaves the second answer's logits alone, changing the second turn's moves them."""
    m = build(conditioning=conditioning, knowledge_path="lookup", lookup_top_k=4, seed=8).eval()
    with torch.no_grad():
        m.lookup.query.weight.normal_(0, 1.0)
    ids = _ids(m, 14, 1)
    answer = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]])  # turn 1: 0-6, turn 2: 7-13
    with torch.no_grad():
        states, _ = m.source(ids)
        top = list(top_predictions(states, m.source_logits, 4))

        def second_answer(ids_top):
            return m(ids, answer_mask=answer, source_states=states, source_top=tuple(ids_top)).logits[0, 10:]

        base = second_answer(top)
        early, late = [t.clone() for t in top], [t.clone() for t in top]
        early[0][:, :7] = (early[0][:, :7] + 1) % m.config.vocab_size  # other tokens predicted in turn 1
        late[0][:, 7:10] = (late[0][:, 7:10] + 1) % m.config.vocab_size  # ... in turn 2's question
        assert (second_answer(early) - base).abs().max() <= 1e-6
        assert (second_answer(late) - base).abs().max() > 1e-3
        want = m(ids[:, :11], answer_mask=answer[:, :11]).logits[0, -1]
    from llm_modules.decode import decode

    got = next(decode(m, ids[:, :11], answer_mask=answer[:, :11], max_new_tokens=1, eos_token_id=[]))[1][0]
    assert (got - want).abs().max() <= 1e-4  # cached decoding keeps to the turn as the forward does


def test_lookup_training_on_right_padded_rows_keeps_gradients_finite(build):
    """Padding after an answer has nothing of its own turn to read; it must not turn into NaN (distillation reads
    every position's logits, and a NaN in an ignored row still reaches the gradients)."""
    m = build(conditioning="prompt", knowledge_path="lookup", lookup_top_k=4, seed=9)
    ids = _ids(m, 10, 2)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    answer = torch.zeros_like(ids)
    answer[0, 6:], answer[1, 5:8] = 1, 1
    labels = torch.where(answer > 0, ids, torch.full_like(ids, -100))
    out = m(ids, mask, labels=labels, answer_mask=answer, distill_weight=1.0)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_lookup_is_causal_and_caches_like_full_recomputation(build):
    """Token conditioning: the memory grows by one source position per step; cached == recomputed."""
    m = build("large_qwen2", "small_gpt_neo", knowledge_path="lookup", lookup_top_k=4, seed=5).eval()
    assert m.lookup is not None and m.answer_embed is None and m.source.head is not None
    with torch.no_grad():
        m.lookup.query.weight.normal_(0, 1.0)
        m.lookup.scale.weight.normal_(0, 0.5)
    ids = _ids(m, 12, 1)
    with torch.no_grad():
        a = m(ids).logits
        bias = m.lookup.scale.bias.clone()
        m.lookup.scale.bias.fill_(-30.0)  # gate shut: the lookup's share is what moves the logits
        shut = m(ids).logits
        m.lookup.scale.bias.copy_(bias)
    assert (a - shut).abs().max() > 1.0
    _check_causal_and_cached(m, ids)


@pytest.mark.parametrize("chunk", [None, 3])
def test_lookup_target_only_loss_equals_the_full_one(build, chunk):
    m = build(conditioning="prompt", knowledge_path="lookup", seed=6).eval()
    with torch.no_grad():
        m.lookup.query.weight.normal_(0, 1.0)
    ids = _ids(m, 9)
    labels = ids.clone()
    labels[:, :5] = -100
    answer = (labels != -100).long()
    full = m(ids, labels=labels, answer_mask=answer)
    only = m(ids, labels=labels, answer_mask=answer, return_logits=False, loss_chunk_size=chunk)
    assert only.num_tokens == full.num_tokens == 2 * 4
    assert abs(full.loss.item() - only.loss.item()) <= 1e-5
    ga = torch.autograd.grad(full.loss, m.lookup.key.weight)[0]
    gb = torch.autograd.grad(only.loss, m.lookup.key.weight)[0]
    assert ga.abs().max() > 0
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_lookup_saves_loads_and_counts(build, tmp_path):
    from llm_modules.info import parameter_counts

    m = build(conditioning="prompt", knowledge_path="lookup", lookup_top_k=6).eval()
    with torch.no_grad():
        m.lookup.query.weight.normal_(0, 1.0)
    m.save_pretrained(tmp_path / "l")
    m2 = LLMModule.from_pretrained(tmp_path / "l").eval()
    assert m2.source.head is not None and m2.lookup.top_k == 6
    ids, answer = _ids(m, 9), torch.tensor([[0] * 5 + [1] * 4] * 2)
    with torch.no_grad():
        assert torch.equal(m(ids, answer_mask=answer).logits, m2(ids, answer_mask=answer).logits)
    counts = parameter_counts(m2)
    assert counts["knowledge lookup"] == sum(p.numel() for p in m2.lookup.parameters())
    assert counts["trained"] == sum(v.numel() for v in m2.trainable_state_dict().values())
    # Per new token in fast mode: the query and the gate run, the keys were built with the prompt.
    plain = parameter_counts(build(conditioning="prompt"))
    extra = sum(p.numel() for p in (*m2.lookup.query.parameters(), *m2.lookup.scale.parameters()))
    assert counts["per-token (prompt)"] == plain["per-token (prompt)"] + extra
