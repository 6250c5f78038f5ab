"""The CUDA driver's own functions that torch doesn't expose, through ctypes: looked up once a process."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def function(name: str, *argtypes):
    """The driver's ``name`` (its ``_v2`` where the driver has it), taking ``argtypes``, returning a CUresult."""
    lib = ctypes.CDLL("libcuda.so.1")
    fn = getattr(lib, f"{name}_v2", None) or getattr(lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn
