"""Structure the code relies on: no import cycles among the project's modules, and the pipeline talks
to hooks only through the declared `SamplerHook` interface."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

from conftest import ROOT

PACKAGES = ("cores", "eval")
TOP_MODULES = ("sampler", "repulsion", "posterior_sample")


def project_modules() -> Dict[str, Path]:
    mods = {m: ROOT / f"{m}.py" for m in TOP_MODULES}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def imports_of(path: Path, name: str, known: Set[str]) -> Set[str]:
    """Project modules imported anywhere in the file (module level and inside functions)."""
    out: Set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n: str) -> List[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_no_import_cycles():
    mods = project_modules()
    graph = {n: imports_of(p, n, set(mods)) for n, p in mods.items()}
    # a package's __init__ re-exporting its submodules is not a cycle of the design
    for n in graph:
        graph[n] = {m for m in graph[n] if not (n.startswith(m + ".") and (ROOT / m.replace(".", "/") / "__init__.py").exists())}
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_pipeline_uses_only_the_declared_hook_interface():
    src = (ROOT / "cores" / "pipeline.py").read_text()
    assert "hasattr(" not in src and "getattr(" not in src
    import sampler

    declared = {"wrap_score", "on_step", "on_end", "image_output"}
    assert declared <= set(vars(sampler.SamplerHook))
    calls = {n.func.attr for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) and n.func.value.id == "hook"}
    assert calls <= declared, calls


def test_hooks_do_not_import_the_pipeline():
    for f in ("cores/pruning.py", "cores/optimization.py", "repulsion.py", "cores/resume.py", "cores/validation.py"):
        assert "cores.pipeline" not in (ROOT / f).read_text(), f
