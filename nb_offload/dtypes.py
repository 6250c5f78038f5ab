"""The weight dtypes nb_offload accepts, and their spellings (no torch)."""

from __future__ import annotations

from .errors import OptionError

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
SHORT_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}     # as plans and pins name formats


def canonical_dtype(name, value):
    """The dtype's canonical name ("auto" or None: the checkpoint's)."""
    if value is None:
        return None
    text = str(value) if type(value).__name__ == "dtype" else value     # a torch.dtype, without importing torch
    if isinstance(text, str):
        key = text.removeprefix("torch.").lower()
        key = DTYPE_ALIASES.get(key, key)
        if key in DTYPES or key == "auto":
            return key
    raise OptionError(f"{name}={value!r} is not supported; accepted: {', '.join(DTYPES)} (or None / \"auto\" for "
                      "the checkpoint's).")
