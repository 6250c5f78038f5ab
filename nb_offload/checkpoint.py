"""Find a model's files and read its weights, one tensor at a time.

A checkpoint is a folder in the ``save_pretrained`` layout: ``config.json`` plus safetensors
files (or, with ``allow_pickle=True``, PyTorch pickle files). Headers are parsed here, so a
plan needs no weight read, and each tensor's byte range in its file is known: the disk tier
reads straight from the checkpoint where the dtype already matches.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass

from .errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
# Every dtype the safetensors format defines, with its size in bits (what a header may name; the
# ones missing from SAFETENSORS_DTYPES are valid files that nb_offload can't read).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
MAX_HEADER_BYTES = 100_000_000   # safetensors' own limit on the JSON header
_MAX_JSON_DEPTH = 64             # real headers nest 3 deep; safetensors' JSON parser stops at 128
_U64_MAX = 2**64 - 1             # safetensors computes sizes in 64-bit unsigned ints
_I64_MAX = 2**63 - 1             # the largest dimension torch can hold
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_FILE = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_ST_INDEX = "model.safetensors.index.json"
_PT_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor's bytes are."""

    key: str
    file: str
    dtype: str          # torch dtype name, e.g. "bfloat16"
    shape: tuple
    offset: int | None  # byte offset of the data in ``file`` (None for pickle files)
    nbytes: int


def resolve(model: str, *, local_files_only: bool | None = None, revision: str | None = None) -> str:
    """Turn a folder path or a Hub id into a local folder, or raise a CheckpointError."""
    if not isinstance(model, (str, os.PathLike)):
        raise CheckpointError(f"model={model!r} is not a folder path or a Hub id such as \"org/name\".")
    text = os.fspath(model)
    expanded = os.path.expanduser(text)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if os.path.exists(expanded):
        raise CheckpointError(f"model={text!r} is a file; give the folder that holds config.json and the weights.")
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise CheckpointError(
            f"model folder {text!r} does not exist; give a folder in the save_pretrained layout "
            "(config.json + *.safetensors) or a Hub id such as \"org/name\".")
    return _resolve_hub_id(text, local_files_only=local_files_only, revision=revision)


def _resolve_hub_id(repo_id: str, *, local_files_only: bool | None, revision: str | None) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise CheckpointError(f"Hub id {repo_id!r} needs huggingface_hub installed.") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if local_files_only is None:
        local_files_only = offline
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=patterns)
    except Exception as exc:
        if local_files_only:
            raise CheckpointError(
                f"{repo_id!r} is neither a local folder nor a Hub id in the local Hugging Face cache, and downloads "
                "are off "
                "(HF_HUB_OFFLINE or local_files_only); download it first (huggingface-cli download "
                f"{repo_id}) or give a local folder.") from exc
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as exc:
        raise CheckpointError(
            f"Hub id {repo_id!r} could not be fetched ({type(exc).__name__}: {exc}); give a local "
            "folder in the save_pretrained layout or an id that exists.") from exc


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check it the way safetensors' ``safe_open`` does, or
    stricter: the file may come from anywhere, and a header it would refuse must not load here.

    Checked: the 8-byte length (within the file and within safetensors' 100 MB limit); the header is
    UTF-8 JSON, an object starting with ``{``, with no NaN/Infinity, duplicate keys, out-of-range
    numbers, lone surrogates or deep nesting; ``__metadata__`` is absent, null or a str -> str
    object; every other entry is an object with a known ``dtype``, a ``shape`` of non-negative ints
    and ``data_offsets`` of two non-negative ints, begin <= end, spanning exactly
    product(shape) x dtype size bytes; sorted by offset, the tensors cover the data section from 0 to
    the end of the file, without overlap, gap or trailing bytes. Every failure is a CheckpointError
    naming the file (and the tensor, where there is one).
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"checkpoint file {path!r} is truncated ({size} bytes): not a safetensors file.")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(
                    f"checkpoint file {path!r} is truncated or corrupt: its header claims {header_len} bytes "
                    f"but the file holds {size}; re-download or re-save it.")
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"checkpoint file {path!r} is corrupt: its header claims {header_len} bytes, more than "
                    f"safetensors' limit of {MAX_HEADER_BYTES}; re-download or re-save it.")
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path!r} can't be read: {exc}.") from exc
    if len(raw) < header_len:
        raise CheckpointError(f"checkpoint file {path!r} is truncated: its header claims {header_len} bytes "
                              f"but only {len(raw)} could be read; re-download or re-save it.")
    if not raw.startswith(b"{"):
        raise CheckpointError(f"checkpoint file {path!r} is not a safetensors file: its header starts with "
                              f"{raw[:16]!r}, expected a JSON object starting with '{{'.")
    try:
        header = _strict_json(raw, whole=False)
        if isinstance(header, dict):
            _check_header_tree(header, raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"checkpoint file {path!r} can't be read as safetensors: its header is not "
                              f"valid JSON ({_short(exc)}); expected the strict UTF-8 JSON safetensors writes, "
                              "so re-download or re-save it.") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint file {path!r} is not a safetensors file: its header is a JSON "
                              f"{_json_type(header)}, expected an object of tensor entries.")
    _check_metadata(path, header.get("__metadata__"))
    data_start = 8 + header_len
    data_len = size - data_start
    entries = []  # (begin, end, key, dtype, shape)
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        entries.append(_check_entry(path, key, meta, data_len, data_start, size))
    _check_layout(path, entries, data_len, data_start, size)
    out = {}
    for begin, end, key, dtype, shape in entries:
        torch_dtype = SAFETENSORS_DTYPES.get(dtype)
        if torch_dtype is None:
            raise CheckpointError(
                f"checkpoint file {path!r}: tensor {key!r} has dtype {dtype!r}, which nb_offload can't read "
                f"(readable: {', '.join(SAFETENSORS_DTYPES)}).")
        out[key] = TensorInfo(key, path, torch_dtype, shape, data_start + begin, end - begin)
    return out


