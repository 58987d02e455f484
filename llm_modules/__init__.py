"""LLM Modules: knowledge transfer from a frozen large LM to a small one through Enhanced Cross-Attention.

Names are imported on first use, so `import llm_modules` (and the CLI's --help) does not load
torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModuleConfig": "config", "PromptConfig": "config",
    "Adapter": "bridge", "Bridge": "bridge", "CrossAttention": "bridge", "EnhancedCrossAttention": "bridge",
    "Gate": "bridge",
    "KnowledgeSource": "knowledge_source",
    "GenerationModule": "model", "LLMModule": "model", "DecodeState": "incremental",
    # Not `decode`: importing the submodule llm_modules.decode would replace that name with the module
    # (`from llm_modules.decode import decode` is the function).
    "generate": "decode",
    "TrainConfig": "training.recipe", "Trainer": "training.trainer", "train": "training.trainer",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llm_modules' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
