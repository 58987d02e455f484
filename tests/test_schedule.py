"""The source's read schedule under prompt conditioning: catch-ups every K tokens, and adaptive ones where the
module is unsure (llm_modules.schedule)."""

import pytest
import torch

from llm_modules.decode import Session
from llm_modules.masks import every_catch_ups, prompt_limits
from llm_modules.schedule import catch_ups_for, draw_catch_ups, entropy, unsure

from conftest import run_decode

# Two answers: positions 2-5 and 8-10 (0-based), prompts before each.
ANSWERS = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1]])


def test_answer_positions_read_up_to_their_answer_s_last_catch_up():
    """A catch-up position is read as prompt is: it reads through itself, the answer tokens after it up to it."""
    catch = torch.zeros_like(ANSWERS, dtype=torch.bool)
    catch[0, [3, 9]] = True
    assert prompt_limits(ANSWERS * ~catch).tolist() == [[0, 1, 1, 3, 3, 3, 6, 7, 7, 9, 9]]
    assert prompt_limits(ANSWERS).tolist() == [[0, 1, 1, 1, 1, 1, 6, 7, 7, 7, 7]]  # none: the prompt only
    assert every_catch_ups(ANSWERS, 2).nonzero()[:, 1].tolist() == [3, 5, 9]  # each answer counted from its start
    assert every_catch_ups(ANSWERS, 3).nonzero()[:, 1].tolist() == [4, 10]
    assert every_catch_ups(ANSWERS, 1).tolist() == ANSWERS.bool().tolist()  # every token: token conditioning's reach


def test_drawn_catch_ups_follow_the_rate_and_stay_inside_answers():
    answer = torch.zeros(64, 200, dtype=torch.bool)
    answer[:, 50:] = True
    g = torch.Generator().manual_seed(1)
    drawn = draw_catch_ups(answer, 0.25, g)
    assert not drawn[:, :50].any()
    assert abs(drawn[:, 50:].float().mean().item() - 0.25) < 0.02


def test_catch_ups_for_a_forward(build):
    """Given ones are kept (inside answers); every-K's are fixed; adaptive ones are drawn afresh in training and
    from one seed outside it."""
    from llm_modules.config import ModuleConfig

    answer = torch.zeros(4, 40, dtype=torch.bool)
    answer[:, 10:] = True
    adaptive = ModuleConfig(large_model="x", conditioning="prompt", source_adaptive=0.3)
    assert torch.equal(catch_ups_for(adaptive, answer), catch_ups_for(adaptive, answer))
    torch.manual_seed(0)
    a = catch_ups_for(adaptive, answer, training=True)
    assert not torch.equal(a, catch_ups_for(adaptive, answer, training=True))
    given = torch.ones_like(answer)
    assert torch.equal(catch_ups_for(adaptive, answer, given), answer)
    every = ModuleConfig(large_model="x", conditioning="prompt", source_every=5)
    assert catch_ups_for(every, answer, training=True)[0].nonzero()[:, 0].tolist() == [14, 19, 24, 29, 34, 39]
    assert catch_ups_for(ModuleConfig(large_model="x", conditioning="prompt"), answer) is None


def test_entropy_threshold():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
    assert entropy(logits)[0].item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert unsure(logits, 1.0).tolist() == [True, False]


def test_adaptive_schedule_is_validated_and_saved(build, tmp_path):
    from llm_modules import LLMModule
    from llm_modules.config import ModuleConfig

    with pytest.raises(ValueError, match="source_adaptive 0.2 needs conditioning 'prompt'"):
        ModuleConfig(large_model="x", source_adaptive=0.2)
    with pytest.raises(ValueError, match="source_adaptive must be a probability"):
        ModuleConfig(large_model="x", conditioning="prompt", source_adaptive=1.5)
    with pytest.raises(ValueError, match="two schedules"):
        ModuleConfig(large_model="x", conditioning="prompt", source_adaptive=0.2, source_every=4)
    with pytest.raises(ValueError, match="source_entropy must be a number of nats"):
        ModuleConfig(large_model="x", source_entropy=-1)
    with pytest.raises(ValueError, match="source_max_gap 8 bounds the adaptive schedule"):
        ModuleConfig(large_model="x", conditioning="prompt", source_max_gap=8)
    with pytest.raises(ValueError, match="source_max_gap must be an integer >= 0"):
        ModuleConfig(large_model="x", conditioning="prompt", source_adaptive=0.2, source_max_gap=2.5)
    m = build(conditioning="prompt", source_adaptive=0.25, source_entropy=2.5)
    m.save_pretrained(tmp_path / "m")
    cfg = LLMModule.from_pretrained(tmp_path / "m").config
    assert (cfg.source_adaptive, cfg.source_entropy) == (0.25, 2.5)
    old = ModuleConfig.from_dict({"large_model": "x", "conditioning": "prompt"})  # folders from before
    assert (old.source_adaptive, old.source_every) == (0, 0)