class _BadJSON(ValueError):
    """JSON that Python's parser takes but safetensors' (serde_json) refuses, or that is ambiguous."""


def _unique_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _BadJSON(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name):
    raise _BadJSON(f"{name} is not a JSON number")


def _json_int(text):
    # serde_json reads "-0" as the float -0.0, so it is no valid size or offset there either.
    return -0.0 if text == "-0" else int(text)


def _json_float(text):
    value = float(text)
    if math.isinf(value):
        raise _BadJSON(f"number {text[:40]} is out of range")
    return value


def _strict_json(raw: bytes, *, whole: bool = True):
    """Parse UTF-8 JSON the way safetensors does, or stricter: no NaN/Infinity, no duplicate keys, no
    numbers past a float's range; with ``whole``, also no lone surrogates and at most
    _MAX_JSON_DEPTH levels anywhere (a safetensors header checks those where they can matter)."""
    value = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                       parse_int=_json_int, parse_float=_json_float)
    if whole:
        _check_tree(value, 1)
    return value


def _check_tree(value, depth):
    """No lone surrogate in any string or key, no container deeper than _MAX_JSON_DEPTH."""
    stack = [(value, depth)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _encodable(item)
        elif isinstance(item, (dict, list)):
            if depth > _MAX_JSON_DEPTH:
                raise _BadJSON(f"it nests deeper than {_MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                for key in item:
                    _encodable(key)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def _check_header_tree(header: dict, raw: bytes):
    """_check_tree where it matters, fast on a header of a million tensors: lone surrogates can only
    come from a \\uD800-\\uDFFF escape, and the only places deep nesting can pass the entry checks
    are fields safetensors ignores (anything but dtype, shape and data_offsets)."""
    if _SURROGATE_ESCAPE.search(raw):
        _check_tree(header, 1)
        return
    for meta in header.values():
        if isinstance(meta, dict) and len(meta) > 3:
            for field, value in meta.items():
                if field not in _ENTRY_FIELDS and isinstance(value, (dict, list)):
                    _check_tree(value, 3)


def _encodable(text: str):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _BadJSON(f"string {text[:60]!r} holds a lone surrogate escape") from exc


def _short(exc) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, list) else "object"


def _check_metadata(path, meta):
    if meta is None:  # absent, or null as safetensors also accepts
        return
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint file {path!r}: its __metadata__ is a JSON {_json_type(meta)} "
                              f"({_short(repr(meta))}), expected an object of strings.")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise CheckpointError(f"checkpoint file {path!r}: its __metadata__ entry {key!r} is "
                                  f"{_short(repr(value))}, expected a string.")


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # not bool, not float


