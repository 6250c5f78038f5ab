"""Code known to be a given form: what lets nb_offload put an exact equivalent in its place.

fused.py swaps a norm, an MLP or the rotary embedding for fused kernels, and cpu_experts.py computes a
routed expert's products without the experts module's bookkeeping, only where the code they replace is one
of the forms they know: its source the same syntax (docstrings and annotations aside), its loaded code the
same names, constants, parameters and defaults as the form compiled, no wrapper around it, and ``torch``
(``nn``, ``F``) bound to what the form means. A later rewrite, a kernel from the Hub or a wrapper is not a
form, and keeps its own code.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

_MISSING = object()


@functools.lru_cache(maxsize=None)
def _form_function(source: str):
    """The function a form's source defines, compiled here."""
    space: dict = {}
    exec(compile(textwrap.dedent(source), "<nb_offload form>", "exec"), space)  # noqa: S102 (our own text)
    return next(v for v in space.values() if inspect.isfunction(v))


def _syntax(source: str):
    """A function's parameters (all kinds, defaults, no annotations) and body as syntax trees, without
    decorators and docstring; None where the source isn't one function."""
    fn = ast.parse(textwrap.dedent(source)).body[0]
    if not isinstance(fn, ast.FunctionDef):
        return None
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    for arg in ast.walk(fn.args):
        if isinstance(arg, ast.arg):
            arg.annotation = None
    return ast.dump(fn.args), [ast.dump(s) for s in body]


def _constants(code):
    """A code object's names and constants (nested code's too), without its docstring, ``None`` or order: what
    the loaded code uses, which its source on disk may no longer say (the syntax is compared apart)."""
    items = list(code.co_consts)
    if items and isinstance(items[0], str):         # the docstring
        items = items[1:]
    nested = tuple(_constants(c) for c in items if inspect.iscode(c))
    consts = tuple(sorted((type(c).__name__, repr(c)) for c in items if c is not None and not inspect.iscode(c)))
    return (code.co_names, code.co_varnames, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
            code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS), consts, nested)


@functools.lru_cache(maxsize=256)
def _code_is_form(code, source: str) -> bool:
    """Whether ``code``'s source is ``source``'s, as syntax, and the loaded code uses the same names and
    constants as ``source`` compiled (keyed by the code object: a function given new code is read anew)."""
    try:
        found = _syntax(inspect.getsource(code))
    except Exception:           # no source, or not one function: not a form
        return False
    return found is not None and found == _syntax(source) \
        and _constants(code) == _constants(_form_function(source).__code__)


def _meant(name):
    """What a global name of the forms must be bound to."""
    import torch
    return {"torch": torch, "nn": torch.nn, "F": torch.nn.functional}.get(name, _MISSING)


def is_form(fn, *sources: str) -> bool:
    """Whether the function ``fn``, as loaded, is one of the forms ``sources``: no wrapper, the same syntax,
    names, constants and defaults, and the modules the forms name (``torch``, ``nn``, ``F``) bound to them."""
    if not inspect.isfunction(fn) or hasattr(fn, "__wrapped__"):
        return False
    for source in sources:
        form = _form_function(source)
        if _code_is_form(fn.__code__, source) and fn.__defaults__ == form.__defaults__ \
                and fn.__kwdefaults__ == form.__kwdefaults__ \
                and all(fn.__globals__.get(n, _MISSING) is _meant(n) for n in fn.__code__.co_names
                        if _meant(n) is not _MISSING):
            return True
    return False
