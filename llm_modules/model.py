"""LLMModule: frozen knowledge source -> bridge -> generation module (small trunk + new LM head)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from . import incremental
from .bridge import Bridge
from .config import ModuleConfig, position_limit
from .incremental import DecodeState
from .knowledge import KnowledgeLookup, KnowledgePath, LookupMemory, distill_loss
from .io import atomic_dir, read_safetensors
from .loss import shifted_loss
from .schedule import catch_ups_for
from .masks import decoder_inputs, delay_answers, within_turn
from .knowledge_source import KnowledgeSource, fingerprints_match, load_model_config, load_tokenizer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "llm_module.json"


class FingerprintMismatchError(ValueError):
    """The module was trained against a different knowledge source than the one given."""


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
        self.position_limit = position_limit(trunk.config)

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
            causal=config.causal,
        )
        self.answer_embed = None
        if config.conditioning == "prompt" and not config.ties_answer_embeddings:
            self.answer_embed = nn.Embedding(config.vocab_size, self.generation.hidden_size)
        self.knowledge = None
        self.lookup = None
        if config.knowledge_path == "logits":
            self.knowledge = KnowledgePath(self.generation.hidden_size)
            nn.init.zeros_(self.generation.lm_head.weight)  # start as the source; learn what to change
        elif config.knowledge_path == "lookup":
            self.lookup = KnowledgeLookup(self.generation.hidden_size, L, top_k=config.lookup_top_k)
        if config.knowledge_path != "none" and source is not None and source.head is None:
            raise ValueError(f"knowledge_path {config.knowledge_path!r} needs the source's head: load it with keep_head=True")
        self.config.small_config = trunk.config.to_dict()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        large_model: str,
        small_model: str | PretrainedConfig,
        tokenizer: Any = None,
        keep_source_head: bool = False,
        **config_kwargs: Any,
    ) -> "LLMModule":
        """Load the knowledge source and the small trunk (pretrained weights unless init_small='scratch').

        `config_kwargs` are ModuleConfig fields (older names such as causal=False are accepted).
        `keep_source_head` keeps the source's output head for distillation (the knowledge path keeps it anyway).
        """
        small_name = small_model if isinstance(small_model, str) else None
        cfg = ModuleConfig.from_dict(dict(large_model=large_model, small_model=small_name, **config_kwargs))
        tokenizer = tokenizer or load_tokenizer(large_model)
        cfg.vocab_size = len(tokenizer)
        source = source_for(cfg, large_model, keep_head=keep_source_head)
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
            groups["bridge" if name.startswith(("bridge.", "knowledge.", "lookup.")) else "generation"].append(p)
        return groups

    def train(self, mode: bool = True) -> "LLMModule":
        super().train(mode)
        if self.source is not None:
            self.source.train(False)
        return self

    @property
    def device(self) -> torch.device:
        return self.bridge.pre_proj.weight.device

    # -- running the model: whole sequences (forward) or a few tokens at a time (step) -------
    def check_length(self, length: int) -> None:
        limit = self.generation.position_limit
        if limit is not None and length > limit:
            raise ValueError(
                f"sequence of {length} tokens exceeds the generation module's position limit "
                f"({limit}, max_position_embeddings of the small model); filter or shorten the input"
            )

    def _source_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.source is None:
            raise ValueError("this module has no knowledge source attached; pass source_states")
        return self.source(input_ids, attention_mask)[0]

    def source_logits(self, source_states: Tensor) -> Tensor:
        """The source's own next-token logits from its final states (its frozen head)."""
        if self.source is None or self.source.head is None:
            raise ValueError("the knowledge path and distillation read the source's head: attach a knowledge "
                             "source loaded with keep_head=True (feature caches hold states only)")
        return self.source.next_token_logits(source_states)

    def output_logits(self, hidden: Tensor, source_logits: Tensor | None = None, answer: Tensor | None = None,
                      lookup: tuple[LookupMemory, Tensor, Tensor] | None = None) -> Tensor:
        """The module's next-token logits: the new head, plus the knowledge path when there is one
        (not at the `answer` positions, where under prompt conditioning the source has not read through), or the
        knowledge lookup: `lookup` = (memory, batch row [...], readable source positions [..., Ts]) for
        `hidden` [..., S]."""
        logits = self.generation.lm_head(hidden)
        if self.knowledge is not None and source_logits is not None:
            extra = self.knowledge(hidden, source_logits, logits.shape[-1])
            logits = logits.float() + (extra if answer is None else extra.masked_fill(answer[..., None], 0.0))
        if self.lookup is not None and lookup is not None:
            memory, rows, allowed = lookup
            S, V = hidden.shape[-1], logits.shape[-1]
            extra = self.lookup(hidden.reshape(-1, S), memory, rows.reshape(-1), allowed.reshape(-1, allowed.shape[-1]), V)
            logits = logits.float() + extra.view(*hidden.shape[:-1], V)
        return logits

    def _lookup_inputs(self, source_states: Tensor, xmask: Tensor, answer_mask: Tensor | None = None,
                       top: tuple[Tensor, Tensor] | None = None) -> tuple[LookupMemory, Tensor, Tensor] | None:
        """(memory, rows, allowed) for every position of a whole-sequence forward: each position reads the
        source positions the bridge reads (`xmask` [B, 1, T, T], the bridge's cross-attention mask) within its
        own turn (`answer_mask`): the source's predictions in an earlier question answered that question, and
        the current question's positions already read the conversation before it."""
        if self.lookup is None:
            return None
        if top is not None and top[0].shape[-1] != self.lookup.top_k:
            raise ValueError(f"the feature cache holds the top {top[0].shape[-1]} predictions per position; this "
                             f"module's lookup reads {self.lookup.top_k}")
        B, T = xmask.shape[0], xmask.shape[-2]
        rows = torch.arange(B, device=xmask.device)[:, None].expand(B, T)
        return self.lookup.memory(source_states, self.source_logits, top), rows, within_turn(xmask[:, 0], answer_mask)

    def answer_embeddings(self, ids: Tensor) -> Tensor:
        """Prompt conditioning: the input embedding of answer tokens (the head's weight, unless untied)."""
        if self.answer_embed is not None:
            return self.answer_embed(ids)
        return F.embedding(ids, self.generation.lm_head.weight)

    def prompt_answers(self, answer_mask: Tensor | None) -> Tensor | None:
        """The answer positions that prompt conditioning treats apart (None in token conditioning)."""
        if self.config.conditioning != "prompt" or answer_mask is None:
            return None
        return delay_answers(answer_mask, self.config.answer_source_tokens) > 0

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        source_states: Tensor | None = None,
        return_logits: bool = True,
        loss_chunk_size: int | None = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        answer_mask: Tensor | None = None,
        source_top: tuple[Tensor, Tensor] | None = None,
        catch_ups: Tensor | None = None,
    ) -> ModuleOutput:
        """Logits [B, T, V] and, given labels, the mean shifted cross-entropy (ignore_index -100).

        `attention_mask` follows the segment-id convention of `llm_modules.masks` (0 padding, 1
        token, or 1, 2, ... for the examples of a packed row).
        `source_states` skips the knowledge source (e.g. features read from the cache).
        `loss_chunk_size` computes the loss in chunks of that many tokens, never holding the full
        [B, T, V] logits; with return_logits=False the heads (the new one, and the source's on the
        knowledge path) run only at positions with a target. Distillation needs every position.
        `distill_weight` adds that times KL(source || module) over every real position.
        `answer_mask` [B, T] (1 inside assistant answers) is read under prompt conditioning only.
        `source_top` (ids, probs) [B, T, k]: the knowledge lookup's tables from the feature cache (else the source's
        head computes them).
        `catch_ups` [B, T] (prompt conditioning): the answer positions where the source has read through (what decoding
        recorded, `llm_modules.schedule`); None: the module's schedule (adaptive catch-ups drawn at random).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        reference = self.config.reference_compat
        if reference and self.generation.position_limit:
            # The reference cut its inputs at the trunk's position limit.
            cut = slice(0, self.generation.position_limit)
            input_ids, attention_mask = input_ids[:, cut], attention_mask[:, cut]
            labels = labels[:, cut] if labels is not None else None
            source_states = source_states[:, cut] if source_states is not None else None
        self.check_length(input_ids.shape[1])
        if source_states is None:
            source_states = self._source_states(input_ids, attention_mask)
        answer = self.prompt_answers(answer_mask)
        catch = catch_ups_for(self.config, answer, catch_ups, self.training)
        if catch is not None:
            answer = answer & ~catch  # where the source caught up, the position is read as prompt is
        xmask = self.bridge.cross_mask(attention_mask, None if answer is None else answer.long())
        if answer is None:
            embeds = self.bridge(source_states, attention_mask, mask=xmask)
        else:
            embeds = self.bridge(source_states, attention_mask, answer.long(), self.answer_embeddings(input_ids), xmask)
        trunk_mask, positions = decoder_inputs(attention_mask, embeds.dtype, reference=reference)
        hidden, _ = self.generation(embeds, trunk_mask, positions)
        lookup = self._lookup_inputs(source_states, xmask, answer_mask, source_top)
        if labels is not None and not return_logits and not distill_weight:
            # Training: logits only where there is a target (answers only, with assistant-only labels).
            out = ModuleOutput()
            out.loss, out.num_tokens = self._target_loss(hidden, source_states, labels, loss_chunk_size, answer, lookup)
            return out
        src_logits = None
        if self.knowledge is not None or distill_weight:
            src_logits = self.source_logits(source_states)
        out = ModuleOutput(logits=self.output_logits(hidden, src_logits, answer, lookup))
        if labels is not None:
            out.loss, out.num_tokens = shifted_loss(labels, logits=out.logits)
            if distill_weight:
                # Every real position, prompt included: the module learns to read the source in general.
                real = (attention_mask[:, :-1] > 0) & (attention_mask[:, 1:] > 0)
                out.loss = out.loss + distill_weight * distill_loss(out.logits[:, :-1], src_logits[:, :-1], real,
                                                                    distill_temperature)
        if not return_logits:
            out.logits = None
        return out

    def _target_loss(self, hidden: Tensor, source_states: Tensor, labels: Tensor, chunk_size: int | None,
                     answer: Tensor | None = None,
                     lookup: tuple[LookupMemory, Tensor, Tensor] | None = None) -> tuple[Tensor, int]:
        """(mean shifted cross-entropy, targets), computing logits at target positions only, in chunks of
        `chunk_size` targets recomputed in backward (so [targets, V] logits never exist at once)."""
        if self.knowledge is None and lookup is None:
            return shifted_loss(labels, hidden=hidden, head_weight=self.generation.lm_head.weight, chunk_size=chunk_size)
        keep = labels[:, 1:] != -100
        at = lambda x: None if x is None else x[:, :-1][keep]  # noqa: E731 - the rows that have a target
        h, y, states, ans = at(hidden), labels[:, 1:][keep], at(source_states) if self.knowledge is not None else None, at(answer)
        rows, allowed = (at(lookup[1]), at(lookup[2])) if lookup is not None else (None, None)

        def ce_sum(i: int, j: int, h_chunk: Tensor) -> Tensor:
            src = self.source_logits(states[i:j]) if states is not None else None
            look = (lookup[0], rows[i:j], allowed[i:j]) if lookup is not None else None
            logits = self.output_logits(h_chunk, src, None if ans is None else ans[i:j], look)
            return F.cross_entropy(logits.float(), y[i:j], reduction="sum")

        n = h.shape[0]
        size = chunk_size or max(n, 1)
        if n <= size:
            return ce_sum(0, n, h) / max(n, 1), n
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, n, size):
            total = total + checkpoint(ce_sum, i, min(i + size, n), h[i:i + size], use_reentrant=False)
        return total / n, n

    @property
    def supports_cache(self) -> bool:
        """Incremental decoding needs a causal bridge: the reference's changes earlier positions as text grows."""
        return not self.config.reference_compat

    def step(self, new_ids: Tensor, state: DecodeState | None = None,
             attention_mask: Tensor | None = None, answer_mask: Tensor | None = None) -> tuple[Tensor, DecodeState]:
        """Feed `new_ids` [B, n] (the whole prompt first, then a token at a time); return the last logits [B, V].

        Costs one step of each cache: the source's KV cache, the bridge's cross-attention
        keys/values over source positions (appended, never recomputed) and the trunk's KV cache.
        Matches `forward` on the whole text so far. `answer_mask` [B, n] marks earlier turns' answers
        in the prompt (prompt conditioning only; the prompt's last token must not be inside an answer).
        See `llm_modules.incremental`.
        """
        if not self.supports_cache:
            raise ValueError("attention 'reference' is not causal: decode it by full recomputation")
        return incremental.step(self, new_ids, state, attention_mask, answer_mask)

    def resume(self, state: DecodeState | None, input_ids: Tensor, attention_mask: Tensor | None = None,
               answer_mask: Tensor | None = None) -> tuple[Tensor, DecodeState]:
        """`step(input_ids)` for a conversation's next turn: when `state` (left by the turn before) has read a
        prefix of `input_ids` [1, T], only the rest is read, by every cache; otherwise everything is, afresh.

        Equal to reading the whole conversation anew. Under prompt conditioning the source first catches up on
        the last answer (the tokens past its first `answer_source_tokens`, which only the trunk read).
        """
        if not self.supports_cache:
            raise ValueError("attention 'reference' is not causal: decode it by full recomputation")
        return incremental.resume(self, state, input_ids, attention_mask, answer_mask)

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Cached incremental decoding; see llm_modules.decode.generate for the arguments."""
        from .decode import generate

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
        keep_source_head: bool = False,
    ) -> "LLMModule":
        """Load a saved module and attach its knowledge source (the one named in its config, or `large_model`).

        Refuses a knowledge source whose fingerprint differs from the one the module was trained
        against, unless `ignore_fingerprint`. With `load_source=False` no large weights are loaded
        (training from cached features).
        """
        path = Path(path)
        cfg = ModuleConfig.load(module_config_path(path))
        state = read_safetensors(path / WEIGHTS_NAME)  # before the (slow) source: a damaged file fails fast
        if source_dtype:
            cfg.source_dtype = source_dtype
        tokenizer = load_tokenizer(str(path))
        source = None
        source_hidden = None
        if isinstance(large_model, KnowledgeSource):
            source = large_model
        elif load_source:
            source = source_for(cfg, large_model or cfg.large_model, keep_head=keep_source_head)
        else:
            source_hidden = load_model_config(large_model or cfg.large_model).hidden_size
        if source is not None and not ignore_fingerprint:
            check_fingerprint(cfg.fingerprint, source.fingerprint(), str(path))
        trunk = trunk_from_config_dict(cfg.small_config)
        module = cls(cfg, trunk, source, source_hidden_size=source_hidden, tokenizer=tokenizer)
        expected = module.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path / WEIGHTS_NAME}: weights do not match the config "
                f"(missing: {_few(missing)}; unexpected: {_few(unexpected)}; wrong shape: {_few(wrong)})"
            )
        module.load_state_dict(state, strict=False)
        return module


def source_for(cfg: ModuleConfig, name: str | None = None, keep_head: bool = False) -> KnowledgeSource:
    """The knowledge source a config names (or `name`), with its head when the knowledge path reads it."""
    return KnowledgeSource.from_pretrained(name or cfg.large_model, cfg.source_dtype, cfg.source_layer,
                                           keep_head=keep_head or cfg.knowledge_path != "none")


def check_fingerprint(expected: dict[str, Any] | None, have: dict[str, Any], what: str) -> None:
    """Raise FingerprintMismatchError when `what` was trained against another knowledge source."""
    if not expected or fingerprints_match(expected, have):
        return
    raise FingerprintMismatchError(
        f"{what} was trained against knowledge source {expected['model']!r} "
        f"(config {expected['config_sha256'][:12]}, weights {expected['weights_sha256'][:12]}) "
        f"but {have['model']!r} differs (config {have['config_sha256'][:12]}, weights "
        f"{have['weights_sha256'][:12]}); pass ignore_fingerprint=True (--ignore-fingerprint) to attach it anyway"
    )


def module_config_path(path: Path) -> Path:
    """`path/llm_module.json`, or a one-line error that says what the folder is instead."""
    cfg_file = path / CONFIG_NAME
    if cfg_file.is_file():
        return cfg_file
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder")
    inside = [d for d in ("best", "last") if (path / d / CONFIG_NAME).is_file()]
    if inside:
        raise FileNotFoundError(f"{path}: a training run folder, not a module; pass {' or '.join(str(path / d) for d in inside)}")
    raise FileNotFoundError(f"{path}: not an llm-modules folder (no {CONFIG_NAME})")


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + ("..." if len(keys) > 5 else "") if keys else "none"


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
