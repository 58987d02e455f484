"""TrainConfig: the options of a training run, read from a recipe YAML with `--key value` overrides.

A recipe is one flat mapping. Module keys (config.MODULE_KEYS and PROMPT_KEYS: large_model,
small_model, num_heads, ..., format, system_prompt, loss_on) go to `TrainConfig.module`, a ModuleConfig, so they are declared once,
there; every other key is a field below. Imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import MODULE_KEYS, PROMPT_KEYS, ModuleConfig, PromptConfig, upgrade_legacy_keys

LEGACY_MODULE_KEYS = ("causal", "reference_compat")


@dataclass
class TrainConfig:
    """Every option of a training run; a recipe YAML sets these keys, `--key value` overrides them."""

    module: ModuleConfig = field(default_factory=ModuleConfig)
    """The module's settings; recipe keys: see ModuleConfig (large_model, small_model, init_small,
    source_layer, num_layers, num_heads, adapter_dim, intermediate_dim, dropout, gate_init,
    attention, source_dtype, knowledge_path, lookup_top_k, conditioning, answer_source_tokens,
    source_every, source_adaptive, source_entropy, source_max_gap, tie_answer_embeddings) and PromptConfig (format, system_prompt, loss_on)."""
    init_from: str | None = None
    """Start from a saved llm-modules folder (e.g. a converted reference checkpoint) instead of building."""
    # data
    data: str | list[str] = ""
    """Training data: hub dataset name, or local .json/.jsonl/.parquet files or folders."""
    val_data: str | list[str] | None = None
    """Separate validation data; if unset, val_fraction of `data` is held out."""
    data_split: str = "train"
    """Split to read from a hub dataset."""
    max_length: int = 4096
    """Examples longer than this (in large-tokenizer tokens) are dropped, never truncated."""
    subset: float = 1.0
    """Fraction of the rows to use, drawn once from `seed` (the paper used 0.3)."""
    val_fraction: float = 0.1
    seed: int = 0
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of stopping at the first."""
    packing: bool = False
    """Pack several short training examples into one row of up to max_length tokens (no attention
    crosses an example boundary in the source, the bridge or the trunk)."""
    # optimisation
    epochs: int = 15
    max_steps: int = 0
    """Stop after this many optimiser steps (0: run all epochs)."""
    batch_size: int = 1
    grad_accum: int = 1
    lr_bridge: float = 1e-4
    lr_small: float = 5e-5
    """Learning rate of the small trunk and the new head."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    """cosine | constant (after warm-up)."""
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    """auto (bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on CPU) | fp32 | bf16 | fp16."""
    gradient_checkpointing: bool = False
    """Recompute the small trunk's activations in backward to save memory."""
    loss_chunk_size: int = 0
    """Compute the loss in chunks of this many tokens (never materialising full-vocabulary logits); 0 = off."""
    distill_weight: float = 0.0
    """Add this times KL(source || module) of the next-token distributions at every real position, prompt
    included, so the module learns to read the source in general (0 = off)."""
    distill_temperature: float = 1.0
    # evaluation, checkpoints, logging
    eval_every: int = 0
    """Also validate every N optimiser steps (0: once per epoch)."""
    eval_batch_size: int = 8
    save_every: int = 0
    """Also write the `last` checkpoint every N optimiser steps (0: once per epoch)."""
    patience: int = 5
    """Early stopping: validations without improvement before stopping (0: never)."""
    min_delta: float = 0.0
    output_dir: str = "runs/tiny"
    log_every: int = 10
    tensorboard: bool = True
    """Log to TensorBoard when it is installed."""
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA, last validation loss)."""
    device: str = "auto"
    threads: int = 0
    """torch CPU threads (0: leave as is)."""
    # frozen-feature cache (see llm_modules.features)
    feature_cache: bool = False
    """Run the knowledge source once over the data, store its states on disk, train from them. With the
    knowledge path or distillation the source is still loaded, for its output head only."""
    cache_dir: str | None = None
    """Where the feature cache lives (default: OUTPUT_DIR/features)."""
    cache_dtype: str = "float16"
    notes: dict[str, Any] = field(default_factory=dict)
    """Free-form description of the run (links, comments); stored with the trainer state, never read."""

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        """The run's own keys (module keys are ModuleConfig's)."""
        return {f.name: f for f in dataclasses.fields(cls) if f.name != "module"}

    @classmethod
    def recipe_keys(cls) -> list[str]:
        """Every key a recipe may set, in the order `--help` lists them."""
        return [*MODULE_KEYS, *PROMPT_KEYS, *cls.fields()]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such recipe file") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a recipe is a mapping of keys to values")
        d.update(overrides or {})
        return cls.from_dict(d, where=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrainConfig":
        """A flat recipe mapping -> TrainConfig; unknown keys and wrong types are named."""
        own = cls.fields()
        module_keys = set(MODULE_KEYS) | set(PROMPT_KEYS) | set(LEGACY_MODULE_KEYS)
        unknown = sorted(set(d) - set(own) - module_keys)
        if unknown:
            raise ValueError(f"{where}: unknown key(s): {', '.join(unknown)}")
        hints = {**typing.get_type_hints(ModuleConfig), **typing.get_type_hints(PromptConfig), **typing.get_type_hints(cls)}
        try:
            mod = upgrade_legacy_keys({k: _coerce(k, v, hints.get(k), where) for k, v in d.items() if k in module_keys})
            module = ModuleConfig.from_dict(mod)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}" if not str(e).startswith(where) else str(e)) from None
        cfg = cls(module=module, **{k: _coerce(k, v, hints[k], where) for k, v in d.items() if k in own})
        cfg.validate(where)
        return cfg

    def to_recipe(self) -> dict[str, Any]:
        """The flat mapping `from_dict` reads back (what a recipe YAML would say)."""
        out = {k: getattr(self.module, k) for k in MODULE_KEYS}
        out.update({k: getattr(self.module.prompt, k) for k in PROMPT_KEYS})
        out.update({k: getattr(self, k) for k in self.fields()})
        return out

    @property
    def needs_source_head(self) -> bool:
        """Training reads the source's next-token predictions: the knowledge path and distillation do, and the
        knowledge lookup unless the feature cache holds its tables."""
        lookup_live = self.module.knowledge_path == "lookup" and not self.feature_cache
        return self.module.knowledge_path == "logits" or lookup_live or self.distill_weight > 0

    def validate(self, where: str = "config") -> None:
        checks = [
            (self.schedule in ("cosine", "constant"), "schedule must be cosine or constant"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "precision must be auto, fp32, bf16 or fp16"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.epochs >= 1 or self.max_steps >= 1, "epochs or max_steps must be >= 1"),
            (bool(self.module.large_model) or bool(self.init_from), "large_model is required"),
            (bool(self.data), "data is required"),

        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{where}: {msg}")


def _coerce(name: str, value: Any, annotation: Any, where: str) -> Any:
    """YAML reads `1e-4` as a string: convert numbers to the field's declared type, or say which key is wrong."""
    kinds = [a for a in typing.get_args(annotation) or (annotation,) if a is not type(None)]
    kind = kinds[0] if kinds else None
    if name in LEGACY_MODULE_KEYS:
        kind = bool
    if value is None or kind not in (int, float, bool):
        return value
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int and (isinstance(value, bool) or float(value) != int(float(value))):
            raise ValueError
        return int(float(value)) if kind is int else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: key {name!r} must be {kind.__name__}, got {value!r}") from None


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--key value` pairs (dashes or underscores) -> typed values (parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}; overrides are --key value")
        key = a[2:].replace("-", "_")
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            val = args[i + 1]
            i += 2
        else:
            val, i = "true", i + 1
        out[key] = yaml.safe_load(val)
    return out
