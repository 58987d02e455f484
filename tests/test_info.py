from transformers import GPTNeoConfig, Qwen2Config

from llm_modules.info import module_from_configs, parameter_counts


def qwen2_params(L, layers, heads, kv_heads, inter, vocab):
    kv = L // heads * kv_heads
    attn = (L * L + L) + 2 * (L * kv + kv) + L * L
    return vocab * L + layers * (attn + 3 * L * inter + 2 * L) + L


def bridge_params(L, S, A=256, n_layers=2):
    M = (L + S) // 2
    ln = lambda d: 2 * d  # noqa: E731
    pre, proj = L * L + L, L * S + S
    inter = (L * M + M) + ln(M) + (M * S + S) + ln(S)
    cross = ln(L) + ln(S) + 2 * (S * S + S) + 2 * (L * S + S)
    adapter = (S * A + A) + (A * S + S) + ln(S)
    gate = 2 * S * S + S
    return pre, proj, inter, cross + adapter + gate, pre + proj + inter + n_layers * (cross + adapter + gate)


def gpt_neo_trunk_params(S, layers, positions):
    block = 2 * (2 * S) + 3 * S * S + (S * S + S) + (S * 4 * S + 4 * S) + (4 * S * S + S)
    return positions * S + layers * block + 2 * S


def test_paper_size_counts_match_closed_form():
    large = Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                        intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)
    small = GPTNeoConfig(hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=2048,
                         vocab_size=50257, attention_types=[[["global", "local"], 6]])
    c = parameter_counts(module_from_configs(large, small, vocab_size=151646))
    pre, proj, inter, layer, bridge = bridge_params(1536, 768)
    assert (c["bridge.pre_proj"], c["bridge.proj"], c["bridge.intermediate"]) == (pre, proj, inter)
    assert c["bridge.layers.0"] == c["bridge.layers.1"] == layer
    assert c["bridge"] == bridge == 16_446_848
    assert c["source (frozen)"] == qwen2_params(1536, 28, 12, 2, 8960, 151936) == 1_543_714_304
    assert c["small trunk"] == gpt_neo_trunk_params(768, 12, 2048) == 85_028_352 + 1_572_864
    assert c["head"] == 768 * 151646 == 116_464_128
    assert c["trained"] == c["bridge"] + c["small trunk"] + c["head"]
    assert c["inference"] == c["trained"] + c["source (frozen)"]
    # Per generated token: the paper's design runs everything (1,763M); prompt conditioning no source and no
    # pre_proj / proj / intermediate (those read the source's states of new tokens).
    assert c["per-token (token)"] == c["inference"] == 1_763_226_496
    assert c["per-token (prompt)"] == 2 * layer + c["small trunk"] + c["head"] == 213_310_976  # 0.12x


def test_source_reads_per_schedule():
    from llm_modules.config import ModuleConfig
    from llm_modules.info import source_reads

    def reads(**kw):
        return source_reads(ModuleConfig(large_model="x", **kw))

    assert reads() == "source reads: every answer token, one forward each (token conditioning)"
    assert reads(conditioning="prompt") == "source reads: the prompt in one forward; no answer token after that"
    assert reads(conditioning="prompt", answer_source_tokens=1, source_every=4) == (
        "source reads: the prompt in one forward; the first 1 answer token(s) one forward each; then one forward "
        "over every 4 answer tokens (0.25 forwards per answer token)")
    assert reads(conditioning="prompt", source_adaptive=0.25, source_entropy=1.5) == (
        "source reads: the prompt in one forward; then one forward over the unread answer tokens wherever the "
        "module's next-token entropy exceeds 1.5 nats (adaptive: how often depends on the text; trained with "
        "catch-ups at 25% of answer tokens)")
    assert "exceeds 2 nats or the last 8 answer tokens are unread (adaptive" in reads(
        conditioning="prompt", source_adaptive=0.25, source_entropy=2, source_max_gap=8)
