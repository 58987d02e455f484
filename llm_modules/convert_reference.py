"""Import a checkpoint of the reference implementation (`model_checkpoint.pth`) into our format.

The reference stored its whole CombinedModel in fp32 under `model_state_dict`; the frozen Qwen2 part
is checked against the given large model and dropped, the rest is renamed:

    qwen.pre_proj / qwen.proj                         -> bridge.pre_proj / bridge.proj
    qwen.intermediate_layers.{0,1,3,4}                -> bridge.intermediate.{0,1,3,4}
    qwen.cross_attention_layers.i.cross_attn.norm1    -> bridge.layers.i.cross_attn.norm_source (large states)
    qwen.cross_attention_layers.i.cross_attn.norm2    -> bridge.layers.i.cross_attn.norm_stream
    qwen.cross_attention_layers.i.cross_attn.{q,k,v,out}_proj, .adapter.*  -> same names
    qwen.cross_attention_layers.i.gate                -> bridge.layers.i.gate.proj
    gptneo.base_model.transformer.*                   -> generation.trunk.* (wte unused, dropped)
    gptneo.new_lm_head.weight                         -> generation.lm_head.weight
"""

from __future__ import annotations

import os
import re
from typing import Callable

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModel

from .config import ModuleConfig
from .model import LLMModule
from .knowledge_source import KnowledgeSource, load_tokenizer

_LAYER = re.compile(r"^qwen\.cross_attention_layers\.(\d+)\.(.*)$")
_FROZEN_PREFIX = "qwen.model."
_UNUSED = ("gptneo.base_model.lm_head.", "gptneo.base_model.transformer.wte.")


def rename_reference_key(key: str) -> str | None:
    """Our name for a reference key; None for keys that are dropped (frozen source, unused tables)."""
    if key.startswith(_FROZEN_PREFIX) or key.startswith(_UNUSED):
        return None
    if key.startswith("qwen.pre_proj."):
        return "bridge.pre_proj." + key[len("qwen.pre_proj."):]
    if key.startswith("qwen.proj."):
        return "bridge.proj." + key[len("qwen.proj."):]
    if key.startswith("qwen.intermediate_layers."):
        return "bridge.intermediate." + key[len("qwen.intermediate_layers."):]
    m = _LAYER.match(key)
    if m:
        i, rest = m.groups()
        rest = rest.replace("cross_attn.norm1.", "cross_attn.norm_source.").replace("cross_attn.norm2.", "cross_attn.norm_stream.")
        if rest.startswith("gate."):
            rest = "gate.proj." + rest[len("gate."):]
        return f"bridge.layers.{i}.{rest}"
    if key.startswith("gptneo.base_model.transformer."):
        return "generation.trunk." + key[len("gptneo.base_model.transformer."):]
    if key == "gptneo.new_lm_head.weight":
        return "generation.lm_head.weight"
    return "?" + key  # unknown: reported as unexpected


def load_reference_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """torch.load with weights_only=True: tensors only, never pickled code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - torch raises several types for bad or unsafe files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({msg})") from None
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict with 'model_state_dict' of tensors (the reference's format)")
    return state


def _check_source(state: dict[str, Tensor], source: KnowledgeSource, path: str, log: Callable[[str], None]) -> None:
    frozen = {k[len(_FROZEN_PREFIX):]: v for k, v in state.items() if k.startswith(_FROZEN_PREFIX)}
    if not frozen:
        log(f"{path}: holds no frozen Qwen2 weights (qwen.model.*): the large model cannot be checked")
        return
    # The reference's keys are those of a *ForCausalLM; ours are of its base model.
    prefix = source.model.base_model_prefix + "."
    ours = dict(source.model.named_parameters())
    compared = 0
    for k, v in frozen.items():
        name = k[len(prefix):] if k.startswith(prefix) else None
        if name is None or name not in ours:
            continue
        if ours[name].shape != v.shape or not torch.equal(ours[name].detach().to(torch.bfloat16), v.to(torch.bfloat16)):
            raise ValueError(f"{path}: frozen weight {k} differs from the given large model {source.name!r}; "
                             "convert with the large model the checkpoint was trained with")
        compared += 1
        if compared >= 4:
            break
    if compared == 0:
        raise ValueError(f"{path}: its frozen weights (qwen.model.*) share no tensor name with {source.name!r}")


def convert_reference(
    ckpt: str | os.PathLike,
    large: str,
    out: str | os.PathLike,
    small: str = "EleutherAI/gpt-neo-125M",
    num_heads: int = 8,
    source_dtype: str = "float32",
    log: Callable[[str], None] = print,
) -> LLMModule:
    """Convert the reference checkpoint to a saved module with `attention="reference"`.

    The source runs in float32 by default, as the reference's did (transformers 4.x loaded Qwen2 in
    fp32): the converted module then reproduces the reference's logits to ~1e-6; in bfloat16 they
    differ by up to 2e-2.
    """
    state = load_reference_state(ckpt)
    renamed: dict[str, Tensor] = {}
    unknown = []
    for k, v in state.items():
        new = rename_reference_key(k)
        if new is None:
            continue
        if new.startswith("?"):
            unknown.append(k)
        else:
            renamed[new] = v.float()
    if unknown:
        raise ValueError(f"{ckpt}: unexpected keys not in the reference layout: {', '.join(unknown[:5])}")
    need = ["bridge.pre_proj.weight", "bridge.intermediate.0.weight", "generation.lm_head.weight",
            "bridge.layers.0.adapter.fc1.weight"]
    missing = [k for k in need if k not in renamed]
    if missing:
        raise ValueError(f"{ckpt}: missing reference keys for {', '.join(missing)}")
    n_layers = len({k.split(".")[2] for k in renamed if k.startswith("bridge.layers.")})
    tokenizer = load_tokenizer(large)
    vocab = renamed["generation.lm_head.weight"].shape[0]
    if vocab != len(tokenizer):
        raise ValueError(f"{ckpt}: new_lm_head has {vocab} rows but the tokenizer of {large!r} has {len(tokenizer)} tokens")
    cfg = ModuleConfig(
        large_model=large, small_model=small, init_small="scratch", num_layers=n_layers, num_heads=num_heads,
        adapter_dim=renamed["bridge.layers.0.adapter.fc1.weight"].shape[0],
        intermediate_dim=renamed["bridge.intermediate.0.weight"].shape[0], attention="reference",
        source_dtype=source_dtype, vocab_size=vocab, notes={"converted_from": os.path.basename(str(ckpt))},
    )
    source = KnowledgeSource.from_pretrained(large, source_dtype)
    _check_source(state, source, str(ckpt), log)
    trunk = AutoModel.from_config(AutoConfig.from_pretrained(small))
    module = LLMModule(cfg, trunk, source, tokenizer=tokenizer)
    expected = module.trainable_state_dict()
    bad_shape = [k for k, v in renamed.items() if k in expected and expected[k].shape != v.shape]
    if bad_shape:
        k = bad_shape[0]
        raise ValueError(f"{ckpt}: {k} has shape {tuple(renamed[k].shape)}, expected {tuple(expected[k].shape)} "
                         f"(is --small the trunk config the checkpoint was trained with?)")
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{ckpt}: does not match the module layout (missing: {missing[:5]}; unexpected: {unexpected[:5]})")
    module.load_state_dict(renamed, strict=False)
    module.save_pretrained(out)
    log(f"converted {len(renamed)} tensors from {ckpt} to {out} (attention 'reference'; "
        f"{sum(1 for k in state if k.startswith(_FROZEN_PREFIX))} frozen tensors checked and dropped)")
    return module