def _check_entry(path, key, meta, data_len, data_start, size):
    """One tensor entry -> (begin, end, key, dtype, shape), or a CheckpointError naming file and tensor."""
    where = f"checkpoint file {path!r}: tensor {key!r}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is a JSON {_json_type(meta)} ({_short(repr(meta))}), expected an object "
                              "with dtype, shape and data_offsets.")
    for field in _ENTRY_FIELDS:
        if field not in meta:
            raise CheckpointError(f"{where} has no {field!r}; expected an object with dtype, shape and "
                                  f"data_offsets (it has {sorted(meta)}).")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise CheckpointError(f"{where} has dtype {_short(repr(dtype))}, which is no safetensors dtype; "
                              f"expected one of {', '.join(SAFETENSORS_DTYPE_BITS)}.")
    if not isinstance(shape, list) or not all(_is_count(d) and d <= _I64_MAX for d in shape):
        raise CheckpointError(f"{where} has shape {_short(repr(shape))}; expected a list of non-negative "
                              f"integers (each at most {_I64_MAX}).")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{where} has data_offsets {_short(repr(offsets))}; expected [begin, end], "
                              "two non-negative integers.")
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{where} has data_offsets [{begin}, {end}], which run backwards; expected "
                              "begin <= end.")
    if end > data_len:
        raise CheckpointError(
            f"checkpoint file {path!r} is truncated or corrupt: tensor {key!r} ends at byte {data_start + end} "
            f"but the file holds {size}; re-download or re-save it.")
    count = 1
    for d in shape:
        count *= d
        if count > _U64_MAX:
            raise CheckpointError(f"{where} has shape {shape}, whose element count overflows 64 bits; "
                                  "expected a shape that fits the file.")
    bits = count * SAFETENSORS_DTYPE_BITS[dtype]
    if bits > _U64_MAX:
        raise CheckpointError(f"{where} has shape {shape} of {dtype}, whose size overflows 64 bits; "
                              "expected a shape that fits the file.")
    if bits % 8:
        raise CheckpointError(f"{where} has shape {shape} of {dtype}: {count} elements of "
                              f"{SAFETENSORS_DTYPE_BITS[dtype]} bits don't fill whole bytes; expected a "
                              "whole number of bytes.")
    if end - begin != bits // 8:
        raise CheckpointError(
            f"{where} has data_offsets [{begin}, {end}] ({end - begin} bytes), but dtype {dtype} x shape "
            f"{shape} needs {bits // 8} bytes; expected end - begin == {bits // 8}.")
    return begin, end, key, dtype, tuple(shape)


def _check_layout(path, entries, data_len, data_start, size):
    """Sorted by offset, the tensors must tile the data section: from 0, no overlap, no gap, to the end."""
    pos, last = 0, None
    for begin, end, key, _, _ in sorted(entries, key=lambda e: (e[0], e[1], e[2])):
        if begin < pos:
            raise CheckpointError(
                f"checkpoint file {path!r}: tensor {key!r} has data_offsets [{begin}, {end}], which overlap "
                f"tensor {last[2]!r} at [{last[0]}, {last[1]}]; expected every tensor to have its own bytes.")
        if begin > pos:
            after = f"after tensor {last[2]!r} (which ends at {pos})" if last else "at the start of the data"
            raise CheckpointError(
                f"checkpoint file {path!r}: tensor {key!r} has data_offsets [{begin}, {end}], leaving a gap of "
                f"{begin - pos} bytes {after}; expected the tensors to cover the data section without gaps.")
        pos, last = end, (begin, end, key)
    if pos != data_len:
        raise CheckpointError(
            f"checkpoint file {path!r} has {data_len - pos} bytes after the last tensor's data (the tensors end "
            f"at byte {data_start + pos}, the file holds {size}); expected the tensors to end exactly at the "
            "end of the file, as safetensors requires.")


