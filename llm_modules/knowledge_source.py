"""The knowledge source: a frozen large causal LM whose hidden states feed the bridge.

A source is named as transformers names models (a hub id or a local folder), or as a GGUF file:
`path/to/model.gguf`, or `folder::file.gguf` (a file inside a hub repo or folder). GGUF weights are
dequantised on load (transformers + the `gguf` package).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .config import torch_dtype
from .io import first_line
from .masks import decoder_inputs

T = TypeVar("T")

# Config keys that change how a model runs, not what it is.
_RUNTIME_KEYS = {
    "_name_or_path", "name_or_path", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "output_hidden_states", "output_attentions", "return_dict", "_commit_hash", "architectures",
    "torchscript", "chunk_size_feed_forward", "problem_type", "_experts_implementation",
    # A GGUF file loads dequantised: the same weights as the folder converted from it.
    "quantization_config",
}


def split_model_ref(name: str) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) of a model reference.

    `folder::file.gguf` -> (folder, file.gguf); `path/file.gguf` -> (path, file.gguf); else (name, None).
    """
    if "::" in name:
        folder, file = name.split("::", 1)
        return folder, file
    if name.endswith(".gguf"):
        folder, file = os.path.split(name)
        return folder or ".", file
    return name, None


class SourceReadError(ValueError):
    """A knowledge source (or its config, weights or tokenizer) that cannot be read; the message is one line
    naming it."""


_CHECKED_GGUF: set[tuple[str, int, int]] = set()  # files already parsed (path, size, mtime): parse each once


