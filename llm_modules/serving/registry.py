"""The modules a server holds: each saved module by name, every knowledge source loaded once.

A knowledge source is frozen, so any number of modules trained against the same one can share a
single loaded copy (as LoRA servers share one base model). Modules are grouped by the fingerprint
saved with them (config and weight hashes) and the dtype they run the source in; each group loads
its source once and the modules wrap that same model (with their own source layer, and the head
only when one of them reads it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import ModuleConfig
from ..data import default_stop_strings
from ..decode import context_limit
from ..model import LLMModule, check_fingerprint, module_config_path
from ..knowledge_source import KnowledgeSource, load_causal_lm


@dataclass
class ServedModule:
    """One module as the server offers it: its id, the model, and how prompts are laid out for it."""

    name: str
    module: LLMModule
    path: str
    created: int = 0

    @property
    def tokenizer(self) -> Any:
        return self.module.tokenizer

    @property
    def format(self) -> str:
        return self.module.config.prompt.format

    @property
    def system_prompt(self) -> str | None:
        return self.module.config.prompt.system_prompt

    @property
    def stop_strings(self) -> list[str]:
        return default_stop_strings(self.tokenizer, self.format)

    @property
    def source_name(self) -> str:
        """The source as clients see it: its hub id, or the name of its folder or file (paths stay in the logs)."""
        return display_name(self.module.config.large_model)

    @property
    def context_limit(self) -> int | None:
        """Positions a prompt plus its answer may take (the trunk's and the source's limits)."""
        return context_limit(self.module)


def display_name(source: str) -> str:
    """A hub id ("Qwen/Qwen2-1.5B") as it is; a local folder or file by its last component, never the path on disk."""
    name = source.split("::")[-1]
    local = "::" in source or name.endswith(".gguf") or name.startswith(("/", ".", "~")) or os.path.exists(name)
    return Path(name.rstrip("/\\")).name or name if local else name


def parse_model_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`--model DIR` or `--model NAME=DIR` -> [(name, dir)]; the name defaults to the folder's name
    (its parent's for a trainer's `best`/`last`). Names must be unique."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            p = Path(spec).resolve()
            name = p.parent.name if p.name in ("best", "last") else p.name
        if not name or not path:
            raise ValueError(f"--model {spec!r}: expected DIR or NAME=DIR")
        if any(name == n for n, _ in out):
            raise ValueError(f"--model: the name {name!r} is given twice (use NAME=DIR to tell them apart)")
        out.append((name, path))
    if not out:
        raise ValueError("serve needs at least one --model")
    return out


def check_specs(specs: list[tuple[str, str]]) -> None:
    """Every folder holds a saved module (a one-line error otherwise); nothing is loaded."""
    for _, path in specs:
        ModuleConfig.load(module_config_path(Path(path)))


def _source_key(cfg: ModuleConfig) -> str:
    fp = cfg.fingerprint
    ident = f"{fp['config_sha256']}:{fp['weights_sha256']}" if fp else f"ref:{cfg.large_model}"
    return f"{ident}:{cfg.source_dtype}"


@dataclass
class Registry:
    modules: dict[str, ServedModule] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)  # source key -> the loaded causal LM

    def get(self, name: str) -> ServedModule | None:
        return self.modules.get(name)


def load_registry(specs: list[tuple[str, str]], log: Callable[[str], None] = print,
                  large_model: str | None = None) -> Registry:
    """Load every module; each distinct knowledge source once (`large_model` overrides where they live)."""
    import time

    configs = [(name, path, ModuleConfig.load(module_config_path(Path(path)))) for name, path in specs]
    reg = Registry()
    for name, path, cfg in configs:
        key = _source_key(cfg)
        if key not in reg.sources:
            ref = large_model or cfg.large_model
            log(f"loading knowledge source {ref} ({cfg.source_dtype})")
            reg.sources[key] = load_causal_lm(ref, cfg.source_dtype).eval()
        lm = reg.sources[key]
        source = KnowledgeSource(lm, large_model or cfg.large_model, cfg.source_layer,
                                 keep_head=cfg.knowledge_path != "none")
        check_fingerprint(cfg.fingerprint, source.fingerprint(), path)
        module = LLMModule.from_pretrained(path, source, ignore_fingerprint=True).eval()  # checked just above
        reg.modules[name] = ServedModule(name, module, path, int(time.time()))
        log(f"module {name!r} from {path} (source {cfg.large_model}, conditioning {cfg.conditioning})")
    return reg
