"""Reference checkpoint import, checked against a re-implementation of the reference forward written here."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoForCausalLM, GPTNeoModel

from llm_modules.convert_reference import convert_reference
from llm_modules.model import LLMModule

HEADS, ADAPTER = 8, 16


def reference_layout(fx, n_layers=2, seed=0):
    """A state dict in the reference's key layout at tiny size, every trainable tensor random."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    ln = lambda d: (1 + r(d), r(d))  # noqa: E731
    qwen = AutoModelForCausalLM.from_pretrained(fx["large_qwen2"])
    L = qwen.config.hidden_size
    neo_cfg = AutoConfig.from_pretrained(fx["small_gpt_neo"])
    S = neo_cfg.hidden_size
    M = (L + S) // 2
    V = qwen.config.vocab_size
    sd = {f"qwen.model.{k}": v for k, v in qwen.state_dict().items()}
    sd |= {"qwen.pre_proj.weight": r(L, L), "qwen.pre_proj.bias": r(L), "qwen.proj.weight": r(S, L), "qwen.proj.bias": r(S),
           "qwen.intermediate_layers.0.weight": r(M, L), "qwen.intermediate_layers.0.bias": r(M),
           "qwen.intermediate_layers.3.weight": r(S, M), "qwen.intermediate_layers.3.bias": r(S)}
    sd["qwen.intermediate_layers.1.weight"], sd["qwen.intermediate_layers.1.bias"] = ln(M)
    sd["qwen.intermediate_layers.4.weight"], sd["qwen.intermediate_layers.4.bias"] = ln(S)
    for i in range(n_layers):
        p = f"qwen.cross_attention_layers.{i}."
        for name, (o, n) in {"cross_attn.q_proj": (S, S), "cross_attn.k_proj": (S, L), "cross_attn.v_proj": (S, L),
                             "cross_attn.out_proj": (S, S), "adapter.fc1": (ADAPTER, S), "adapter.fc2": (S, ADAPTER),
                             "gate": (S, 2 * S)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(o, n), r(o)
        for name, d in {"cross_attn.norm1": L, "cross_attn.norm2": S, "adapter.norm": S}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = ln(d)
    torch.manual_seed(seed)
    neo = GPTNeoForCausalLM(neo_cfg)
    with torch.no_grad():
        neo.transformer.wpe.weight.normal_(0, 0.1, generator=g)  # zeroed at init, learned afterwards
    sd |= {f"gptneo.base_model.{k}": v for k, v in neo.state_dict().items()}
    sd["gptneo.new_lm_head.weight"] = r(V, S)
    return sd, neo_cfg


def reference_forward(sd, fx, neo_cfg, ids, mask, n_layers=2):
    """The reference's forward pass from PAPER.md, written independently of llm_modules."""
    qwen = AutoModelForCausalLM.from_pretrained(fx["large_qwen2"]).eval()
    w = lambda k: sd[k]  # noqa: E731
    lin = lambda x, p: F.linear(x, w(p + ".weight"), w(p + ".bias"))  # noqa: E731
    norm = lambda x, p: F.layer_norm(x, x.shape[-1:], w(p + ".weight"), w(p + ".bias"))  # noqa: E731
    with torch.no_grad():
        H = qwen(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        P = lin(H, "qwen.pre_proj")
        R = lin(P, "qwen.proj")
        S = norm(lin(F.gelu(norm(lin(P, "qwen.intermediate_layers.0"), "qwen.intermediate_layers.1")),
                     "qwen.intermediate_layers.3"), "qwen.intermediate_layers.4")
        B, T, D = S.shape
        for i in range(n_layers):
            p = f"qwen.cross_attention_layers.{i}."
            Pn, Sn = norm(P, p + "cross_attn.norm1"), norm(S, p + "cross_attn.norm2")
            heads = lambda x: x.view(B, T, HEADS, D // HEADS).transpose(1, 2)  # noqa: E731
            q, k, v = heads(lin(Sn, p + "cross_attn.q_proj")), heads(lin(Pn, p + "cross_attn.k_proj")), heads(lin(Pn, p + "cross_attn.v_proj"))
            scores = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
            scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))  # padding only: no causal mask
            A = lin((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D), p + "cross_attn.out_proj")
            A2 = norm(lin(F.gelu(lin(A, p + "adapter.fc1")), p + "adapter.fc2"), p + "adapter.norm") + A
            g = torch.sigmoid(lin(torch.cat([S, A2], -1), p + "gate"))
            S = S + (g * A2 + (1 - g) * S)
        X = S + R
        neo = GPTNeoModel(neo_cfg).eval()
        neo.load_state_dict({k[len("gptneo.base_model.transformer."):]: v for k, v in sd.items()
                             if k.startswith("gptneo.base_model.transformer.")})
        hid = neo(inputs_embeds=X, attention_mask=mask, position_ids=torch.arange(T).expand(B, T)).last_hidden_state
        return F.linear(hid, sd["gptneo.new_lm_head.weight"])


@pytest.fixture
def converted(fx, tmp_path):
    sd, neo_cfg = reference_layout(fx)
    ckpt = tmp_path / "model_checkpoint.pth"
    torch.save({"model_state_dict": sd}, ckpt)
    convert_reference(ckpt, fx["large_qwen2"], tmp_path / "conv", small=fx["small_gpt_neo"], source_dtype="float32", log=lambda s: None)
    return sd, neo_cfg, tmp_path / "conv", ckpt


def test_converted_module_reproduces_reference_forward(fx, converted):
    sd, neo_cfg, out, _ = converted
    m = LLMModule.from_pretrained(out).eval()
    assert m.config.reference_compat and not m.bridge.causal
    ids = torch.randint(10, 400, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as the reference's collator
    with torch.no_grad():
        ours = m(ids, mask).logits
    ref = reference_forward(sd, fx, neo_cfg, ids, mask)
    assert (ours[0] - ref[0]).abs().max() <= 1e-4
    assert (ours[1, :9] - ref[1, :9]).abs().max() <= 1e-4


def test_converted_module_fine_tunes_causally(fx, converted, tmp_path):
    import json

    from llm_modules.fixtures import arith_rows
    from llm_modules.training import TrainConfig, train

    _, _, out, _ = converted
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arith_rows(60)))
    cfg = TrainConfig.from_dict(dict(init_from=str(out), large_model=fx["large_qwen2"], causal=True,
                                     source_dtype="float32", data=str(data), epochs=2, batch_size=8, lr_bridge=2e-3,
                                     lr_small=2e-3, output_dir=str(tmp_path / "ft"), progress=False, tensorboard=False))
    r = train(cfg, log=lambda s: None)
    assert r.best_val_loss < 0.7 * r.first_val_loss
    m = LLMModule.from_pretrained(tmp_path / "ft" / "best")
    assert m.config.causal and not m.config.reference_compat and m.bridge.causal


