"""The shape of the house (DESIGN.md): imports flow one way, `import zoo` is enough, and the
README's Python snippet runs as written in a fresh interpreter."""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("pallas_kernels", "layers", "zoo", "train", "eval")
# what each package may import of ours (DESIGN.md: pallas_kernels <- layers <- zoo <- train, eval;
# each layer imports only the one below it)
ALLOWED = {
    "pallas_kernels": {"pallas_kernels"},
    "layers": {"pallas_kernels", "layers"},
    "zoo": {"layers", "zoo"},
    "train": {"zoo", "train"},
    "eval": {"zoo", "train", "eval"},
}
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "mamba"


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module of ours that `path` imports (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES + ("configs",)}


def sources(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_imports_flow_one_way():
    bad = []
    for pkg in PACKAGES:
        for path in sources(pkg):
            for mod in imports_of(path):
                if mod.split(".")[0] not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_inside_zoo():
    """Edges between zoo modules (the package __init__ is the entry point, not a node)."""
    files = [p for p in sources("zoo") if p.name != "__init__.py"]
    mods = {module_name(p): p for p in files}
    graph = {m: {i for i in imports_of(p) if i in mods and i != m} for m, p in mods.items()}
    for core in ("zoo.registry", "zoo.lm", "zoo.hf"):
        assert not graph[core] - {"zoo.registry", "zoo.lm", "zoo.hf"}, \
            f"{core} imports a family: {graph[core]}"
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(stack + [m, n])}"
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def run_fresh(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_import_zoo_is_enough_for_hf_load():
    out = run_fresh(f"import zoo\nm = zoo.hf.load({str(FIXTURE)!r})\nprint(type(m).__name__)")
    assert out.strip() == "CausalLM"


def test_readme_python_snippet_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no ```python block"
    code = blocks[0]
    assert "path/to/hf_checkpoint" in code
    code = code.replace("path/to/hf_checkpoint", str(FIXTURE))
    out = run_fresh(code + "\nprint('snippet ok', type(model).__name__)")
    assert "snippet ok CausalLM" in out
