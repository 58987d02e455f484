"""Atomic file and folder writes: a crash mid-write never leaves a half-written artefact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename tmp_path onto `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` whole.

    An existing `path` is moved aside first and removed only after the new one is in place, so at
    every instant either the old or the new folder is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old.{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(path: str | os.PathLike) -> bool:
    """Finish what a kill left of an `atomic_dir` replacement of `path`; True if something was put back.

    A kill between moving the old folder aside and moving the new one in leaves no `path`, its complete
    previous version as `.NAME.old.PID` and the new one, maybe incomplete, as `.NAME.*.tmp`: the previous
    version is put back and unfinished temporary folders are removed. Call it before reading `path`, from the
    only process that writes it.
    """
    path = Path(path)
    restored = False
    olds = sorted(path.parent.glob(f".{path.name}.old.*"), key=lambda p: p.stat().st_mtime)
    if not path.exists() and olds:
        os.replace(olds.pop(), path)
        _fsync_dir(path.parent)
        restored = True
    for stale in [*olds, *path.parent.glob(f".{path.name}.*.tmp")]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return restored


def default_cache_dir() -> Path:
    """Where llm-modules keeps generated and fetched artefacts ($LLM_MODULES_CACHE, else ~/.cache/llm-modules)."""
    return Path(os.environ.get("LLM_MODULES_CACHE", Path.home() / ".cache" / "llm-modules"))


# -- reading artefacts: a damaged file is a one-line error naming it, never a traceback ---------
def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed one raises a one-line error naming it."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the file is damaged or truncated") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """All tensors of a safetensors file (no code can run); a damaged file is a one-line error naming it."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError and others on bad bytes
        raise ValueError(f"{path}: not a readable safetensors file, damaged or truncated ({first_line(e)})") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
