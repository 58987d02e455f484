import torch
import torch.nn.functional as F

from llm_modules.loss import chunked_cross_entropy, evaluate_loss, shifted_loss


def test_shifted_loss_from_logits_or_hidden_and_chunks_agree():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100  # prompt positions are not targets
    logits = F.linear(hidden, weight)
    a, n = shifted_loss(labels, logits=logits)
    b, n2 = shifted_loss(labels, hidden=hidden, head_weight=weight, chunk_size=3)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert n == n2 == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(b, want)
    (ga,) = torch.autograd.grad(a, weight)
    (gb,) = torch.autograd.grad(b, weight)
    torch.testing.assert_close(ga, gb)


def test_chunked_cross_entropy_skips_chunks_without_targets():
    h, w = torch.randn(10, 4), torch.randn(7, 4)
    y = torch.full((10,), -100)
    y[8] = 3
    total = chunked_cross_entropy(h, w, y, chunk_size=4)
    torch.testing.assert_close(total, F.cross_entropy(F.linear(h[8:9], w), y[8:9], reduction="sum"))


def test_evaluate_loss_is_token_weighted(build):
    from llm_modules.data import Example

    m = build().eval()
    ex = [Example([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), Example([5, 6, 7], [-100, -100, 7])]
    r = evaluate_loss(m, ex, batch_size=1, pad_id=1)
    parts = [evaluate_loss(m, [e], batch_size=1, pad_id=1) for e in ex]
    assert r["tokens"] == 4 and [p["tokens"] for p in parts] == [3, 1]
    assert abs(r["loss"] - (3 * parts[0]["loss"] + parts[1]["loss"]) / 4) < 1e-6