def check_gguf(path: str) -> None:
    """Parse a local GGUF file's header and tensor table; a damaged or truncated file raises SourceReadError
    naming it (the gguf reader itself fails with a bare struct.error deep inside transformers)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _CHECKED_GGUF:
        return
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SourceReadError(f"{path}: reading a GGUF source needs the gguf package "
                              "(pip install -e \".[gguf]\")") from None
    try:
        GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises struct.error, ValueError, IndexError... on bad bytes
        raise SourceReadError(f"{path}: not a readable GGUF file, damaged or truncated ({first_line(e)})") from None
    _CHECKED_GGUF.add(key)


def _gguf_kwargs(name: str) -> tuple[str, dict[str, Any]]:
    folder, gguf = split_model_ref(name)
    if gguf is None:
        return name, {}
    path = os.path.join(folder, gguf)
    if os.path.isdir(folder) and not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no such GGUF file")
    if os.path.isfile(path):
        check_gguf(path)
    return folder, {"gguf_file": gguf}


def _reading(name: str, what: str, load: Callable[[], T]) -> T:
    """Run `load`; what transformers, safetensors or a tokenizer raise on a missing, damaged or truncated file
    becomes one line naming the source (a local folder's damaged file is named by the library's own message)."""
    from safetensors import SafetensorError

    try:
        return load()
    except (SourceReadError, FileNotFoundError):
        raise
    except (OSError, ValueError, SafetensorError, struct.error, EOFError, UnicodeDecodeError) as e:
        raise SourceReadError(f"knowledge source {name}: cannot read its {what} ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - e.g. the tokenizers library's exception on a damaged tokenizer.json
        if type(e).__module__.split(".")[0] in ("tokenizers", "safetensors", "gguf"):
            raise SourceReadError(f"knowledge source {name}: cannot read its {what} ({first_line(e)})") from None
        raise


def load_causal_lm(name: str, dtype: str = "bfloat16", **kwargs: Any) -> PreTrainedModel:
    """A causal LM from a hub id, a folder or a GGUF file, in `dtype`."""
    where, extra = _gguf_kwargs(name)
    return _reading(name, "weights", lambda: AutoModelForCausalLM.from_pretrained(
        where, dtype=torch_dtype(dtype), **extra, **kwargs))


def load_model_config(name: str) -> Any:
    """The transformers config of a hub id, folder or GGUF file (no weights are read)."""
    from transformers import AutoConfig

    where, extra = _gguf_kwargs(name)
    return _reading(name, "config", lambda: AutoConfig.from_pretrained(where, **extra))


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model id or folder, exactly as its tokenizer.json defines it.

    transformers' AutoTokenizer swaps a generic fast tokenizer stored in a model folder for the
    architecture's own class (e.g. Qwen2Tokenizer, whose pre-tokenizer splits digits), which
    silently changes the token ids of tokenizers trained for that folder. A folder that declares a
    generic class is loaded as such; any other goes through AutoTokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import cached_file

    where, extra = _gguf_kwargs(name)
    if extra:
        return _reading(name, "tokenizer", lambda: AutoTokenizer.from_pretrained(where, **extra))

    def load() -> Any:
        cfg_path = cached_file(name, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False)
        if cfg_path:
            declared = json.loads(open(cfg_path, encoding="utf-8").read()).get("tokenizer_class", "")
            if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
                return PreTrainedTokenizerFast.from_pretrained(name)
        return AutoTokenizer.from_pretrained(name)

    return _reading(name, "tokenizer", load)


def _config_hash(config: Any) -> str:
    cfg = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _picked_names(names: list[str]) -> list[str]:
    names = sorted(names)
    return [names[i] for i in sorted({0, len(names) // 2, len(names) - 1})] if names else []


def _hash_tensor(h: Any, name: str, shape: tuple[int, ...], t: Tensor, elems: int) -> None:
    h.update(f"{name}:{tuple(shape)}".encode())
    flat = t.detach().reshape(-1)[:elems].to("cpu", torch.bfloat16).view(torch.int16)
    h.update(flat.numpy().tobytes())


def fingerprint(model: PreTrainedModel, name: str, elems: int = 65536) -> dict[str, Any]:
    """Identify a knowledge source: its name, a hash of its config and of three of its weight tensors.

    Weights are hashed in bf16 so the same checkpoint loaded in fp32 or bf16 matches; the same
    value comes from `fingerprint_from_files` without loading the model.
    """
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for n in _picked_names(list(params)):
        _hash_tensor(h, n, tuple(params[n].shape), params[n], elems)
    return {"model": name, "config_sha256": _config_hash(model.config), "weights_sha256": h.hexdigest()}


def fingerprint_from_files(name: str, elems: int = 65536) -> dict[str, Any] | None:
    """`fingerprint` of a saved causal LM read from its safetensors files: only three tensors are read.

    Returns None when the checkpoint is not in safetensors form, GGUF included (then load the
    model instead: GGUF tensors are quantised, the fingerprint hashes the dequantised weights).
    """
    if split_model_ref(name)[1] is not None:
        return None
    return _reading(name, "weights", lambda: _fingerprint_from_files(name, elems))


def _fingerprint_from_files(name: str, elems: int) -> dict[str, Any] | None:
    from safetensors import safe_open
    from transformers.utils import cached_file

    config = load_model_config(name)
    index = cached_file(name, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        weight_map = json.loads(open(index, encoding="utf-8").read())["weight_map"]
        folder = os.path.dirname(index)
        where = {k: os.path.join(folder, f) for k, f in weight_map.items()}
    else:
        single = cached_file(name, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        if not single:
            return None
        with safe_open(single, framework="pt") as f:
            where = {k: single for k in f.keys()}
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config).base_model
    prefix = base.base_model_prefix + "."
    h = hashlib.sha256()
    for n in _picked_names([n for n, _ in base.named_parameters()]):
        key = prefix + n if prefix + n in where else n
        if key not in where:
            return None
        with safe_open(where[key], framework="pt") as f:
            sl = f.get_slice(key)
            shape = tuple(sl.get_shape())
            # Read only the leading rows that hold the first `elems` values.
            row = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            _hash_tensor(h, n, shape, sl[: -(-elems // row)], elems)
    return {"model": name, "config_sha256": _config_hash(config), "weights_sha256": h.hexdigest()}


def fingerprints_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["config_sha256"] == b["config_sha256"] and a["weights_sha256"] == b["weights_sha256"]


class KnowledgeSource(nn.Module):
    """A frozen causal LM; returns the hidden states the bridge reads.

    Its LM head (151,936-way for Qwen2) never runs in `forward`; it is kept, frozen, only with
    `keep_head` (the knowledge path and distillation read the source's next-token prediction).
    Gradients never reach it: parameters have requires_grad False, it stays in eval mode, and its
    forward runs under no_grad.
    """

    def __init__(self, model: PreTrainedModel, name: str = "", layer: int = -1, keep_head: bool = False):
        super().__init__()
        self.model = model.base_model if hasattr(model, "base_model") else model
        self.head = model.get_output_embeddings() if keep_head else None
        if keep_head and self.head is None:
            raise ValueError(f"{name or 'the knowledge source'} has no output head to read its predictions with")
        self.name = name or getattr(model.config, "_name_or_path", "")
        self.layer = layer
        self.requires_grad_(False)
        self.eval()
        self._fingerprint: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(cls, name: str, dtype: str = "bfloat16", layer: int = -1, keep_head: bool = False,
                        **kwargs: Any) -> "KnowledgeSource":
        return cls(load_causal_lm(name, dtype, **kwargs), name=name, layer=layer, keep_head=keep_head)

    @torch.no_grad()
    def next_token_logits(self, final_states: Tensor) -> Tensor:
        """The source's own next-token logits from its final (normed) states."""
        if self.head is None:
            raise ValueError("this knowledge source was loaded without its head (keep_head=False)")
        return self.head(final_states.to(self.head.weight.dtype))

    def train(self, mode: bool = True) -> "KnowledgeSource":
        # Frozen: dropout stays off even when the surrounding module trains.
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> dict[str, Any]:
        # Frozen weights: hash once, not at every checkpoint.
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model, self.name)
        return self._fingerprint

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Any]:
        """Hidden states [B, T, L] of the chosen layer, and the KV cache when `use_cache`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            attention_mask, position_ids = decoder_inputs(attention_mask, self.dtype)
        want_all = self.layer != -1
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=want_all,
        )
        states = out.hidden_states[self.layer] if want_all else out.last_hidden_state
        return states, (out.cache if use_cache else None)
