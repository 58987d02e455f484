"""Trainer state without pickle: tensors in `trainer_state.safetensors`, everything else in
`trainer_state.json`. Loading runs no code whatever the files hold; a damaged or tampered file is a
one-line error naming it.

The state holds the optimiser and schedule, the loss scaler, the position in the data (epoch,
units consumed, step), early-stopping bookkeeping and every rank's RNG streams, so a resumed run
continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from ..io import read_json, read_safetensors

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"  # llm-modules 0.1 pickled its state here; never loaded


# -- RNG streams ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG streams (torch, CUDA, Python, NumPy) as tensors and JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# -- tensors apart from JSON ---------------------------------------------------------------------
def _split(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    """A JSON-safe copy of `obj` with each tensor moved into `tensors` under its path."""
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):  # optimiser state is keyed by parameter index
            return {"__int_keys__": [[k, _split(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
        return {str(k): _split(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state at {path}: {type(obj).__name__} is neither a tensor nor a JSON value")


def _join(obj: Any, tensors: dict[str, Tensor], where: str) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            if obj["__tensor__"] not in tensors:
                raise ValueError(f"{where}: refers to tensor {obj['__tensor__']!r}, missing from {STATE_TENSORS}")
            return tensors[obj["__tensor__"]]
        if "__int_keys__" in obj:
            return {int(k): _join(v, tensors, where) for k, v in obj["__int_keys__"]}
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _join(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors, where) for v in obj]
    return obj


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """Write the state into `folder` (called inside the checkpoint's atomic folder write)."""
    import json

    tensors: dict[str, Tensor] = {}
    meta = _split(state, tensors, "state")
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(meta), encoding="utf-8")


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The state written by `write_trainer_state`; one-line errors for missing, legacy or damaged files."""
    meta_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    if not meta_path.exists():
        if (folder / LEGACY_STATE).exists():
            raise ValueError(f"{folder / LEGACY_STATE}: trainer state in pickle form (llm-modules 0.1) is never loaded, "
                             "since unpickling can run code; start the run afresh, or from its weights with init_from")
        raise FileNotFoundError(f"{folder}: nothing to resume (no {STATE_JSON}); run without --resume")
    meta = read_json(meta_path)
    tensors = read_safetensors(tensor_path)
    state = _join(meta, tensors, str(meta_path))
    need = ("optimizer", "scheduler", "epoch", "pos", "step", "rng", "config")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise ValueError(f"{meta_path}: not a trainer state (needs {', '.join(need)})")
    return state
