"""The package's shape, read from its source: imports point one way (no cycle, also through
imports inside functions), and the core never imports the notebook layer (magics, widgets).
Text, HTML and SVG are written in views.py alone, which imports only light core modules.
The tests' own: they share code through helpers.py, never by importing each other."""

import ast
import os
import re

TESTS = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(os.path.dirname(TESTS), "nb_offload")
UI = ("magics", "widgets")
# The one lazy convenience: OffloadedModel.dashboard() builds the widgets on request.
ALLOWED_UI_IMPORTS = {("model", "widgets")}
# views.py renders plans and traces for every caller (Plan's reprs, the widgets' static copies,
# the magics): from plain objects, so it needs nothing heavier than these.
VIEWS_MAY_IMPORT = {"budget", "errors", "planner", "trace"}
MARKUP = re.compile(r"<(svg|div|table|tr|td|th|rect|span|code|pre|text|path|title|b|i|g)[\s>/]")


def module_name(path):
    rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__") if rel != "__init__" else ""


def imports_of(path, name):
    """Modules of the package that ``path`` imports, anywhere in it (top level or in a function)."""
    package = name.rsplit(".", 1)[0] if path.endswith("__init__.py") is False and "." in name else \
        (name if path.endswith("__init__.py") else "")
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:             # from . import x
                    found.update(".".join(base + [a.name]) for a in node.names)
                    continue
            elif node.module and node.module.startswith("nb_offload"):
                target = node.module.removeprefix("nb_offload").lstrip(".")
            else:
                continue
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("nb_offload").lstrip(".") for a in node.names
                         if a.name.startswith("nb_offload"))
    return found


def graph():
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = module_name(path)
                out[name] = imports_of(path, name)
    known = set(out)
    # "widgets.dashboard" names a module; "widgets" the package: keep what resolves to a module
    return {m: {t for t in targets if t in known and t != m} for m, targets in out.items()}


def cycles(g):
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_no_import_cycle():
    g = graph()
    assert "engine" in g and "tiers" in g["engine"]         # the graph is read at all
    assert cycles(g) == []


def test_core_does_not_import_the_notebook_layer():
    g = graph()
    core = [m for m in g if m and not m.startswith(UI) and m != ""]
    bad = [(m, t) for m in core for t in g[m] if t.startswith(UI)
           and (m, t.split(".")[0]) not in ALLOWED_UI_IMPORTS]
    assert bad == []


def test_views_import_only_light_core_modules():
    g = graph()
    assert "views" in g and "budget" in g["views"]
    assert g["views"] <= VIEWS_MAY_IMPORT, g["views"] - VIEWS_MAY_IMPORT
    # planner's reprs delegate to views on use, never when planner is imported
    top = {node.module for node in ast.parse(open(os.path.join(PACKAGE, "planner.py")).read()).body
           if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.split(".")[-1] == "views" for m in top)


def test_only_views_writes_markup():
    """The core does not render, nor do the widgets: their static copies come from views.py."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                tags = {m.group(1) for node in ast.walk(ast.parse(open(path).read(), path))
                        if isinstance(node, ast.Constant) and isinstance(node.value, str)
                        for m in MARKUP.finditer(node.value)}
                if tags:
                    found[module_name(path)] = tags
    assert {"svg", "rect", "table"} <= found.pop("views")      # the markup is read at all
    assert found == {}


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_tests_import_only_helpers_and_the_package():
    """A test module imported by another brings its tests and module-level skips along, and
    conftest is pytest's to load (under --import-mode=importlib it is no module of that name)."""
    paths = [os.path.join(root, f) for root, _, files in os.walk(TESTS) for f in files if f.endswith(".py")]
    local = {os.path.basename(p)[:-3] for p in paths}
    assert {"conftest", "helpers", "test_plan"} <= local
    bad, users = [], set()
    for path in paths:
        rel = os.path.relpath(path, TESTS)
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ImportFrom) and node.level:
                bad.append((rel, "." * node.level + (node.module or "")))
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "helpers":
                    users.add(rel)
                elif top in local:
                    bad.append((rel, name))
    assert {"test_plan.py", os.path.join("gpu", "test_gpu.py")} <= users     # the imports are read at all
    assert bad == []
