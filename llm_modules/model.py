"""LLMModule: frozen knowledge source -> bridge -> generation module (small trunk + new LM head)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .bridge import Bridge
from .config import ModuleConfig
from .io import atomic_dir
from .source import KnowledgeSource, fingerprints_match, is_packed, load_tokenizer, packed_inputs, position_ids_from_mask

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "llm_module.json"


class FingerprintMismatchError(ValueError):
    """The module was trained against a different knowledge source than the one given."""


def _position_limit(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class GenerationModule(nn.Module):
    """The small decoder trunk, driven through inputs_embeds, plus a new LM head over the large vocabulary.

    The trunk's own token embeddings are never used, so they are swapped for a 1-row placeholder
    that is neither trained nor saved.
    """

    def __init__(self, trunk: PreTrainedModel, vocab_size: int):
        super().__init__()
        self.trunk = trunk
        emb = trunk.get_input_embeddings()
        placeholder = nn.Embedding(1, emb.embedding_dim)
        placeholder.requires_grad_(False)
        trunk.set_input_embeddings(placeholder)
        self.lm_head = nn.Linear(trunk.config.hidden_size, vocab_size, bias=False)
        self.position_limit = _position_limit(trunk.config)

    @property
    def hidden_size(self) -> int:
        return self.trunk.config.hidden_size

    def placeholder_prefix(self) -> str:
        emb = self.trunk.get_input_embeddings()
        for name, module in self.trunk.named_modules():
            if module is emb:
                return f"trunk.{name}."
        raise RuntimeError("input embedding not found in trunk")

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Any]:
        """Final hidden states [B, T, S] of the trunk (the head is applied by the caller)."""
        out = self.trunk(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state, (out.cache if use_cache else None)


@dataclass
class ModuleOutput:
    loss: Tensor | None = None
    logits: Tensor | None = None
    num_tokens: int = 0


def _ce_sum(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
    """Sum of cross-entropy over rows of `hidden` [N, S] without materialising [N, V] logits.

    Each chunk's logits are recomputed in backward (activation checkpointing), so peak memory
    holds one chunk of fp32 logits instead of all of them.
    """
    if hidden.shape[0] <= chunk_size:
        return _ce_sum(hidden, weight, labels)  # one chunk: nothing to save by recomputing
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[i : i + chunk_size], labels[i : i + chunk_size]
        if (y != -100).any():
            total = total + checkpoint(_ce_sum, h, weight, y, use_reentrant=False)
    return total


class LLMModule(nn.Module):
    """Knowledge source (frozen) + Bridge + GenerationModule.

    >>> module = LLMModule.build("Qwen/Qwen2-1.5B", "EleutherAI/gpt-neo-125M")
    >>> out = module(input_ids, attention_mask, labels=input_ids)
    """

    def __init__(
        self,
        config: ModuleConfig,
        trunk: PreTrainedModel,
        source: KnowledgeSource | None = None,
        *,
        source_hidden_size: int | None = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        if source is None and source_hidden_size is None:
            raise ValueError("give either a knowledge source or its hidden size")
        if config.vocab_size is None:
            raise ValueError("config.vocab_size is not set (len of the large tokenizer)")
        self.config = config
        self.source = source
        self.tokenizer = tokenizer
        L = source.hidden_size if source is not None else source_hidden_size
        self.generation = GenerationModule(trunk, config.vocab_size)
        self.bridge = Bridge(
            source_dim=L,
            stream_dim=self.generation.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            adapter_dim=config.adapter_dim,
            intermediate_dim=config.intermediate_dim,
            dropout=config.dropout,
            gate_init=config.gate_init,
            causal=config.causal and not config.reference_compat,
        )
        self.config.small_config = trunk.config.to_dict()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        large_model: str,
        small_model: str | PretrainedConfig,
        tokenizer: Any = None,
        **config_kwargs: Any,
    ) -> "LLMModule":
        """Load the knowledge source and the small trunk (pretrained weights unless init_small='scratch')."""
        small_name = small_model if isinstance(small_model, str) else None
        cfg = ModuleConfig(large_model=large_model, small_model=small_name, **config_kwargs)
        tokenizer = tokenizer or load_tokenizer(large_model)
        cfg.vocab_size = len(tokenizer)
        source = KnowledgeSource.from_pretrained(large_model, cfg.source_dtype, cfg.source_layer)
        trunk = load_trunk(small_model, cfg.init_small)
        return cls(cfg, trunk, source, tokenizer=tokenizer)

    # -- parameters -----------------------------------------------------------------------
    def trainable_named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if not name.startswith("source.") and p.requires_grad:
                yield name, p

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Bridge + small trunk + head: everything that is saved (never the frozen source)."""
        skip = self.generation.placeholder_prefix()
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith("source.") and not k.startswith("generation." + skip)
        }

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"bridge": [], "generation": []}
        for name, p in self.trainable_named_parameters():
            groups["bridge" if name.startswith("bridge.") else "generation"].append(p)
        return groups

    def train(self, mode: bool = True) -> "LLMModule":
        super().train(mode)
        if self.source is not None:
            self.source.train(False)
        return self

    @property
    def device(self) -> torch.device:
        return self.bridge.pre_proj.weight.device

    # -- forward --------------------------------------------------------------------------
    def check_length(self, length: int) -> None:
        limit = self.generation.position_limit
        if limit is not None and length > limit:
            raise ValueError(
                f"sequence of {length} tokens exceeds the generation module's position limit "
                f"({limit}, max_position_embeddings of the small model); filter or shorten the input"
            )

    def small_position_ids(self, attention_mask: Tensor) -> Tensor:
        if self.config.reference_compat:
            # The reference fed positions 0..T-1 whatever the padding.
            T = attention_mask.shape[1]
            return torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
        return position_ids_from_mask(attention_mask)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        source_states: Tensor | None = None,
        return_logits: bool = True,
        loss_chunk_size: int | None = None,
    ) -> ModuleOutput:
        """Logits [B, T, V] and, given labels, the mean shifted cross-entropy (ignore_index -100).

        `attention_mask`: 0 = padding, 1 = token; packed rows number their examples 1, 2, ... and
        no attention crosses an example boundary (in the source, the bridge and the trunk).

        `source_states` skips the knowledge source (e.g. features read from the cache).
        `loss_chunk_size` computes the loss in chunks of that many tokens, never holding the full
        [B, T, V] logits (set return_logits=False to get the memory benefit).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.config.reference_compat and self.generation.position_limit:
            cut = self.generation.position_limit
            input_ids, attention_mask = input_ids[:, :cut], attention_mask[:, :cut]
            labels = labels[:, :cut] if labels is not None else None
            source_states = source_states[:, :cut] if source_states is not None else None
        self.check_length(input_ids.shape[1])
        packed = is_packed(attention_mask)
        if source_states is None:
            if self.source is None:
                raise ValueError("this module has no knowledge source attached; pass source_states")
            source_states, _ = self.source(input_ids, attention_mask if packed else (attention_mask > 0).long())
        embeds = self.bridge(source_states, attention_mask)
        if packed:
            trunk_mask, positions = packed_inputs(attention_mask, embeds.dtype)
        else:
            trunk_mask = (attention_mask > 0).long()
            positions = self.small_position_ids(trunk_mask)
        hidden, _ = self.generation(embeds, trunk_mask, positions)
        out = ModuleOutput()
        if return_logits:
            out.logits = self.generation.lm_head(hidden)
        if labels is not None:
            shift = labels[:, 1:].reshape(-1)
            out.num_tokens = int((shift != -100).sum())
            denom = max(out.num_tokens, 1)
            if out.logits is not None:
                logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
                out.loss = F.cross_entropy(logits, shift, ignore_index=-100, reduction="sum") / denom
            else:
                # Without logits to return, run the head only where there is a target (answers only,
                # with assistant-only labels), and in chunks when asked.
                keep = shift != -100
                h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
                out.loss = chunked_cross_entropy(h, self.generation.lm_head.weight, shift[keep],
                                                 loss_chunk_size or max(1, h.shape[0])) / denom
        return out

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Cached incremental decoding; see llm_modules.generate.generate for the arguments."""
        from .generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # -- save / load ----------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, write_extra: Callable[[Path], None] | None = None,
                        state_dict: dict[str, Tensor] | None = None) -> None:
        """Write llm_module.json, ONE model.safetensors (trainable weights only) and the tokenizer, atomically.

        `write_extra(folder)` may add files (e.g. trainer state) inside the same atomic write;
        `state_dict` replaces our own (e.g. one gathered from FSDP or DeepSpeed shards).
        """
        if self.source is not None:
            self.config.fingerprint = self.source.fingerprint()
        keep = self.trainable_state_dict()
        if state_dict is not None:
            keep = {k: state_dict[k] for k in keep}
        state = {k: v.detach().contiguous().cpu() for k, v in keep.items()}
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "llm-modules"})
            (tmp / CONFIG_NAME).write_text(self.config.to_json_string(), encoding="utf-8")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            if write_extra is not None:
                write_extra(tmp)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        large_model: str | KnowledgeSource | None = None,
        *,
        ignore_fingerprint: bool = False,
        source_dtype: str | None = None,
        load_source: bool = True,
    ) -> "LLMModule":
        """Load a saved module and attach its knowledge source (the one named in its config, or `large_model`).

        Refuses a knowledge source whose fingerprint differs from the one the module was trained
        against, unless `ignore_fingerprint`. With `load_source=False` no large weights are loaded
        (training from cached features).
        """
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: not an llm-modules folder (no {CONFIG_NAME})")
        cfg = ModuleConfig.load(cfg_file)
        if source_dtype:
            cfg.source_dtype = source_dtype
        tokenizer = load_tokenizer(str(path))
        source = None
        source_hidden = None
        if isinstance(large_model, KnowledgeSource):
            source = large_model
        elif load_source:
            source = KnowledgeSource.from_pretrained(large_model or cfg.large_model, cfg.source_dtype, cfg.source_layer)
        else:
            source_hidden = AutoConfig.from_pretrained(large_model or cfg.large_model).hidden_size
        if source is not None and cfg.fingerprint and not ignore_fingerprint:
            have = source.fingerprint()
            if not fingerprints_match(cfg.fingerprint, have):
                raise FingerprintMismatchError(
                    f"{path} was trained against knowledge source {cfg.fingerprint['model']!r} "
                    f"(config {cfg.fingerprint['config_sha256'][:12]}, weights {cfg.fingerprint['weights_sha256'][:12]}) "
                    f"but {have['model']!r} differs (config {have['config_sha256'][:12]}, weights "
                    f"{have['weights_sha256'][:12]}); pass ignore_fingerprint=True (--ignore-fingerprint) to attach it anyway"
                )
        trunk = trunk_from_config_dict(cfg.small_config)
        module = cls(cfg, trunk, source, source_hidden_size=source_hidden, tokenizer=tokenizer)
        state = load_file(str(path / WEIGHTS_NAME))
        expected = module.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{path / WEIGHTS_NAME}: weights do not match the config "
                f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
            )
        module.load_state_dict(state, strict=False)
        return module


def trunk_from_config_dict(d: dict[str, Any]) -> PreTrainedModel:
    d = dict(d)
    model_type = d.pop("model_type")
    config = AutoConfig.for_model(model_type, **d)
    return AutoModel.from_config(config)


def load_trunk(small_model: str | PretrainedConfig, init_small: str = "pretrained") -> PreTrainedModel:
    """The small decoder trunk (no LM head): pretrained weights, or random init from its config."""
    if isinstance(small_model, PretrainedConfig):
        if init_small == "pretrained":
            raise ValueError("init_small='pretrained' needs a small model id or path, not a bare config")
        return AutoModel.from_config(small_model)
    if init_small == "pretrained":
        return AutoModel.from_pretrained(small_model, dtype=torch.float32)
    return AutoModel.from_config(AutoConfig.from_pretrained(small_model))
