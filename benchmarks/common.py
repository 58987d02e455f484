"""Mid-size random-init models shared by the benchmarks (the sizes the issues name)."""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoModelForCausalLM, GPTNeoConfig, Qwen2Config

from llm_modules.config import ModuleConfig
from llm_modules.model import LLMModule
from llm_modules.knowledge_source import KnowledgeSource

VOCAB = 32000


def mid_large_config(positions: int = 4096, hidden: int = 512, layers: int = 8) -> Qwen2Config:
    return Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden if hidden <= 512 else 2816,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=2,
                       max_position_embeddings=positions, tie_word_embeddings=True)


def mid_small_config(positions: int = 2048) -> GPTNeoConfig:
    return GPTNeoConfig(vocab_size=VOCAB, hidden_size=256, num_layers=4, num_heads=8,
                        attention_types=[[["global", "local"], 2]], max_position_embeddings=positions)


def mid_module(seed: int = 0, with_source: bool = True, large_hidden: int = 512, large_layers: int = 8, **kw) -> tuple[LLMModule, torch.nn.Module | None]:
    """(LLMModule, the large CausalLM it wraps) at the mid size, fp32, random init.

    The large model is built from its own seed, so its weights do not depend on `with_source`.
    """
    torch.manual_seed(seed + 1)
    large_cfg = mid_large_config(hidden=large_hidden, layers=large_layers)
    large = AutoModelForCausalLM.from_config(large_cfg).eval() if with_source else None
    torch.manual_seed(seed)
    trunk = AutoModel.from_config(mid_small_config())
    cfg = ModuleConfig(large_model="mid-qwen2", vocab_size=VOCAB, init_small="scratch", source_dtype="float32", **kw)
    source = KnowledgeSource(large, "mid-qwen2") if large is not None else None
    return LLMModule(cfg, trunk, source, source_hidden_size=large_hidden).eval(), large


def quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def rss_mib() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0
