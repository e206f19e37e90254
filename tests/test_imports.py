"""No import loops inside flashjax, flashjax.models and flashjax.serving.

A static walk (ast) over the package files builds the graph of intra-package
imports and asserts it is acyclic twice: with the imports that run when a module
is imported (its top level, class bodies and top-level if/try blocks, not
`if TYPE_CHECKING:`), and with every import, function-local ones included, as if
they were all at the top level. The second graph is the one that caught the old
`attention_ops -> parallel -> train -> gpt -> attention_ops` loop, which
function-local imports had hidden.

Then fresh interpreters import the modules in orders that would hit such a loop:
each module of the old loop first, then every other module; and every module
first in turn (flashjax's modules dropped from sys.modules between rounds).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Every module of the installed packages (pyproject's package-dir) -> its file."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mods = {}
    for pkg in cfg["packages"]:
        for f in sorted((REPO / cfg["package-dir"][pkg]).glob("*.py")):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


MODULES = _modules()
# importing a __main__ runs its command
IMPORTABLE = [m for m in MODULES if not m.endswith(".__main__")]


def _is_type_checking(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, top_level_only: bool):
    """Import statements of a module; top_level_only: those that run when it is imported."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if top_level_only:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_type_checking(node):
                continue
        todo.extend(ast.iter_child_nodes(node))


def _targets(node, me: str) -> set[str]:
    """The package modules an import statement in module `me` imports."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the package of `me`
            pkg = me.split(".") if MODULES[me].stem == "__init__" else me.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        # `from pkg import sub` imports the submodule; `from pkg import name`, the package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return {n for n in names if n in MODULES and n != me}


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for me, f in MODULES.items():
        tree = ast.parse(f.read_text(), filename=str(f))
        graph[me] = set().union(*(_targets(n, me) for n in _import_nodes(tree, top_level_only)))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        path.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_graph_walk_sees_the_package_imports():
    """The walk itself: it finds imports both at the top level and inside functions."""
    top, every = import_graph(True), import_graph(False)
    assert "flashjax.tensor_parallel" in top["flashjax.models.attention_ops"]
    assert "flashjax.mesh" in top["flashjax.tensor_parallel"]
    assert "flashjax.models.sharding" in top["flashjax.models.train"]
    assert all(top[m] <= every[m] for m in MODULES)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_top_level_imports_are_acyclic():
    """No module's top level imports a module that (directly or not) imports it back."""
    cycle = find_cycle(import_graph(top_level_only=True))
    assert cycle is None, "top-level import loop: " + " -> ".join(cycle)


def test_imports_are_acyclic_even_if_all_were_top_level():
    """Function-local imports (kept for cheap imports, e.g. the CLIs) must not be
    hiding a loop either: with every import moved to the top the graph stays acyclic."""
    cycle = find_cycle(import_graph(top_level_only=False))
    assert cycle is None, "import loop (counting function-local imports): " + " -> ".join(cycle)


PROBE = textwrap.dedent(r"""
    import importlib, json, sys
    firsts, mods, purge = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
    failed = {}
    for first in firsts:
        if purge:  # each round starts with none of flashjax's modules imported
            for m in [m for m in sys.modules if m == "flashjax" or m.startswith("flashjax.")]:
                del sys.modules[m]
        for m in [first] + mods:
            try:
                importlib.import_module(m)
            except ModuleNotFoundError as e:
                if (e.name or "").split(".")[0] != "flashjax":  # an optional dependency
                    continue
                failed[f"{first} first, then {m}"] = repr(e)
            except Exception as e:
                failed[f"{first} first, then {m}"] = repr(e)
    print("RESULT" + json.dumps(failed))
""")


def _probe(firsts: list[str], purge: bool) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(firsts), json.dumps(IMPORTABLE),
                           "1" if purge else "0"], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])


# The modules of the old loop (and the compatibility module that re-exports them).
OLD_LOOP = ["flashjax.models.attention_ops", "flashjax.models.parallel", "flashjax.models.train",
            "flashjax.models.gpt", "flashjax.tensor_parallel", "flashjax.serving.runner"]


@pytest.mark.parametrize("first", OLD_LOOP)
def test_fresh_process_imports_everything_after(first):
    assert _probe([first], purge=False) == {}


def test_every_module_imports_first():
    assert _probe(IMPORTABLE, purge=True) == {}


def test_parallel_compat_module_reexports_the_new_homes():
    """`flashjax.models.parallel` is a thin re-export: the same objects as their new modules."""
    from flashjax import mesh, tensor_parallel
    from flashjax.models import parallel, sharding, train

    homes = {mesh: ["AXES", "BATCH", "make_mesh", "use_mesh", "current_mesh", "batch_size_multiple",
                    "batch_sharding", "replicated", "describe"],
             tensor_parallel: ["head_sharded", "tp_flash_attention", "tp_paged_decode_attention",
                               "page_sharding"],
             sharding: ["fsdp_spec", "tensor_parallel_spec", "param_shardings", "shard_like",
                        "allgather_to_host"],
             train: ["make_sharded_train_step"]}
    names = [n for ns in homes.values() for n in ns]
    assert sorted(parallel.__all__) == sorted(names)
    for mod, ns in homes.items():
        for n in ns:
            assert getattr(parallel, n) is getattr(mod, n), n
    # nothing in the packages imports the compatibility module
    users = [m for m, deps in import_graph(top_level_only=False).items() if "flashjax.models.parallel" in deps]
    assert users == []
