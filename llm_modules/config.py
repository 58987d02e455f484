"""ModuleConfig: every hyper-parameter of an LLM Module, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModuleConfig:
    """Configuration of an LLM Module (knowledge source + bridge + generation module).

    Widths of the large and small models are read from their own configs; the fields here are
    what the user chooses.
    """

    large_model: str = ""
    """Hub id or local path of the frozen knowledge source (any causal LM transformers supports)."""
    small_model: str | None = None
    """Hub id or local path of the generation module's decoder trunk."""
    small_config: dict[str, Any] | None = None
    """The small trunk's transformers config as a dict; filled in on save so a module reloads
    without the original small checkpoint."""
    init_small: str = "pretrained"
    """`pretrained`: start the trunk from `small_model`'s weights; `scratch`: random init (what the
    reference code silently did)."""
    source_layer: int = -1
    """Which entry of the source's `hidden_states` the bridge reads; -1 is the final, normed output."""
    num_layers: int = 2
    """Number of Enhanced Cross-Attention layers."""
    num_heads: int = 8
    """Heads of the bridge's cross-attention (must divide the small width)."""
    adapter_dim: int = 256
    """Bottleneck width of each adapter."""
    intermediate_dim: int | None = None
    """Hidden width of the intermediate MLP; None means (large + small) // 2."""
    dropout: float = 0.1
    """Dropout on the cross-attention weights."""
    gate_init: str = "paper"
    """`paper`: plain Linear gate (starts near 0.5); `closed`: bias -4 so the gate starts near 0 and
    the stream passes through unchanged (as Flamingo's zero-initialised gates)."""
    causal: bool = True
    """Query position t reads only source positions <= t. Turning it off leaks the future."""
    reference_compat: bool = False
    """Reproduce the reference code's forward exactly: cross-attention masked by padding only
    (NOT causal: position t reads source states of later tokens, so the training loss leaks the
    targets and generation sees a different distribution), trunk positions 0..T-1 whatever the
    padding, inputs cut at the trunk's position limit. Only for importing reference checkpoints."""
    source_dtype: str = "bfloat16"
    """dtype the frozen knowledge source is loaded and run in."""
    vocab_size: int | None = None
    """Size of the new LM head: len(large tokenizer). Filled in when the module is built."""
    fingerprint: dict[str, Any] | None = None
    """Fingerprint of the knowledge source the module was trained against (set on save)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (training recipe, notes)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.init_small not in ("pretrained", "scratch"):
            raise ValueError(f"init_small must be 'pretrained' or 'scratch', got {self.init_small!r}")
        if self.gate_init not in ("paper", "closed"):
            raise ValueError(f"gate_init must be 'paper' or 'closed', got {self.gate_init!r}")
        if self.source_dtype not in DTYPES:
            raise ValueError(f"source_dtype must be one of {DTYPES}, got {self.source_dtype!r}")
        for name in ("num_layers", "num_heads", "adapter_dim"):
            if getattr(self, name) < (0 if name == "num_layers" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.reference_compat:
            # The reference had no causal mask; the two flags cannot both hold.
            self.causal = False

    # -- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModuleConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModuleConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, self.to_json_string())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModuleConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
