"""The package's shape, read from its source: imports point one way (no cycle, also through
imports inside functions), and the core never imports the notebook layer (magics, widgets)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nb_offload")
UI = ("magics", "widgets")
# The one lazy convenience: OffloadedModel.dashboard() builds the widgets on request.
ALLOWED_UI_IMPORTS = {("model", "widgets")}


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


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
