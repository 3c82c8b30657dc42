"""The package's layout: subpackages by concern, and no import cycles between modules.

Imports are read from the source (every ``import`` and ``from … import``, at module level, inside
functions and under ``TYPE_CHECKING`` alike, and every module named by a string in a module that
calls ``importlib.import_module``), so a cycle hidden by a late or dynamic import still fails here.
Each module is also imported first, alone, in a fresh interpreter: the import order a cycle through
a package's ``__init__`` would break.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

#: The package of this checkout (not whichever copy is installed).
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kie_extend"

#: What sits at the top of the package: what users and the deployment name.
#: (``_moved`` keeps the old module paths importable, with a warning.)
TOP_LEVEL = {"__init__", "api", "config", "worker", "tasks", "errors", "_moved"}
#: The wings: one folder per concern.
SUBPACKAGES = {"jobs", "store", "admission", "provider", "infra", "handlers", "http", "cli", "simulator", "tenants", "credits"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of this package it imports}``, from the source text."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        if "import_module" in {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}:
            deps.update(n.value for n in ast.walk(tree)
                        if isinstance(n, ast.Constant) and isinstance(n.value, str) and "." in n.value
                        and n.value in modules)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    if node.level > 1:
                        parts = parts[: -(node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        deps.add(f"{base}.{alias.name}")
                    elif base in modules:
                        deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    assert len(graph) > 60, "the import graph should cover the whole package"
    assert cycles(graph) == []


def test_dynamic_imports_count_as_edges() -> None:
    """The built-in handlers are loaded by name: those names are edges of the graph too."""
    graph = import_graph()
    assert "kie_extend.handlers.webhook" in graph["kie_extend.handlers"]
    assert "kie_extend.api" in graph["kie_extend"]


#: What a fresh interpreter imports before each module (third-party, so the children start fast);
#: nothing of kie_extend.
_PRELOAD = ("celery", "kombu", "redis", "pydantic", "pydantic_settings", "requests", "fastapi", "starlette")

_FRESH_IMPORTS = """
import importlib, json, os, sys
for name in %r:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
failed = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            out = b""
        except BaseException as exc:
            out = f"{type(exc).__name__}: {exc}".encode()[:2000]
        os.write(w, out)
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    if chunks:
        failed[name] = b"".join(chunks).decode()
print(json.dumps(failed))
""" % (_PRELOAD,)


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """Importing any one module first works: no cycle through a package's ``__init__`` leaves a
    module half initialised. (``__main__`` modules run a program when imported and are left out.)"""
    names = sorted(n for n in _modules() if not n.endswith(".__main__"))
    env = {**os.environ, "KIE_API_KEY": "layout-test", "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", _FRESH_IMPORTS, json.dumps(names)], capture_output=True, text=True,
                         timeout=300, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


def test_the_fresh_import_check_finds_a_cycle_through_an_init(tmp_path: Path) -> None:
    """A package whose ``__init__`` imports a module that needs a name the package sets up later."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from cyc.a import A\nB = 1\n")
    (pkg / "a.py").write_text("from cyc import B\nA = B\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _FRESH_IMPORTS, json.dumps(["cyc.a"])], capture_output=True,
                         text=True, timeout=120, env=env, check=True)
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert "partially initialized" in failed["cyc.a"]


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": {"e"}, "f": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["e", "e2"]]


def test_top_level_holds_only_what_users_name() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert top == TOP_LEVEL, f"modules at the top: {sorted(top - TOP_LEVEL)} belong in a subpackage"
    assert folders == SUBPACKAGES


def test_every_module_says_what_it_is() -> None:
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip(), f"{name} has no module docstring"


def test_public_import_paths_stay() -> None:
    from kie_extend import (TERMINAL, ValidationError, cancel, cancel_batch, enqueue_extend, enqueue_many,  # noqa: F401
                            get_batch, get_job, load_settings, pause, resume, upload_audio)
    from kie_extend.worker import app

    assert "kie_extend.extend" in app.tasks


def test_docs_layout_lists_every_module() -> None:
    """docs/layout.md names every module of the package, and no module that is gone."""
    doc = (PACKAGE.parent.parent / "docs" / "layout.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", doc, re.M))
    present = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    assert present - listed == set(), "add these modules to docs/layout.md"
    assert listed - present == set(), "these modules in docs/layout.md no longer exist"


def test_old_module_paths_still_import_with_a_warning() -> None:
    """Code and settings written before the subpackages still work (``celery beat -S
    kie_extend.beat.TickScheduler``, ``from kie_extend.infra_check import InfraUnavailable``)."""
    import importlib
    import subprocess
    import sys

    from kie_extend._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.util.find_spec(f"kie_extend.{new}") is not None, f"{old} -> {new}: no such module"
    script = (
        "import warnings, json\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import kie_extend.beat, kie_extend.admission.beat\n"
        "    from kie_extend.infra_check import InfraUnavailable\n"
        "import kie_extend\n"
        "print(json.dumps([kie_extend.beat is kie_extend.admission.beat\n"
        "                  and kie_extend.admission.beat.__spec__.name == 'kie_extend.admission.beat',\n"
        "                  InfraUnavailable is kie_extend.InfraUnavailable,\n"
        "                  [str(w.message) for w in caught if w.category is FutureWarning]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    same, exported, warned = json.loads(out.stdout)
    assert same and exported
    assert warned == ["kie_extend.beat moved to kie_extend.admission.beat; import it from there (the old name goes "
                      "away in a later release)",
                      "kie_extend.infra_check moved to kie_extend.infra.check; import it from there (the old name "
                      "goes away in a later release)"]
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("kie_extend.no_such_module")


def test_the_moved_table_matches_docs_layout() -> None:
    from kie_extend._moved import MOVED

    doc = (PACKAGE.parent.parent / "docs" / "layout.md").read_text()
    for old, new in MOVED.items():
        assert f"| `kie_extend.{old}` | `kie_extend.{new}` |" in doc, old
    # and the other way: every row of the doc's table is an alias, or a name the doc says is gone
    section = doc.split("## Where modules moved", 1)[1]
    rows = re.findall(r"^\| `kie_extend\.(\w+)` \| `kie_extend\.([\w.]+)`", section, re.M)
    assert len(rows) >= len(MOVED)
    not_aliased = {"store", "infra", "admission", "cli", "receiver"}
    for old, new in rows:
        assert old in MOVED or old in not_aliased, f"docs/layout.md lists kie_extend.{old} but it is no alias"


def test_logger_names_follow_the_modules() -> None:
    """A module's logger is named after it, or after the module it speaks for (``worker`` logs the
    start-up checks as ``kie_extend.infra.preflight``); never after a package or a name that is no
    module (docs/layout.md: a log filter may match the module path)."""
    modules = {n for n, p in _modules().items() if p.name != "__init__.py"}
    wrong = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getLogger" and node.args
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("kie_extend")
                    and node.args[0].value != name and node.args[0].value not in modules):
                wrong.append(f"{name}: getLogger({node.args[0].value!r})")
    assert wrong == []
