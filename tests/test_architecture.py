"""The layering ARCHITECTURE.md promises, checked on the code's own imports (every import, also in functions).

* The method (``conva/*.py``, ``conva/steering/``) imports nothing of the batch layer, the Ray side or Ray.
* The batch plumbing (``conva/batch/``) imports nothing of the Ray side, nor Ray.
* No import cycle among the project's modules, and no private name (``_x``) imported from another module.
* ``conva validate`` loads neither torch nor transformers (nor scikit-learn): it promises to load no model.
* Rooms a newcomer can hold in mind: no module over 500 lines, no function over 60.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHOD_FORBIDDEN = ("conva.batch", "conva.jobs", "conva.workers", "ray")
BATCH_FORBIDDEN = ("conva.jobs", "conva.workers", "ray")


def _modules() -> dict[str, Path]:
    """Module name → file, for every module of the distribution (jobs/ and workers/ as conva.jobs/conva.workers)."""
    out = {}
    for folder, package in (("conva", "conva"), ("jobs", "conva.jobs"), ("workers", "conva.workers")):
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """``(module, names, line)`` of every import in ``path`` (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            found.append((base, tuple(a.name for a in node.names), node.lineno))
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _project_edges() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names, _ in _imports(name, path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def test_the_method_and_the_batch_layer_import_only_downwards() -> None:
    bad = []
    for name, path in _modules().items():
        if _within(name, ("conva.jobs", "conva.workers")):
            continue
        forbidden = BATCH_FORBIDDEN if _within(name, ("conva.batch",)) else METHOD_FORBIDDEN
        bad += [
            f"{path.relative_to(REPO)}:{line} imports {module}"
            for module, _, line in _imports(name, path)
            if _within(module, forbidden)
        ]
    assert not bad, "\n".join(bad)


def test_the_method_modules_use_steering_only_through_its_spec() -> None:
    """``conva.steering`` builds on the method's modules (``conva.mc``, ``conva.record`` …); they reach back
    into it for the :class:`SteerSpec` data type only, never into a backend (``conva.mc`` once imported
    ``conva.steering.hf`` while ``conva.steering.vllm`` imported ``conva.mc``)."""
    bad = []
    for name, path in _modules().items():
        if name.count(".") != 1 or name.startswith(
            ("conva.batch", "conva.steering", "conva.jobs", "conva.workers")
        ):
            continue
        bad += [
            f"{path.relative_to(REPO)}:{line} imports {module}"
            for module, _, line in _imports(name, path)
            if _within(module, ("conva.steering",)) and module != "conva.steering.spec"
        ]
    assert not bad, "\n".join(bad)


def test_no_module_over_500_lines_and_no_function_over_60() -> None:
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > 500:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{name}.{node.name} (line {node.lineno}): {length} lines")
    assert (long_modules, long_functions) == ([], [])


def test_no_import_cycles() -> None:
    edges, cycles = _project_edges(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(
                    " -> ".join(path[path.index(nxt) :] + [node, nxt]) if nxt in path else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    # A package's __init__ importing its own submodules is not a cycle a reader follows.
    cycles = [
        c
        for c in cycles
        if not any(c.startswith(p) and c.split(" -> ")[-1].startswith(p + ".") for p in ("conva.steering",))
    ]
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_a_module_boundary() -> None:
    modules, bad = _modules(), []
    for name, path in modules.items():
        for module, names, line in _imports(name, path):
            if module in modules or _within(module, ("conva",)):
                bad += [
                    f"{path.relative_to(REPO)}:{line} imports {module}.{n}"
                    for n in names
                    if n.startswith("_") and not n.startswith("__")
                ]
    assert not bad, "\n".join(bad)


def test_validate_loads_no_model_library(tmp_path) -> None:
    code = (
        "import sys\n"
        "from conva.jobs.cli import main\n"
        f"rc = main(['validate', '--config', {str(REPO / 'examples' / 'demo.toml')!r}, "
        f"'--output.dir={tmp_path / 'out'}'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'sklearn', 'vllm') if m in sys.modules))\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2].startswith("conva validate: ok: `conva run` would start ("), done.stdout
    assert lines[-1] == "[]", f"conva validate imported {lines[-1]}"
