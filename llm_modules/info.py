"""Parameter counts per part of an LLM Module, for saved modules or from configs alone (meta device)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig

from .config import ModuleConfig
from .model import LLMModule
from .knowledge_source import KnowledgeSource


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(module: LLMModule) -> dict[str, int]:
    """Counts for each part; `trained` excludes the frozen source, `inference` is everything run."""
    gen = module.generation
    placeholder = gen.trunk.get_input_embeddings().weight.numel()
    counts: dict[str, int] = {}
    if module.source is not None:
        counts["source (frozen)"] = _count(module.source)
    b = module.bridge
    counts["bridge.pre_proj"] = _count(b.pre_proj)
    counts["bridge.proj"] = _count(b.proj)
    counts["bridge.intermediate"] = _count(b.intermediate)
    for i, layer in enumerate(b.layers):
        counts[f"bridge.layers.{i}"] = _count(layer)
    counts["bridge"] = _count(b)
    counts["small trunk"] = _count(gen.trunk) - placeholder
    counts["head"] = _count(gen.lm_head)
    if module.knowledge is not None:
        counts["knowledge path gate"] = _count(module.knowledge)
    if module.lookup is not None:
        counts["knowledge lookup"] = _count(module.lookup)
    counts["trained"] = (counts["bridge"] + counts["small trunk"] + counts["head"] + counts.get("knowledge path gate", 0)
                         + counts.get("knowledge lookup", 0))
    counts["inference"] = counts["trained"] + counts.get("source (frozen)", 0)
    # Run for each generated token: token conditioning (the paper's) steps the source too; prompt
    # conditioning runs only the bridge's cross-attention layers, the trunk, the head and the lookup's
    # query and gate (its keys and the source's predictions were computed with the prompt).
    counts["per-token (token)"] = counts["inference"]
    lookup = _count(module.lookup.query) + _count(module.lookup.scale) if module.lookup is not None else 0
    counts["per-token (prompt)"] = (sum(counts[f"bridge.layers.{i}"] for i in range(len(b.layers)))
                                    + counts["small trunk"] + counts["head"] + lookup)
    return counts


def per_token_parameters(model: torch.nn.Module) -> int:
    """Parameters run for each generated token: an LLM Module's in its conditioning mode, else all of them."""
    if isinstance(model, LLMModule):
        return parameter_counts(model)[f"per-token ({model.config.conditioning})"]
    return _count(model)


def source_reads(cfg: ModuleConfig) -> str:
    """How often the knowledge source runs while an answer is written, in words (`llm-modules info --model`)."""
    if cfg.conditioning == "token":
        return "source reads: every answer token, one forward each (token conditioning)"
    first = f"the first {cfg.answer_source_tokens} answer token(s) one forward each; " if cfg.answer_source_tokens else ""
    k = cfg.source_every
    rest = (f"then one forward over every {k} answer tokens ({1 / k:.3g} forwards per answer token)" if k
            else "no answer token after that")
    if cfg.source_adaptive:
        rest = (f"then one forward over the unread answer tokens wherever the module's next-token entropy exceeds "
                f"{cfg.source_entropy:g} nats" + (f" or the last {cfg.source_max_gap} answer tokens are unread"
                                                  if cfg.source_max_gap else "")
                + f" (adaptive: how often depends on the text; trained with catch-ups at {cfg.source_adaptive:.0%} of "
                  "answer tokens)")
    return f"source reads: the prompt in one forward; {first}{rest}"


def module_from_configs(
    large: PretrainedConfig, small: PretrainedConfig, vocab_size: int, **config_kwargs: Any
) -> LLMModule:
    """An LLMModule on the meta device: real shapes, no memory, no weights read."""
    cfg = ModuleConfig(large_model=getattr(large, "_name_or_path", ""), vocab_size=vocab_size, init_small="scratch", **config_kwargs)
    with torch.device("meta"):
        source = KnowledgeSource(AutoModelForCausalLM.from_config(large), name=cfg.large_model)
        trunk = AutoModel.from_config(small)
        return LLMModule(cfg, trunk, source)


def format_counts(counts: dict[str, int]) -> str:
    width = max(len(k) for k in counts)
    return "\n".join(f"{k:<{width}}  {v:>15,}" for k, v in counts.items())