def test_cli_converts_with_a_float32_source_by_default(fx, converted, tmp_path):
    """The reference ran Qwen2 in fp32 (transformers 4.x): bf16 would move its logits by up to 2e-2."""
    from llm_modules.cli import main

    sd, neo_cfg, _, ckpt = converted
    assert main(["convert-reference", str(ckpt), "--large", fx["large_qwen2"], "--small", fx["small_gpt_neo"],
                 "--out", str(tmp_path / "cli")]) == 0
    m = LLMModule.from_pretrained(tmp_path / "cli").eval()
    assert m.config.source_dtype == "float32" and m.config.notes["converted_from"] == "model_checkpoint.pth"
    ids = torch.randint(10, 400, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (m(ids).logits - reference_forward(sd, fx, neo_cfg, ids, torch.ones_like(ids))).abs().max() <= 1e-4


def test_bad_checkpoints_are_reported(fx, converted, tmp_path):
    sd, _, _, _ = converted
    bad = dict(sd)
    bad["qwen.proj.weight"] = bad["qwen.proj.weight"][:, :10]
    torch.save({"model_state_dict": bad}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="bridge.proj.weight has shape \\(32, 10\\), expected \\(32, 48\\)"):
        convert_reference(tmp_path / "shape.pth", fx["large_qwen2"], tmp_path / "o", small=fx["small_gpt_neo"], log=lambda s: None)
    extra = dict(sd, **{"qwen.something_else.weight": torch.zeros(1)})
    torch.save({"model_state_dict": extra}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected keys not in the reference layout: qwen.something_else.weight"):
        convert_reference(tmp_path / "extra.pth", fx["large_qwen2"], tmp_path / "o", small=fx["small_gpt_neo"], log=lambda s: None)
    missing = {k: v for k, v in sd.items() if not k.startswith("gptneo.new_lm_head")}
    torch.save({"model_state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing reference keys for generation.lm_head.weight"):
        convert_reference(tmp_path / "missing.pth", fx["large_qwen2"], tmp_path / "o", small=fx["small_gpt_neo"], log=lambda s: None)
    with pytest.raises(ValueError, match="frozen weight .* differs from the given large model"):
        convert_reference(tmp_path / "model_checkpoint.pth", fx["large_llama"], tmp_path / "o", small=fx["small_gpt_neo"], log=lambda s: None)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_never_run(fx, tmp_path, capsys):
    torch.save({"model_state_dict": {"x": Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth: not a loadable weights-only checkpoint"):
        convert_reference(tmp_path / "evil.pth", fx["large_qwen2"], tmp_path / "o", small=fx["small_gpt_neo"], log=lambda s: None)
    assert "pwned" not in capsys.readouterr().out