def _adaptive(build, large, small, **extra):
    m = build(large, small, conditioning="prompt", source_adaptive=0.3, seed=2, **extra).eval()
    with torch.no_grad():
        m.generation.lm_head.weight.normal_(0, 0.3)  # a head that is not all zeros (knowledge path)
    tok = m.tokenizer
    tok.padding_side = "left"
    return m, tok(["The city of the river was founded in", "Sum 5 and 5"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("large,small,threshold,extra", [  # thresholds where these random modules catch up sometimes
    ("large_qwen2", "small_gpt_neo", 1.0, {"knowledge_path": "lookup"}),
    ("large_llama", "small_gpt2", 4.75, {"knowledge_path": "logits", "answer_source_tokens": 1}),
    ("large_qwen2", "small_qwen2", 3.0, {}),
])
def test_adaptive_cached_decoding_equals_full_recomputation(build, large, small, threshold, extra):
    """The source catches up exactly where a row's entropy without it is over the threshold, for that row only;
    cached decoding gives the tokens and logits of recomputing everything with the same rule; the source is called
    once for the prompt, once per answer token it reads as prompt, and once per step where some row caught up."""
    m, enc = _adaptive(build, large, small, **extra)
    calls, session = [], Session()
    real = m.source.forward
    m.source.forward = lambda *a, **k: (calls.append(a[0].shape[1]), real(*a, **k))[1]
    cached = run_decode(m, enc.input_ids, enc.attention_mask, True, source_entropy=threshold, session=session)
    m.source.forward = real
    n = extra.get("answer_source_tokens", 0)
    caught = session.state.catch_ups[:, enc.input_ids.shape[1]:]  # over the 63 answer tokens fed
    steps = int(caught.any(0).sum())
    assert 0 < int(caught.sum()) < caught[:, n:].numel() and not caught[:, :n].any()
    assert not torch.equal(caught[0], caught[1])  # rows catch up at different steps
    assert calls[0] == enc.input_ids.shape[1] and len(calls) == 1 + n + steps
    full = run_decode(m, enc.input_ids, enc.attention_mask, False, source_entropy=threshold)
    assert torch.equal(cached[0], full[0]) and (cached[1] - full[1]).abs().max() <= 1e-4
    for row in range(2):  # each row's answer is the one it gets alone
        alone = enc.attention_mask[row:row + 1].bool()[0]
        one = run_decode(m, enc.input_ids[row:row + 1, alone], None, True, source_entropy=threshold)
        assert torch.equal(one[0][0], cached[0][row])


def test_a_catch_up_changes_the_answer_and_the_rule_is_the_state_s(build):
    """A rule that always catches up reads the source at every answer token (token conditioning's reach); one that
    never does is pure fast mode; the two answers differ, so catch-ups are read."""
    m, enc = _adaptive(build, "large_qwen2", "small_gpt_neo", knowledge_path="lookup")
    ids = enc.input_ids[:1, enc.attention_mask[0].bool()]
    from llm_modules.decode import decode

    def run(rule):
        calls = []
        real = m.source.forward
        m.source.forward = lambda *a, **k: (calls.append(a[0].shape[1]), real(*a, **k))[1]
        logits, state = m.step(ids)
        state.wants_source = rule
        out = []
        for _ in range(20):
            nxt = logits.argmax(-1)
            out.append(int(nxt))
            logits, state = m.step(nxt[:, None], state)
        m.source.forward = real
        return out, calls, logits

    always = run(lambda lg: torch.ones(lg.shape[0], dtype=torch.bool))
    never = run(lambda lg: torch.zeros(lg.shape[0], dtype=torch.bool))
    assert always[1] == [ids.shape[1]] + [1] * 20 and never[1] == [ids.shape[1]]
    assert (always[2] - never[2]).abs().max() > 1e-3
    answer = torch.zeros(1, ids.shape[1] + 20, dtype=torch.long)
    answer[:, ids.shape[1]:] = 1
    every = torch.cat([ids, torch.tensor([always[0]])], 1)
    ref = m(every, answer_mask=answer, catch_ups=answer.bool()).logits[:, -1]
    assert (ref - always[2]).abs().max() <= 1e-4  # every catch-up: the forward with every position marked


def test_adaptive_module_trains_and_decodes_from_the_cli(fx, tmp_path, capsys):
    """`train --source_adaptive`, then `generate --source-entropy`: 0 nats reads the source at every answer token,
    a huge threshold never; `info --model` says which schedule the module has."""
    from llm_modules.cli import main
    from conftest import write_tiny_recipe

    recipe, _ = write_tiny_recipe(fx, tmp_path, rows=60)
    assert main(["train", "--config", str(recipe), "--conditioning", "prompt", "--knowledge_path", "lookup",
                 "--source_adaptive", "0.25", "--epochs", "2", "--lr_bridge", "0.003"]) == 0
    model = tmp_path / "run" / "best"
    capsys.readouterr()
    assert main(["info", "--model", str(model)]) == 0
    assert "exceeds 1 nats (adaptive" in capsys.readouterr().out
    from llm_modules import LLMModule

    m = LLMModule.from_pretrained(model)
    assert m.config.source_adaptive == 0.25
    calls = []
    real = m.source.forward
    m.source.forward = lambda *a, **k: (calls.append(a[0].shape[1]), real(*a, **k))[1]
    ids = m.tokenizer("What is the sum of 2 and 3?", return_tensors="pt").input_ids
    for nats, reads in ((0.0, 1 + 11), (1e6, 1)):
        calls.clear()
        run_decode(m, ids, None, True, n=12, source_entropy=nats)
        assert len(calls) == reads
    for extra in (["--source-entropy", "0"], ["--source-entropy", "1e6", "--source-max-gap", "3"]):
        assert main(["generate", "--model", str(model), "What is the sum of 2 and 3?", "--max-new-tokens", "8",
                     *extra]) == 0
        assert capsys.readouterr().out.strip()
    assert main(["generate", "--model", str(model), "x", "--source-max-gap", "-1"]) == 2
    assert "--source-max-gap must be >= 0" in capsys.readouterr().err


def test_a_session_keeps_the_catch_ups_of_earlier_answers(build):
    """A conversation's next turn from its session reads only the new tokens and equals reading the whole
    conversation with the catch-ups the first answer made (which a fresh read of the text cannot know)."""
    m, _ = _adaptive(build, "large_qwen2", "small_qwen2")
    tok = m.tokenizer
    first = torch.tensor([tok("User: capital of France? Assistant:").input_ids])
    session = Session()
    gen = run_decode(m, first, None, True, n=10, session=session, source_entropy=3.0)[0]
    caught = session.state.catch_ups.clone()
    assert 0 < int(caught.sum()) < 9
    follow = torch.tensor([tok(" User: and of Spain? Assistant:").input_ids])
    ids = torch.cat([first, gen[:, :9], follow], 1)  # the 10th token was never fed: the next prompt goes on from 9
    answer = torch.zeros_like(ids)
    answer[:, first.shape[1]:first.shape[1] + 9] = 1
    logits, state = m.resume(session.state, ids, answer_mask=answer)
    assert state.length == ids.shape[1]
    marks = torch.zeros_like(ids, dtype=torch.bool)
    marks[:, :caught.shape[1]] = caught
    with torch.no_grad():
        ref = m(ids, answer_mask=answer, catch_ups=marks).logits[:, -1]
        blind = m(ids, answer_mask=answer).logits[:, -1]  # eval mode, no catch-ups given: adaptive ones are drawn
    assert (ref - logits).abs().max() <= 1e-4 and (blind - logits).abs().max() > 1e-3


@pytest.mark.parametrize("large,small,extra", [
    ("large_qwen2", "small_gpt_neo", {"knowledge_path": "lookup"}),
    ("large_llama", "small_gpt2", {"knowledge_path": "logits", "answer_source_tokens": 2}),
])
def test_a_max_gap_bounds_how_long_the_source_lags(build, large, small, extra):
    """With a threshold never reached, `source_max_gap` M makes the source catch up every M answer tokens (a sure
    module too); cached decoding equals recomputation; with a threshold sometimes reached, no gap exceeds M."""
    m, enc = _adaptive(build, large, small, **extra)
    n = extra.get("answer_source_tokens", 0)
    for nats, gap in ((1e9, 5), (1.0 if "lookup" in extra else 4.75, 3)):
        session = Session()
        cached = run_decode(m, enc.input_ids, enc.attention_mask, True, source_entropy=nats, source_max_gap=gap,
                            session=session)
        full = run_decode(m, enc.input_ids, enc.attention_mask, False, source_entropy=nats, source_max_gap=gap)
        assert torch.equal(cached[0], full[0]) and (cached[1] - full[1]).abs().max() <= 1e-4
        caught = session.state.catch_ups[:, enc.input_ids.shape[1] + n:]  # the answer tokens past the first n
        for row in caught:
            read = [-1, *row.nonzero()[:, 0].tolist()]
            assert max(b - a for a, b in zip(read, read[1:] + [len(row)])) <= gap
        if nats == 1e9:  # only the bound: exactly every `gap` tokens
            assert caught[0].nonzero()[:, 0].tolist() == list(range(gap - 1, caught.shape[1], gap))
