"""ModuleConfig: every hyper-parameter of an LLM Module, with a JSON round trip.

Imports neither torch nor transformers, so the CLI and recipes read it instantly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("causal", "reference")
FORMATS = ("paper", "chat_template", "plain")
LOSS_ON = ("assistant", "all")


def torch_dtype(name: str) -> Any:
    """The torch dtype of a name in DTYPES."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def position_limit(hf_config: Any) -> int | None:
    """Positions a transformers model can address (max_position_embeddings or GPT-2's n_positions)."""
    return getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)


@dataclass
class PromptConfig:
    """How text is laid out for the module: set by training, read by generate / chat / eval."""

    format: str = "paper"
    """paper (the reference's `System: / User: / Assistant:` layout, EOS after each answer) | chat_template |
    plain (the turns' texts back to back, EOS after each answer: completion-style data, no system prompt)."""
    system_prompt: str | None = None
    """System prompt for conversations without one (None: the Bespoke-Stratos reasoning prompt)."""
    loss_on: str = "assistant"
    """assistant (answer tokens + the EOS that ends them) | all (every non-padding token, as the paper)."""

    def validate(self) -> None:
        _check("format", self.format, FORMATS)
        _check("loss_on", self.loss_on, LOSS_ON)


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
    attention: str = "causal"
    """`causal`: query position t reads only source positions <= t. `reference`: the reference
    code's forward exactly: cross-attention masked by padding only (NOT causal: position t reads
    source states of later tokens, so the training loss leaks the targets and generation sees a
    different distribution), trunk positions 0..T-1 whatever the padding, inputs cut at the
    trunk's position limit. Only for importing reference checkpoints."""
    source_dtype: str = "bfloat16"
    """dtype the frozen knowledge source is loaded and run in."""
    knowledge_path: str = "none"
    """`none`: the paper's design (the new head alone writes the logits). `logits`: the source's own
    next-token log-probabilities, gated per position, are added to the module's logits, and the new
    head starts at zero so the module starts as the source (llm_modules.knowledge). Reads the source's
    final states: needs source_layer -1. `lookup`: each position attends over the source positions it may
    read and adds the gated log of a mixture of the source's next-token predictions there (a pointer to
    what the source predicted where; the new head keeps its usual start). Works under prompt conditioning,
    where the source never predicts answer tokens itself."""
    lookup_top_k: int = 32
    """knowledge_path `lookup`: how many of the source's most likely next tokens are kept per source position."""
    conditioning: str = "token"
    """`token`: the paper's design, the source reads every token (answers included) and runs once per
    generated token. `prompt` (fast mode): answer tokens never reach the source; inside an answer the
    trunk reads its own token embedding and the bridge reads the source's states of the prompt before
    that answer only, so generation costs no source step (llm_modules.masks.prompt_limits)."""
    answer_source_tokens: int = 0
    """Prompt conditioning: the source also reads the first N tokens of each answer (they are handled as prompt),
    so generation costs N source steps per answer instead of none; later answer tokens read the source's states
    up to there. Lets the source spell the start of an answer (e.g. a multi-token name) at a bounded cost."""
    source_every: int = 0
    """Prompt conditioning: the source catches up on the answer every K answer tokens (past the first
    `answer_source_tokens`), reading the K tokens it has not read in one forward; answer tokens read its states up
    to its last catch-up (training masks them alike). 0 (default): never, pure fast mode. The source then costs one
    forward of K tokens per K answer tokens, where token conditioning costs K forwards of one."""
    source_adaptive: float = 0.0
    """Prompt conditioning, the adaptive schedule (llm_modules.schedule): decoding makes the source catch up on the
    answer where the module is unsure of the next token (entropy over `source_entropy`); training draws catch-ups at
    random, each answer token one with this probability, so the module learns both to read stale states and to use
    fresh ones. 0 (default): off. Excludes `source_every`."""
    source_entropy: float = 1.0
    """The adaptive schedule's threshold in nats: a catch-up where the module's next-token entropy exceeds it (higher:
    fewer source reads). Decoding can override it (`--source-entropy`)."""
    source_max_gap: int = 0
    """The adaptive schedule: also catch up wherever the source has not read the last `source_max_gap` answer tokens,
    however sure the module is (a module can be sure and wrong, e.g. repeating itself where it should copy a name
    it cannot see). 0 (default): no such bound. Decoding can override it (`--source-max-gap`)."""
    tie_answer_embeddings: bool | None = None
    """Prompt conditioning: the answer tokens' input embedding is the new head's weight (True) or a table of its
    own (False). None (default): tied, except with the knowledge path, whose head starts at zero: tied to it, every
    answer token would enter the trunk as nearly the same vector (measured: 0% on multi-token answers)."""
    vocab_size: int | None = None
    """Size of the new LM head: len(large tokenizer). Filled in when the module is built."""
    fingerprint: dict[str, Any] | None = None
    """Fingerprint of the knowledge source the module was trained against (set on save)."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt layout the module was trained with (what inference defaults to)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Descriptive metadata only (e.g. the checkpoint a module was converted from); never read."""

    def __post_init__(self) -> None:
        if isinstance(self.prompt, dict):
            self.prompt = PromptConfig(**self.prompt)
        self.validate()

    @property
    def ties_answer_embeddings(self) -> bool:
        """`tie_answer_embeddings` resolved (None: tied unless the knowledge path zero-initialises the head)."""
        if self.tie_answer_embeddings is None:
            return self.knowledge_path != "logits"
        return self.tie_answer_embeddings

    @property
    def causal(self) -> bool:
        return self.attention == "causal"

    @property
    def reference_compat(self) -> bool:
        return self.attention == "reference"

    def validate(self) -> None:
        _check("init_small", self.init_small, ("pretrained", "scratch"))
        _check("gate_init", self.gate_init, ("paper", "closed"))
        _check("source_dtype", self.source_dtype, DTYPES)
        _check("attention", self.attention, ATTENTION)
        _check("knowledge_path", self.knowledge_path, ("none", "logits", "lookup"))
        _check("conditioning", self.conditioning, ("token", "prompt"))
        if self.conditioning == "prompt" and self.attention != "causal":
            raise ValueError("conditioning 'prompt' needs attention 'causal'")
        if not isinstance(self.answer_source_tokens, int) or self.answer_source_tokens < 0:
            raise ValueError(f"answer_source_tokens must be an integer >= 0, got {self.answer_source_tokens!r}")
        if isinstance(self.source_every, bool) or not isinstance(self.source_every, int) or self.source_every < 0:
            raise ValueError(f"source_every must be an integer >= 0, got {self.source_every!r}")
        if self.source_every and self.conditioning != "prompt":
            raise ValueError(f"source_every {self.source_every} needs conditioning 'prompt' (under conditioning "
                             f"'{self.conditioning}' the source reads every answer token already)")
        if isinstance(self.source_adaptive, bool) or not isinstance(self.source_adaptive, (int, float)) \
                or not 0.0 <= self.source_adaptive < 1.0:
            raise ValueError(f"source_adaptive must be a probability in [0, 1), got {self.source_adaptive!r}")
        if self.source_adaptive and self.conditioning != "prompt":
            raise ValueError(f"source_adaptive {self.source_adaptive} needs conditioning 'prompt' (under conditioning "
                             f"'{self.conditioning}' the source reads every answer token already)")
        if self.source_adaptive and self.source_every:
            raise ValueError("source_adaptive and source_every are two schedules: set one of them")
        if isinstance(self.source_max_gap, bool) or not isinstance(self.source_max_gap, int) or self.source_max_gap < 0:
            raise ValueError(f"source_max_gap must be an integer >= 0, got {self.source_max_gap!r}")
        if self.source_max_gap and not self.source_adaptive:
            raise ValueError(f"source_max_gap {self.source_max_gap} bounds the adaptive schedule: set source_adaptive too")
        if isinstance(self.source_entropy, bool) or not isinstance(self.source_entropy, (int, float)) \
                or self.source_entropy < 0:
            raise ValueError(f"source_entropy must be a number of nats >= 0, got {self.source_entropy!r}")
        if self.knowledge_path != "none" and self.source_layer != -1:
            raise ValueError(f"knowledge_path {self.knowledge_path!r} reads the source's final states: set source_layer to -1")
        if self.knowledge_path == "lookup" and self.attention != "causal":
            raise ValueError("knowledge_path 'lookup' needs attention 'causal'")
        if not isinstance(self.lookup_top_k, int) or self.lookup_top_k < 1:
            raise ValueError(f"lookup_top_k must be an integer >= 1, got {self.lookup_top_k!r}")
        for name in ("num_layers", "num_heads", "adapter_dim"):
            if getattr(self, name) < (0 if name == "num_layers" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.prompt.validate()

    # -- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModuleConfig":
        """Build from a dict; keys of older versions (causal, reference_compat, extra) are converted."""
        d = upgrade_legacy_keys(dict(d))
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
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
        from .io import read_json

        d = read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


# Keys a recipe may set on the module (the rest are filled in by building and saving it).
MODULE_KEYS = ("large_model", "small_model", "init_small", "source_layer", "num_layers", "num_heads", "adapter_dim",
               "intermediate_dim", "dropout", "gate_init", "attention", "source_dtype", "knowledge_path", "lookup_top_k",
               "conditioning", "answer_source_tokens", "source_every", "source_adaptive", "source_entropy",
               "source_max_gap", "tie_answer_embeddings")
PROMPT_KEYS = ("format", "system_prompt", "loss_on")


def upgrade_legacy_keys(d: dict[str, Any]) -> dict[str, Any]:
    """Convert keys of llm-modules 0.1 configs and recipes in place: `causal` / `reference_compat`
    become `attention`; `extra` (free-form) gives its prompt settings to `prompt`, the rest to `notes`;
    flat `format` / `system_prompt` / `loss_on` go to `prompt`."""
    causal, ref = d.pop("causal", None), d.pop("reference_compat", None)
    for name, value in (("causal", causal), ("reference_compat", ref)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"key {name!r} must be bool, got {value!r}")
    if ref or causal is False:
        d.setdefault("attention", "reference")
    elif causal:
        d.setdefault("attention", "causal")
    prompt = dict(d.pop("prompt", None) or {})
    extra = dict(d.pop("extra", None) or {})
    for k in PROMPT_KEYS:
        if k in extra:
            prompt.setdefault(k, extra.pop(k))
        if k in d:
            prompt[k] = d.pop(k)
    if prompt:
        d["prompt"] = prompt
    if extra:
        d["notes"] = {**extra, **(d.get("notes") or {})}
    return d


def _check(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
