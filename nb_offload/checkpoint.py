"""Find a model's files and read its weights, one tensor at a time.

A checkpoint is a folder in the ``save_pretrained`` layout: ``config.json`` plus safetensors
files (or, with ``allow_pickle=True``, PyTorch pickle files). Headers are parsed here, so a
plan needs no weight read, and each tensor's byte range in its file is known: the disk tier
reads straight from the checkpoint where the dtype already matches.
"""

from __future__ import annotations

import json
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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


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
                f"{repo_id!r} is neither a local folder nor a Hub id in the local Hugging Face cache, and downloads are off "
                "(HF_HUB_OFFLINE or local_files_only); download it first (huggingface-cli download "
                f"{repo_id}) or give a local folder.") from exc
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as exc:
        raise CheckpointError(
            f"Hub id {repo_id!r} could not be fetched ({type(exc).__name__}: {exc}); give a local "
            "folder in the save_pretrained layout or an id that exists.") from exc


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check the file holds every byte it promises."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"checkpoint file {path!r} is truncated ({size} bytes): not a safetensors file.")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(
                    f"checkpoint file {path!r} is truncated or corrupt: its header claims {header_len} bytes "
                    f"but the file holds {size}; re-download or re-save it.")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint file {path!r} can't be read as safetensors: {exc}.") from exc
    data_start = 8 + header_len
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        if data_start + end > size:
            raise CheckpointError(
                f"checkpoint file {path!r} is truncated: tensor {key!r} ends at byte {data_start + end} "
                f"but the file holds {size}; re-download or re-save it.")
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"checkpoint file {path!r}: tensor {key!r} has dtype {meta['dtype']!r}, which nb_offload can't read.")
        out[key] = TensorInfo(key, path, dtype, tuple(meta["shape"]), data_start + begin, end - begin)
    return out


class Checkpoint:
    """The weight files of one model folder, with every tensor's location known up front."""

    def __init__(self, folder: str, *, allow_pickle: bool = False):
        self.folder = folder
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(
                f"model folder {folder!r} has no config.json; give a folder written by save_pretrained.")
        names = sorted(os.listdir(folder))
        st_files = [n for n in names if n.endswith(".safetensors")]
        pickle_files = [n for n in names if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", n)]
        self.tensors: dict[str, TensorInfo] = {}
        self.is_pickle = False
        if st_files:
            for name in st_files:
                self.tensors.update(read_safetensors_header(os.path.join(folder, name)))
        elif pickle_files:
            if not allow_pickle:
                raise CheckpointError(
                    f"model folder {folder!r} holds only pickle weights ({', '.join(pickle_files)}); loading "
                    "pickle files can run arbitrary code. Convert them to safetensors, or pass "
                    "allow_pickle=True if you trust the source.")
            self.is_pickle = True
            self._pickled = {}
            for name in pickle_files:
                path = os.path.join(folder, name)
                sd = _load_pickle(path)
                for key, t in sd.items():
                    self._pickled[key] = t
                    self.tensors[key] = TensorInfo(key, path, str(t.dtype).removeprefix("torch."),
                                                   tuple(t.shape), None, t.numel() * t.element_size())
        else:
            raise CheckpointError(
                f"model folder {folder!r} has no weights: expected *.safetensors files "
                f"(or pytorch_model*.bin with allow_pickle=True); found {names}.")
        if not self.tensors:
            raise CheckpointError(f"model folder {folder!r}: its weight files hold no tensors.")
        self._handles: dict[str, object] = {}

    def fingerprint_parts(self) -> list:
        """What identifies these weights: each file's name, size and modification time."""
        parts = []
        for path in sorted({t.file for t in self.tensors.values()}):
            st = os.stat(path)
            parts.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
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

    def close(self):
        self._handles.clear()
        if self.is_pickle:
            self._pickled.clear()


def _load_pickle(path):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"pickle checkpoint {path!r} can't be loaded with weights_only=True: {exc}.") from exc
