"""Mid-size random-init models shared by the benchmarks (the sizes the issues name)."""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoModelForCausalLM, GPTNeoConfig, Qwen2Config

from llm_modules.config import ModuleConfig
from llm_modules.model import LLMModule
from llm_modules.source import KnowledgeSource

VOCAB = 32000


def mid_large_config(positions: int = 4096) -> Qwen2Config:
    return Qwen2Config(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=positions,
                       tie_word_embeddings=True)


def mid_small_config(positions: int = 2048) -> GPTNeoConfig:
    return GPTNeoConfig(vocab_size=VOCAB, hidden_size=256, num_layers=4, num_heads=8,
                        attention_types=[[["global", "local"], 2]], max_position_embeddings=positions)


def mid_module(seed: int = 0, **kw) -> tuple[LLMModule, torch.nn.Module]:
    """(LLMModule, the large CausalLM it wraps) at the mid size, fp32, random init."""
    torch.manual_seed(seed)
    large = AutoModelForCausalLM.from_config(mid_large_config()).eval()
    trunk = AutoModel.from_config(mid_small_config())
    cfg = ModuleConfig(large_model="mid-qwen2", vocab_size=VOCAB, init_small="scratch", source_dtype="float32", **kw)
    return LLMModule(cfg, trunk, KnowledgeSource(large, "mid-qwen2")).eval(), large


def quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
