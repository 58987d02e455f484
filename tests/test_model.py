import itertools

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from llm_modules.model import WEIGHTS_NAME, FingerprintMismatchError, LLMModule

from conftest import LARGE, SMALL

PAIRS = list(itertools.product(LARGE, SMALL))


def _batch(vocab, lengths, pad_side, pad_id=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(10, vocab, (n,), generator=g)
        sl = slice(T - n, T) if pad_side == "left" else slice(0, n)
        ids[i, sl], mask[i, sl] = row, 1
    return ids, mask


@pytest.mark.parametrize("large,small", PAIRS)
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_changing_token_k_leaves_earlier_logits_unchanged(build, large, small, pad_side):
    m = build(large, small).eval()
    V = m.config.vocab_size
    ids, mask = _batch(V, [12, 9], pad_side)
    k_rel = 5  # 6th real token of each row
    ids2 = ids.clone()
    for i in range(2):
        start = int((mask[i] == 0).sum()) if pad_side == "left" else 0
        ids2[i, start + k_rel] = (ids[i, start + k_rel] + 7) % V
    with torch.no_grad():
        a, b = m(ids, mask).logits, m(ids2, mask).logits
    for i in range(2):
        start = int((mask[i] == 0).sum()) if pad_side == "left" else 0
        k = start + k_rel
        assert (a[i, start:k] - b[i, start:k]).abs().max() <= 1e-6
        assert (a[i, k] - b[i, k]).abs().max() > 1e-4  # the change itself is seen


def test_reference_compat_leaks_future(build):
    """The reference's padding-only mask lets earlier positions read later tokens (why we default to causal)."""
    m = build(reference_compat=True).eval()
    assert m.config.causal is False
    ids, mask = _batch(m.config.vocab_size, [10], "right")
    ids2 = ids.clone()
    ids2[0, 7] = (ids[0, 7] + 3) % m.config.vocab_size
    with torch.no_grad():
        diff = (m(ids, mask).logits[0, :7] - m(ids2, mask).logits[0, :7]).abs().max()
    assert diff > 1e-4


@pytest.mark.parametrize("large,small", [("large_qwen2", "small_gpt_neo"), ("large_llama", "small_gpt2"), ("large_qwen2", "small_qwen2")])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_padding_invariance(build, large, small, pad_side):
    m = build(large, small).eval()
    ids, mask = _batch(m.config.vocab_size, [11, 6, 3], pad_side)
    with torch.no_grad():
        batched = m(ids, mask).logits
        for i in range(3):
            real = mask[i].bool()
            alone = m(ids[i : i + 1, real], mask[i : i + 1, real]).logits[0]
            assert (alone - batched[i, real]).abs().max() <= 1e-5


def test_optimizer_step_trains_bridge_trunk_head_but_never_the_source(build):
    m = build().train()
    before_src = {k: v.clone() for k, v in m.source.state_dict().items()}
    before_tr = {k: v.clone() for k, v in m.trainable_state_dict().items()}
    opt = torch.optim.AdamW([p for _, p in m.trainable_named_parameters()], lr=1e-3)
    ids, mask = _batch(m.config.vocab_size, [10, 8], "right")
    out = m(ids, mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    opt.step()
    for k, v in m.source.state_dict().items():
        assert torch.equal(v, before_src[k]), k
    assert all(p.grad is None for p in m.source.parameters())
    assert all(not p.requires_grad for p in m.source.parameters())
    after = m.trainable_state_dict()
    for prefix in ["bridge.pre_proj", "bridge.layers.1.gate", "generation.trunk.h.0", "generation.lm_head"]:
        changed = [k for k in after if k.startswith(prefix) and not torch.equal(after[k], before_tr[k])]
        assert changed, prefix
    assert not m.source.model.training


def test_save_load_round_trip_and_no_source_tensor(build, fx, tmp_path):
    m = build().eval()
    m.save_pretrained(tmp_path / "mod")
    state = load_file(str(tmp_path / "mod" / WEIGHTS_NAME))
    assert not any(k.startswith("source.") for k in state)
    assert not any("wte" in k for k in state)  # the trunk's unused embeddings are not stored
    src_shapes = {tuple(p.shape) for p in m.source.parameters()} - {tuple(p.shape) for p in m.parameters() if not any(p is q for q in m.source.parameters())}
    assert not any(tuple(v.shape) in src_shapes for v in state.values())
    from llm_modules.info import parameter_counts

    assert sum(v.numel() for v in state.values()) == parameter_counts(m)["trained"]
    m2 = LLMModule.from_pretrained(tmp_path / "mod").eval()
    ids, mask = _batch(m.config.vocab_size, [9, 5], "left")
    with torch.no_grad():
        assert torch.equal(m(ids, mask).logits, m2(ids, mask).logits)
    assert m2.config.to_dict() == m.config.to_dict()


def test_attaching_a_different_source_fails_clearly(build, fx, tmp_path):
    m = build()
    m.save_pretrained(tmp_path / "mod")
    with pytest.raises(FingerprintMismatchError, match="was trained against knowledge source .* differs .*ignore_fingerprint=True"):
        LLMModule.from_pretrained(tmp_path / "mod", large_model=fx["large_llama"])
    m2 = LLMModule.from_pretrained(tmp_path / "mod", large_model=fx["large_llama"], ignore_fingerprint=True)
    assert m2.source.model.config.model_type == "llama"


def test_fingerprint_same_model_in_bf16_matches(build, fx, tmp_path):
    m = build()
    m.save_pretrained(tmp_path / "mod")
    m2 = LLMModule.from_pretrained(tmp_path / "mod", source_dtype="bfloat16")
    assert m2.source.dtype == torch.bfloat16
    ids, mask = _batch(m.config.vocab_size, [6], "right")
    assert m2(ids, mask).logits.dtype == torch.float32  # bf16 states cast to the bridge's dtype


def test_too_long_sequence_is_a_clear_error(build):
    m = build()  # tiny GPT-Neo: 256 positions
    ids = torch.randint(10, 100, (1, 257))
    with pytest.raises(ValueError, match="257 tokens exceeds the generation module's position limit \\(256"):
        m(ids)


def test_pretrained_vs_scratch_trunk(build, fx):
    ref = AutoModel.from_pretrained(fx["small_gpt_neo"])
    pre = build(init_small="pretrained").generation.trunk
    scr = build(init_small="scratch", seed=123).generation.trunk
    assert torch.equal(pre.h[0].attn.attention.q_proj.weight, ref.h[0].attn.attention.q_proj.weight)
    assert not torch.equal(scr.h[0].attn.attention.q_proj.weight, ref.h[0].attn.attention.q_proj.weight)


@pytest.mark.parametrize("large,small", [("large_qwen2", "small_gpt_neo"), ("large_llama", "small_gpt2"), ("large_qwen2", "small_qwen2")])
def test_packed_rows_equal_separate_examples(build, large, small):
    from llm_modules.data import Example, collate, collate_packed

    m = build(large, small).eval()
    g = torch.Generator().manual_seed(5)
    exs = [Example(t, t) for t in (torch.randint(10, 400, (n,), generator=g).tolist() for n in (20, 7, 11))]
    packed = collate_packed([exs[:2], exs[2:]], pad_id=1)
    assert packed["attention_mask"][0].tolist() == [1] * 20 + [2] * 7
    plain = collate(exs, pad_id=1)
    with torch.no_grad():
        lp = m(packed["input_ids"], packed["attention_mask"]).logits
        ls = m(plain["input_ids"], plain["attention_mask"]).logits
        assert (lp[0, :20] - ls[0, :20]).abs().max() <= 1e-5
        assert (lp[0, 20:27] - ls[1, :7]).abs().max() <= 1e-5
        assert (lp[1, :11] - ls[2, :11]).abs().max() <= 1e-5
        # The loss counts every target except each example's first token.
        out = m(packed["input_ids"], packed["attention_mask"], labels=packed["labels"])
    assert out.num_tokens == (20 - 1) + (7 - 1) + (11 - 1)


def test_tokenizer_survives_model_and_module_folders(build, fx, tmp_path):
    """AutoTokenizer would swap our generic tokenizer for Qwen2Tokenizer (digits split); load_tokenizer must not."""
    from transformers import PreTrainedTokenizerFast

    from llm_modules.knowledge_source import load_tokenizer

    text = "The sum of 12 and 30 is 42.<|end_of_solution|>"
    ref = PreTrainedTokenizerFast.from_pretrained(fx["tokenizer"])(text).input_ids
    assert load_tokenizer(fx["large_qwen2"])(text).input_ids == ref
    m = build()
    m.save_pretrained(tmp_path / "mod")
    assert LLMModule.from_pretrained(tmp_path / "mod").tokenizer(text).input_ids == ref


def test_chunked_loss_equals_full_loss_in_the_module(build):
    m = build().eval()
    ids, mask = _batch(m.config.vocab_size, [12, 7], "right")
    labels = ids.masked_fill(mask == 0, -100)
    full = m(ids, mask, labels=labels)
    chunked = m(ids, mask, labels=labels, loss_chunk_size=5, return_logits=False)
    assert chunked.logits is None
    assert abs(full.loss.item() - chunked.loss.item()) <= 1e-5
    full.loss.backward()
    g_full = m.generation.lm_head.weight.grad.clone()
    m.zero_grad()
    chunked.loss.backward()
    torch.testing.assert_close(m.generation.lm_head.weight.grad, g_full, atol=1e-6, rtol=1e-5)