class Checkpoint:
    """The weight files of one model folder, with every tensor's location known up front.

    With ``model.safetensors.index.json`` only the shards its ``weight_map`` names are read (other
    ``*.safetensors`` beside it are ignored); every shard it names must exist and hold the tensors
    it assigns to it. An unlisted ``model.safetensors`` beside an index is refused: transformers
    would load it alone and ignore the index, nb_offload would follow the index, and which of the
    two is stale can't be told. Without an index every ``*.safetensors`` file is read. Either way a
    tensor name found in two of the files read is refused: transformers takes whichever file it
    read last, whatever the index says, so no choice here could be trusted to match it. Pickle
    weights (``allow_pickle=True``) follow ``pytorch_model.bin.index.json`` the same way.
    """

    def __init__(self, folder: str, *, allow_pickle: bool = False):
        self.folder = folder
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(
                f"model folder {folder!r} has no config.json; give a folder written by save_pretrained.")
        names = sorted(os.listdir(folder))
        self.tensors: dict[str, TensorInfo] = {}
        self.is_pickle = False
        if _ST_INDEX in names:
            assigned = _read_index(folder, _ST_INDEX, ".safetensors", "model.safetensors")
            self.tensors = _gather(folder, sorted(set(assigned.values())), read_safetensors_header,
                                   assigned, _ST_INDEX)
        elif any(n.endswith(".safetensors") for n in names):
            files = [n for n in names if n.endswith(".safetensors")]
            self.tensors = _gather(folder, files, read_safetensors_header)
        elif _PT_INDEX in names or any(_PICKLE_FILE.fullmatch(n) for n in names):
            assigned = None
            if _PT_INDEX in names:
                assigned = _read_index(folder, _PT_INDEX, ".bin", "pytorch_model.bin")
            files = (sorted(set(assigned.values())) if assigned is not None
                     else [n for n in names if _PICKLE_FILE.fullmatch(n)])
            if not allow_pickle:
                listed = f"{_PT_INDEX} -> " if assigned is not None else ""
                raise CheckpointError(
                    f"model folder {folder!r} holds only pickle weights ({listed}{', '.join(files)}); loading "
                    "pickle files can run arbitrary code. Convert them to safetensors, or pass "
                    "allow_pickle=True if you trust the source.")
            self.is_pickle = True
            self._pickled = {}
            self.tensors = _gather(folder, files, self._read_pickle, assigned, _PT_INDEX)
        else:
            raise CheckpointError(
                f"model folder {folder!r} has no weights: expected *.safetensors files "
                f"(or pytorch_model*.bin with allow_pickle=True); found {names}.")
        if not self.tensors:
            raise CheckpointError(f"model folder {folder!r}: its weight files hold no tensors.")
        self._handles: dict[str, object] = {}

    def _read_pickle(self, path) -> dict[str, TensorInfo]:
        out = {}
        for key, t in _load_pickle(path).items():
            self._pickled[key] = t
            out[key] = TensorInfo(key, path, str(t.dtype).removeprefix("torch."),
                                  tuple(t.shape), None, t.numel() * t.element_size())
        return out

    def fingerprint_parts(self) -> list:
        """What identifies these weights: each file's name, size, inode, and modification and change
        times (a write changes the change time, and no call can set it back)."""
        parts = []
        for path in sorted({t.file for t in self.tensors.values()}):
            st = os.stat(path)
            parts.append([os.path.basename(path), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
        return parts

    def get(self, key: str):
        """Load one tensor (a CPU tensor, its own memory)."""
        if self.is_pickle:
            return self._pickled[key]
        info = self.tensors[key]
        handle = self._handle(info.file)
        return handle.get_tensor(key)

    def get_slice(self, key: str):
        """A lazy handle on one tensor, as transformers' converters expect."""
        if self.is_pickle:
            return self._pickled[key]
        return self._handle(self.tensors[key].file).get_slice(key)

    def _handle(self, path):
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open
            try:
                handle = safe_open(path, framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"checkpoint file {path!r} can't be opened: {exc}.") from exc
            self._handles[path] = handle
        return handle

    def drop_handles(self):
        """Unmap the open safetensors files (they reopen on the next ``get``): their pages count in
        the process's resident memory while mapped."""
        self._handles.clear()

    def close(self):
        self._handles.clear()
        if self.is_pickle:
            self._pickled.clear()


def _read_index(folder: str, name: str, suffix: str, single: str) -> dict[str, str]:
    """An index file's weight_map (tensor name -> shard file name), checked: every shard a plain file
    name inside ``folder`` ending in ``suffix``, every shard it names present, and no unlisted
    single-file checkpoint ``single`` beside it (transformers would load that file instead)."""
    path = os.path.join(folder, name)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        index = _strict_json(raw)
    except OSError as exc:
        raise CheckpointError(f"checkpoint index {path!r} can't be read: {exc}.") from exc
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint index {path!r} is not valid JSON ({_short(exc)}); expected an "
                              "object with a \"weight_map\" of tensor name -> shard file.") from exc
    if not isinstance(index, dict) or "weight_map" not in index:
        got = (f"an object with keys {sorted(index)[:5]}" if isinstance(index, dict)
               else f"a JSON {_json_type(index)}")
        raise CheckpointError(f"checkpoint index {path!r} is {got}; expected an object with a \"weight_map\" "
                              "of tensor name -> shard file.")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"checkpoint index {path!r} has weight_map {_short(repr(weight_map))}; expected a "
                              "non-empty object of tensor name -> shard file.")
    if not isinstance(index.get("metadata", {}), dict):
        raise CheckpointError(f"checkpoint index {path!r} has metadata {_short(repr(index['metadata']))}; "
                              "expected an object.")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"checkpoint index {path!r} assigns tensor {key!r} to {_short(repr(shard))}; "
                                  f"expected a shard file name (a string ending in {suffix}).")
        if (shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\0" in shard
                or os.sep in shard or (os.altsep and os.altsep in shard) or os.path.isabs(shard)
                or os.path.splitdrive(shard)[0] or not shard.endswith(suffix)):
            raise CheckpointError(
                f"checkpoint index {path!r} assigns tensor {key!r} to {shard!r}; expected the name of a "
                f"{suffix} file inside the model folder (no path separators, no '..').")
    shards = sorted(set(weight_map.values()))
    if single not in shards and os.path.isfile(os.path.join(folder, single)):
        raise CheckpointError(
            f"model folder {folder!r} holds both {single!r} and {name!r}, which names other shards "
            f"({', '.join(repr(x) for x in shards[:3])}{' ...' if len(shards) > 3 else ''}); transformers would "
            f"load {single!r} alone and ignore the index. Expected one of them: remove the stale one.")
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise CheckpointError(
            f"model folder {folder!r} lacks {len(missing)} of the {len(shards)} shard(s) its {name} names: "
            f"{', '.join(repr(m) for m in missing[:5])}{' ...' if len(missing) > 5 else ''}; re-download "
            "the missing shard(s).")
    return weight_map


