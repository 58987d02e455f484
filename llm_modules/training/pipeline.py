"""What a recipe needs before the first step: the tokenizer, the data (loaded, formatted, filtered,
split), the module (built, or loaded to fine-tune or resume) and the frozen-feature cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import position_limit
from ..data import DataReport, Example, Formatter, ensure_pad_token, load_examples, pad_id, split_examples
from ..features import FeatureCache, cache_key
from ..model import LLMModule, check_fingerprint, load_trunk, source_for
from ..knowledge_source import KnowledgeSource, fingerprint_from_files, load_model_config, load_tokenizer
from .recipe import TrainConfig

Log = Callable[[str], None]


def effective_max_length(cfg: TrainConfig, limit: int | None) -> int:
    """The recipe's length filter, tightened to the trunk's position limit when that is shorter."""
    return min(cfg.max_length, limit) if limit else cfg.max_length


def _sources(value: str | list[str] | None) -> list[str]:
    return [] if not value else [value] if isinstance(value, str) else list(value)


def prepare_data(cfg: TrainConfig, tokenizer: Any, limit: int | None, log: Log = print
                 ) -> tuple[list[Example], list[Example], DataReport]:
    """Load, format, length-filter and split; returns (train, validation, report)."""
    prompt = cfg.module.prompt
    kw = {"system_prompt": prompt.system_prompt} if prompt.system_prompt is not None else {}
    fmt = Formatter(tokenizer, prompt.format, prompt.loss_on, **kw)
    max_len = effective_max_length(cfg, limit)
    if max_len < cfg.max_length:
        log(f"max_length {cfg.max_length} exceeds the small trunk's {limit} positions: filtering at {max_len}")
    load = dict(max_length=max_len, skip_bad_rows=cfg.skip_bad_rows, split=cfg.data_split)
    examples, report = load_examples(_sources(cfg.data), fmt, **load)
    if cfg.val_data:
        val, vreport = load_examples(_sources(cfg.val_data), fmt, **load)
        train, _ = split_examples(examples, 0.0, cfg.seed, cfg.subset)
        report.dropped_too_long += vreport.dropped_too_long
        report.bad_rows += vreport.bad_rows
    else:
        train, val = split_examples(examples, cfg.val_fraction, cfg.seed, cfg.subset)
    report.train, report.validation = len(train), len(val)
    log("data: " + report.summary())
    if not train:
        raise ValueError("no training examples left after filtering")
    return train, val, report


def build_module(cfg: TrainConfig, tokenizer: Any, load_source: bool = True) -> LLMModule:
    """The module a recipe starts from: built from its models, or loaded from `init_from`."""
    m = cfg.module
    if cfg.init_from:
        module = LLMModule.from_pretrained(cfg.init_from, large_model=m.large_model or None, source_dtype=m.source_dtype,
                                           load_source=load_source, keep_source_head=cfg.distill_weight > 0)
        module.config.attention = m.attention  # e.g. fine-tune a converted reference module causally
        module.bridge.causal = module.config.causal
        return module
    config = dataclasses.replace(m, vocab_size=len(tokenizer), prompt=dataclasses.replace(m.prompt))
    source = source_for(config, keep_head=cfg.distill_weight > 0) if load_source else None
    hidden = None if source is not None else _source_hidden_size(m.large_model)
    return LLMModule(config, load_trunk(m.small_model, m.init_small), source, source_hidden_size=hidden,
                     tokenizer=tokenizer)


def _source_hidden_size(large_model: str) -> int:
    return load_model_config(large_model).hidden_size


def open_features(cfg: TrainConfig, examples: list[Example], tokenizer: Any, log: Log = print, rank: int = 0,
                  world_size: int = 1, barrier: Callable[[], None] | None = None) -> FeatureCache:
    """The recipe's feature cache, built when absent or stale; `.fingerprint` names the source."""
    m = cfg.module
    fp = fingerprint_from_files(m.large_model)
    if fp is None:
        fp = KnowledgeSource.from_pretrained(m.large_model, m.source_dtype, m.source_layer).fingerprint()
    depends = {"format": m.prompt.format, "loss_on": m.prompt.loss_on, "max_length": cfg.max_length,
               "source_dtype": m.source_dtype}
    top_k = m.lookup_top_k if m.knowledge_path == "lookup" else 0
    if top_k:  # the lookup's tables are stored too: training then never needs the source
        depends["lookup_top_k"] = top_k
    key = cache_key(fp, examples, m.source_layer, cfg.cache_dtype, depends)
    folder = Path(cfg.cache_dir or Path(cfg.output_dir) / "features")
    cache = FeatureCache.open_or_build(
        folder, examples, key,
        lambda: KnowledgeSource.from_pretrained(m.large_model, m.source_dtype, m.source_layer, keep_head=bool(top_k)),
        dtype=cfg.cache_dtype, pad_id=pad_id(tokenizer), log=log, rank=rank, world_size=world_size, barrier=barrier,
        top_k=top_k)
    cache.fingerprint = fp
    return cache


@dataclass
class RunInputs:
    """Everything a Trainer needs from a recipe."""

    module: LLMModule
    tokenizer: Any
    train: list[Example]
    val: list[Example]
    features: FeatureCache | None
    max_length: int


def prepare_run(cfg: TrainConfig, *, resume_from: Path | None = None, log: Log = print, rank: int = 0,
                world_size: int = 1, barrier: Callable[[], None] | None = None) -> RunInputs:
    """Tokenizer, module (built, or loaded from `resume_from`), data and features for a recipe."""
    m = cfg.module
    tokenizer = ensure_pad_token(load_tokenizer(m.large_model or str(cfg.init_from)))
    # From cached features the source never runs; it is loaded only when its head is read.
    load_source = not cfg.feature_cache or cfg.needs_source_head
    if resume_from is not None:
        module = LLMModule.from_pretrained(resume_from, large_model=m.large_model or None, source_dtype=m.source_dtype,
                                           load_source=load_source, keep_source_head=cfg.distill_weight > 0)
    else:
        module = build_module(cfg, tokenizer, load_source=load_source)
    module.config.prompt.format, module.config.prompt.loss_on = m.prompt.format, m.prompt.loss_on
    limit = None if module.config.reference_compat else module.generation.position_limit
    train, val, report = prepare_data(cfg, tokenizer, limit, log)
    # What inference defaults to: the system prompt most training conversations used.
    module.config.prompt.system_prompt = report.common_system()
    features = None
    if cfg.feature_cache:
        features = open_features(cfg, train + val, tokenizer, log, rank, world_size, barrier)
        check_fingerprint(module.config.fingerprint, features.fingerprint, str(cfg.init_from or resume_from))
        module.config.fingerprint = features.fingerprint  # no source loaded: record what the features came from
    return RunInputs(module, tokenizer, train, val, features, effective_max_length(cfg, limit))


def build_feature_cache(cfg: TrainConfig, log: Log = print) -> FeatureCache:
    """`llm-modules cache`: run the knowledge source once over the recipe's filtered, split data."""
    from transformers import AutoConfig

    tokenizer = ensure_pad_token(load_tokenizer(cfg.module.large_model))
    limit = None
    if not cfg.init_from:  # a converted reference module is cut, not filtered, at its limit
        limit = position_limit(AutoConfig.from_pretrained(cfg.module.small_model))
    train, val, _ = prepare_data(cfg, tokenizer, limit, log)
    return open_features(cfg, train + val, tokenizer, log)
