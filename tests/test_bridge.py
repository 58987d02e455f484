import torch

from llm_modules.bridge import Bridge, Gate
from llm_modules.masks import cross_attention_mask


def test_causal_mask_reads_only_past_and_real_keys():
    key_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    m = cross_attention_mask(key_mask, 5, causal=True)[:, 0]
    # left padded row: query 3 reads keys 2 and 3 only
    assert m[0, 3].tolist() == [False, False, True, True, False]
    # a padding query with nothing to read falls back on its own key (finite softmax)
    assert m[0, 0].tolist() == [True, False, False, False, False]
    # right padded row: query 4 (padding) reads real keys <= 4, never padding
    assert m[1, 4].tolist() == [True, True, True, False, False]
    nc = cross_attention_mask(key_mask, 5, causal=False)[:, 0]
    assert nc[1, 0].tolist() == [True, True, True, False, False]


def test_mask_with_past_offset_for_decoding():
    key_mask = torch.tensor([[0, 1, 1, 1]])
    m = cross_attention_mask(key_mask, 1, causal=True, past_len=3)[:, 0]
    assert m[0, 0].tolist() == [False, True, True, True]


def test_packed_segments_do_not_see_each_other():
    key_mask = torch.tensor([[1, 1, 2, 2, 0]])
    m = cross_attention_mask(key_mask, 5, causal=True)[0, 0]
    assert m[2].tolist() == [False, False, True, False, False]
    assert m[3].tolist() == [False, False, True, True, False]


def test_closed_gate_passes_stream_through():
    g = Gate(8, init="closed")
    x, a = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    out = g(x, a)
    g_val = torch.sigmoid(torch.tensor(-4.0))
    torch.testing.assert_close(out, g_val * a + (1 - g_val) * x)


def test_bridge_shapes_and_dtype_cast():
    b = Bridge(source_dim=24, stream_dim=16, num_heads=4, adapter_dim=8)
    h = torch.randn(2, 7, 24, dtype=torch.bfloat16)  # a bf16 source meets an fp32 bridge
    out = b(h, torch.ones(2, 7, dtype=torch.long))
    assert out.shape == (2, 7, 16) and out.dtype == torch.float32
    assert b.intermediate[0].out_features == (24 + 16) // 2


def test_bridge_is_causal_by_index():
    torch.manual_seed(0)
    b = Bridge(source_dim=12, stream_dim=8, num_heads=2, adapter_dim=4, dropout=0.0).eval()
    h = torch.randn(1, 6, 12)
    h2 = h.clone()
    h2[:, 4] += 1.0
    o1, o2 = b(h), b(h2)
    assert (o1[:, :4] - o2[:, :4]).abs().max() == 0
    assert (o1[:, 4:] - o2[:, 4:]).abs().max() > 1e-3