def _gather(folder, files, read, assigned=None, index=None) -> dict[str, TensorInfo]:
    """Read each file's tensors with ``read``; refuse a tensor name held by two files and, with an index
    (``assigned``: name -> shard, from the file ``index``), a name it assigns to a shard that doesn't
    hold it."""
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        for key, info in read(os.path.join(folder, name)).items():
            first = tensors.get(key)
            if first is not None:
                raise CheckpointError(
                    f"model folder {folder!r}: tensor {key!r} is in two weight files, "
                    f"{os.path.basename(first.file)!r} and {name!r}; expected each tensor in one file only "
                    "(remove the stale file" + (" or fix the index)." if assigned is not None else ")."))
            tensors[key] = info
    if assigned is not None:
        for key, shard in assigned.items():
            info = tensors.get(key)
            if info is None or os.path.basename(info.file) != shard:
                found = (f"it is in {os.path.basename(info.file)!r}" if info is not None
                         else "no listed shard holds it")
                raise CheckpointError(
                    f"checkpoint index {os.path.join(folder, index)!r} assigns tensor "
                    f"{key!r} to {shard!r}, but that file doesn't hold it ({found}); re-download the "
                    "checkpoint or fix the index.")
    return tensors


def _load_pickle(path):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"pickle checkpoint {path!r} can't be loaded with weights_only=True: {exc}.") from exc
