"""LLM Modules: knowledge transfer from a frozen large LM to a small one through Enhanced Cross-Attention."""

from .bridge import Adapter, Bridge, CrossAttention, EnhancedCrossAttention, Gate
from .config import ModuleConfig
from .model import GenerationModule, LLMModule
from .source import KnowledgeSource

__all__ = ["Adapter", "Bridge", "CrossAttention", "EnhancedCrossAttention", "Gate", "GenerationModule",
           "KnowledgeSource", "LLMModule", "ModuleConfig"]
__version__ = "0.1.0"
