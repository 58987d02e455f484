"""Frozen-feature cache: run the knowledge source once over a dataset, train many epochs from disk.

Layout of a cache folder:
    index.json          key (what the features depend on), shards, their sha256, example -> location
    shard-00000.safetensors ...  "states": [tokens, L] in fp16/bf16, examples laid end to end; for a module with
                        the knowledge lookup also "top_ids" [tokens, k] int32 and "top_probs" [tokens, k] float32,
                        the source's k most likely next tokens at each position (so training never loads the source)

The key covers the source's fingerprint, the token ids of every example (so the dataset content,
the tokenizer, the prompt format and the length filter), the layer read and the storage dtype. A
mismatch rebuilds; stale features are never used. Each shard is written atomically and checked
against its sha256 when opened, so an interrupted build resumes and a damaged shard is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import torch_dtype
from .data import Example, collate
from .io import atomic_write, atomic_write_text
from .knowledge import top_predictions
from .knowledge_source import KnowledgeSource

INDEX = "index.json"
PROGRESS = "progress.json"


def example_id(e: Example) -> str:
    return hashlib.sha1(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


def dataset_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(example_id(e).encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(source_fp: dict[str, Any], examples: Sequence[Example], layer: int, dtype: str,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"source_config": source_fp["config_sha256"], "source_weights": source_fp["weights_sha256"],
            "data": dataset_hash(examples), "layer": layer, "dtype": dtype, **(extra or {})}


@dataclass
class _Loc:
    shard: int
    start: int
    length: int


class FeatureCache:
    """Read side: features of cached examples, padded into batches."""

    def __init__(self, folder: Path, index: dict[str, Any]):
        self.folder = folder
        self.index = index
        self.locs = {eid: _Loc(*v) for eid, v in index["examples"].items()}
        self._files: dict[int, Any] = {}
        self.fingerprint: dict[str, Any] | None = None  # of the source the features came from
        self.top_k: int = index.get("top_k", 0)  # the lookup's top-k tables are stored (0: states only)

    # -- build ----------------------------------------------------------------------------
    @staticmethod
    def estimate_bytes(examples: Sequence[Example], hidden: int, dtype: str, top_k: int = 0) -> int:
        per_token = hidden * torch.tensor([], dtype=torch_dtype(dtype)).element_size() + top_k * 8  # int32 + float32
        return sum(len(e.input_ids) for e in examples) * per_token

    @classmethod
    def build(
        cls,
        folder: str | os.PathLike,
        examples: Sequence[Example],
        key: dict[str, Any],
        source: KnowledgeSource | Callable[[], KnowledgeSource],
        *,
        dtype: str = "float16",
        shard_tokens: int = 1 << 20,
        batch_size: int = 8,
        pad_id: int = 0,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        log: Callable[[str], None] = print,
        top_k: int = 0,
    ) -> "FeatureCache | None":
        """Compute and store the features; resumes finished shards. Under several processes each
        rank writes shards rank, rank + world, ... and returns None; after a barrier rank 0 calls
        `finish` to write the index, and every rank `open`s it. `top_k` > 0 also stores the knowledge
        lookup's tables (the source must have its head)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        uniq: dict[str, Example] = {}
        for e in examples:
            uniq.setdefault(example_id(e), e)
        ids = list(uniq)
        plan: list[list[str]] = [[]]
        used = 0
        for eid in ids:
            n = len(uniq[eid].input_ids)
            if plan[-1] and used + n > shard_tokens:
                plan.append([])
                used = 0
            plan[-1].append(eid)
            used += n
        progress_path = folder / PROGRESS
        progress = _read_record(progress_path)
        progress = progress if isinstance(progress, dict) else {}
        if (progress.get("key") != key or progress.get("plan") != plan) and rank == 0:
            # A different build: start over (rank 0 alone clears, the others wait at the barrier).
            for old in [*folder.glob("shard-*.safetensors"), *folder.glob("done-*.json")]:
                old.unlink(missing_ok=True)
            atomic_write_text(progress_path, json.dumps({"key": key, "plan": plan}))
        if world_size > 1:
            if barrier is None:
                raise ValueError("a distributed feature-cache build needs a barrier")
            barrier()
        done = _finished_shards(folder)
        src = None
        for s, members in enumerate(plan):
            if s % world_size != rank:
                continue
            path = folder / f"shard-{s:05d}.safetensors"
            if s in done and path.exists() and file_sha256(path) == done[s]:
                continue  # finished in an earlier, interrupted build
            if src is None:
                src = source() if callable(source) and not isinstance(source, KnowledgeSource) else source
                hidden = src.hidden_size
                need = cls.estimate_bytes([uniq[i] for i in ids], hidden, dtype, top_k)
                free = shutil.disk_usage(folder).free
                log(f"feature cache: {len(ids)} examples, {need / 2**20:.1f} MiB in {dtype}, {len(plan)} shard(s) at {folder}")
                if need > free * 0.95:
                    raise OSError(f"{folder}: the feature cache needs {need / 2**30:.2f} GiB but only "
                                  f"{free / 2**30:.2f} GiB is free; free space or set cache_dir elsewhere")
            tensors = _run_source(src, [uniq[i] for i in members], batch_size, pad_id, torch_dtype(dtype), top_k)
            atomic_write(path, lambda tmp: save_file(tensors, tmp))
            # One record per shard, so ranks never write the same file.
            atomic_write_text(folder / f"done-{s:05d}.json", json.dumps({"sha256": file_sha256(path)}))
        if world_size > 1:
            return None
        return cls._write_index(folder, key, plan, uniq, dtype, top_k)

    @classmethod
    def finish(cls, folder: str | os.PathLike, examples: Sequence[Example], key: dict[str, Any], dtype: str,
               top_k: int = 0) -> "FeatureCache":
        """Rank 0, after every rank's `build`: write the index over all ranks' shards."""
        folder = Path(folder)
        plan = json.loads((folder / PROGRESS).read_text())["plan"]
        uniq: dict[str, Example] = {}
        for e in examples:
            uniq.setdefault(example_id(e), e)
        return cls._write_index(folder, key, plan, uniq, dtype, top_k)

    @classmethod
    def _write_index(cls, folder: Path, key: dict[str, Any], plan: list[list[str]], uniq: dict[str, Example],
                     dtype: str, top_k: int = 0) -> "FeatureCache":
        done = _finished_shards(folder)
        locs: dict[str, list[int]] = {}
        for s, members in enumerate(plan):
            start = 0
            for eid in members:
                n = len(uniq[eid].input_ids)
                locs[eid] = [s, start, n]
                start += n
        index = {"key": key, "dtype": dtype, "top_k": top_k, "shards": [{"file": f"shard-{s:05d}.safetensors", "sha256": done[s]}
                                                        for s in range(len(plan))], "examples": locs}
        atomic_write_text(folder / INDEX, json.dumps(index))
        return cls(folder, index)

    # -- open -----------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, key: dict[str, Any], verify: bool = True) -> "FeatureCache | None":
        """The cache at `folder` if its key matches and every shard passes its checksum, else None."""
        folder = Path(folder)
        index = _read_record(folder / INDEX)
        if not isinstance(index, dict) or index.get("key") != key:
            return None
        if verify:
            for sh in index["shards"]:
                p = folder / sh["file"]
                if not p.exists() or file_sha256(p) != sh["sha256"]:
                    return None
        return cls(folder, index)

    def missing(self, examples: Sequence[Example]) -> int:
        return sum(example_id(e) not in self.locs for e in examples)

    def _file(self, shard: int) -> Any:
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.folder / self.index["shards"][shard]["file"]), framework="pt")
        return self._files[shard]

    def states(self, e: Example) -> Tensor:
        return self._stored(e, "states")

    def _stored(self, e: Example, name: str) -> Tensor:
        """One example's rows of a stored tensor ("states", "top_ids" or "top_probs")."""
        loc = self.locs.get(example_id(e))
        if loc is None:
            raise KeyError(f"example {e.where or '?'} is not in the feature cache at {self.folder}")
        return self._file(loc.shard).get_slice(name)[loc.start : loc.start + loc.length]

    def batch(self, rows: Sequence[Example | Sequence[Example]], device: torch.device | str = "cpu",
              name: str = "states") -> Tensor:
        """Source states [B, T, L] (or another stored tensor, `name`) for a batch laid out as `collate` /
        `collate_packed` lay it (right padding, zeros)."""
        seqs = [torch.cat([self._stored(e, name) for e in (r if isinstance(r, (list, tuple)) else [r])]) for r in rows]
        T = max(s.shape[0] for s in seqs)
        out = seqs[0].new_zeros(len(seqs), T, seqs[0].shape[1])
        for i, s in enumerate(seqs):
            out[i, : s.shape[0]] = s
        return out.to(device)

    def top(self, rows: Sequence[Example | Sequence[Example]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor] | None:
        """The knowledge lookup's tables (ids, probs) [B, T, k] for a batch, or None when the cache holds states only."""
        if not self.top_k:
            return None
        return self.batch(rows, device, "top_ids"), self.batch(rows, device, "top_probs")

    @classmethod
    def open_or_build(cls, folder: str | os.PathLike, examples: Sequence[Example], key: dict[str, Any],
                      load_source: Callable[[], KnowledgeSource], *, dtype: str, pad_id: int,
                      log: Callable[[str], None] = print, rank: int = 0, world_size: int = 1,
                      barrier: Callable[[], None] | None = None, top_k: int = 0) -> "FeatureCache":
        """The cache at `folder` for `examples`, building (or rebuilding) it when absent, stale or damaged.

        `load_source` is called only when something must be computed. Under several processes
        every rank calls this; each builds its share of the shards.
        """
        folder = Path(folder)
        cache = cls.open(folder, key)
        if cache is not None and not cache.missing(examples):
            log(f"feature cache: using {folder} ({len(cache.locs)} examples); the knowledge source is not loaded")
            return cache
        if (folder / INDEX).exists():
            log(f"feature cache at {folder} is stale or damaged: rebuilding")
            if rank == 0:
                (folder / INDEX).unlink()
        # Shard size in tokens (env override: small shards for tests of distributed builds).
        shard_tokens = int(os.environ.get("LLM_MODULES_SHARD_TOKENS", 1 << 20))
        cache = cls.build(folder, examples, key, load_source, dtype=dtype, shard_tokens=shard_tokens, pad_id=pad_id,
                          rank=rank, world_size=world_size, barrier=barrier, log=log, top_k=top_k)
        if world_size > 1:
            assert barrier is not None
            barrier()
            if rank == 0:
                cls.finish(folder, examples, key, dtype, top_k)
            barrier()
            cache = cls.open(folder, key)
            if cache is None:
                raise RuntimeError(f"{folder}: feature cache incomplete after the distributed build")
        return cache


def _read_record(path: Path) -> Any:
    """A bookkeeping JSON file of the cache, or None when it is missing or damaged (then work is redone)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finished_shards(folder: Path) -> dict[int, str]:
    """{shard number: sha256} of the shards whose writing completed (damaged records count as unfinished)."""
    done = {}
    for f in folder.glob("done-*.json"):
        rec = _read_record(f)
        if isinstance(rec, dict) and isinstance(rec.get("sha256"), str):
            done[int(f.stem.split("-")[1])] = rec["sha256"]
    return done


@torch.no_grad()
def _run_source(source: KnowledgeSource, examples: Sequence[Example], batch_size: int, pad_id: int,
                dtype: torch.dtype, top_k: int = 0) -> dict[str, Tensor]:
    """States of `examples` laid end to end, [sum of lengths, L] (with `top_k`, also the lookup's tables, read by
    the source's head from the states as stored, as training from the cache would). Batches of similar length
    waste little padding."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: dict[str, list[Tensor | None]] = {n: [None] * len(examples) for n in ("states", "top_ids", "top_probs")}
    device = next(source.parameters()).device
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        b = collate([examples[j] for j in idx], pad_id)
        h, _ = source(b["input_ids"].to(device), b["attention_mask"].to(device))
        h = h.to(dtype)
        top = top_predictions(h, source.next_token_logits, top_k) if top_k else None
        for row, j in enumerate(idx):
            n = len(examples[j].input_ids)
            out["states"][j] = h[row, :n].cpu()
            if top is not None:
                out["top_ids"][j] = top[0][row, :n].to("cpu", torch.int32)
                out["top_probs"][j] = top[1][row, :n].cpu()
    return {name: torch.cat(parts) for name, parts in out.items() if parts[0] is not None}  # type: ignore[misc]
