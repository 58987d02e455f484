import torch

from llm_modules.bridge import Bridge, Gate


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
