"""The package's shape: no import cycles, the core imports no layer above it, imports stay cheap."""

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import llm_modules

PKG = Path(llm_modules.__file__).parent
CORE = {"config", "io", "masks", "data", "source", "bridge", "knowledge", "incremental", "model", "loss", "decode",
        "features"}
LAYERS = ("training", "inference", "serving", "demo", "cli", "fixtures")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Package modules imported anywhere in the file: top level, inside functions, under TYPE_CHECKING."""
    pkg_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("llm_modules"):
                target = node.module[len("llm_modules."):] if "." in node.module else ""
            else:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}".strip(".") for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("llm_modules."):] for a in node.names if a.name.startswith("llm_modules."))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {t for t in _imports(p, name) if t in files and t != name} for name, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m] if m in stack else [n, m]
            if m not in state and (c := visit(m, stack + [m])):
                return c
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n, [n])):
            return c
    return None


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 20
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_core_imports_no_layer_above_it():
    graph = _graph()
    for mod in CORE:
        above = {t for t in graph[mod] if t.split(".")[0] in LAYERS}
        assert not above, f"core module {mod} imports {above}"


def test_package_import_and_cli_help_are_fast_and_torch_free():
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    code = "import sys, llm_modules, llm_modules.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "False"]
    t = time.perf_counter()
    help_text = subprocess.run([sys.executable, "-m", "llm_modules.cli", "train", "--help"], capture_output=True,
                               text=True, env=env, check=True).stdout
    assert time.perf_counter() - t < 1.5  # ~0.2 s here; 7 s when torch loaded eagerly
    assert "large_model" in help_text and "lr_bridge" in help_text and "system_prompt" in help_text
    # Names are still reachable from the top of the package.
    assert llm_modules.LLMModule.__name__ == "LLMModule" and llm_modules.TrainConfig.__name__ == "TrainConfig"
