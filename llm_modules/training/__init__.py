"""Training: recipes (TrainConfig), the data/module/feature pipeline, the Trainer, checkpoints, metrics.

Names are imported on first use: reading a recipe does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TrainConfig": "recipe", "parse_overrides": "recipe", "Trainer": "trainer", "TrainResult": "trainer",
            "train": "trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llm_modules.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
