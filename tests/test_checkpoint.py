"""The safetensors reader refuses every header safetensors' own ``safe_open`` refuses (with a
CheckpointError that names the file), follows the shard index, and reads the same bytes as
safetensors for every header both accept (a seeded fuzz test checks that on a few thousand
mutations of a real file)."""

import copy
import json
import os
import random
import shutil
import struct
import time
from collections import Counter

import pytest
import torch

import nb_offload
from nb_offload import CheckpointError
from nb_offload.checkpoint import Checkpoint

# A tiny llama: one layer, hidden size 16, so each fuzz case writes and reads ~12 KB.
TINY = dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=128)
PROMPT = [[5, 17, 42, 7, 99, 3, 64, 12]]


@pytest.fixture
def tiny(model_dirs):
    return model_dirs("llama", **TINY)


# -- helpers -------------------------------------------------------------------------------------

def split(path):
    """(header dict in file order, data bytes) of a safetensors file."""
    with open(path, "rb") as fh:
        blob = fh.read()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def dumps(header) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def pack(header, data, n=None) -> bytes:
    """A safetensors file from a header (dict or raw bytes), data bytes and an optional length field."""
    hb = header if isinstance(header, bytes) else dumps(header)
    return struct.pack("<Q", len(hb) if n is None else n) + hb + data


def relayout(header, data, order) -> bytes:
    """The tensors' data laid out in ``order``, with ``header``'s offsets rewritten to match (a valid file)."""
    out = b""
    for key in order:
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [len(out), len(out) + end - begin]
        out += data[begin:end]
    return out


def by_offset(header):
    """Tensor keys in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def copy_model(src, dst, *, weights=True):
    """A copy of a model folder (config, tokenizer ...), with or without its weight files."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if weights or not name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


def broken(tmp_path, tiny, edit, n=None, name="broken"):
    """A copy of the tiny model whose header went through ``edit(header, data)``, which changes
    the header in place or returns (header or raw bytes, data)."""
    folder = copy_model(tiny, tmp_path / name)
    path = os.path.join(folder, "model.safetensors")
    header, data = split(path)
    out = edit(header, data)
    if out is not None:
        header, data = out
    with open(path, "wb") as fh:
        fh.write(pack(header, data, n))
    return folder, path


def reference_rejects(path) -> bool:
    """Whether safetensors (what transformers uses) refuses the file or any tensor in it."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:
        return True
    return False


def refused(folder, path, *fragments, reference=True):
    """Checkpoint(folder) raises a CheckpointError naming ``path`` and each fragment; with
    ``reference`` safetensors refuses the file too."""
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder)
    msg = str(info.value)
    assert repr(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    if reference:
        assert reference_rejects(path)
    return msg


def greedy_tokens(folder, ours: bool):
    ids = torch.tensor(PROMPT)
    if ours:
        llm = nb_offload.load(folder, device="cpu", progress=False)
        try:
            return llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False).cpu()
        finally:
            llm.unload()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False).cpu()


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# -- one test per kind of broken header ----------------------------------------------------------

def test_reversed_offsets(tmp_path, tiny):
    def edit(h, data):
        h["model.norm.weight"]["data_offsets"].reverse()
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "'model.norm.weight'", "run backwards", "begin <= end")


def test_overlapping_tensors(tmp_path, tiny):
    # q_proj points at o_proj's bytes (same size): the old reader read o_proj's weights twice.
    def edit(h, data):
        h["model.layers.0.self_attn.q_proj.weight"]["data_offsets"] = list(
            h["model.layers.0.self_attn.o_proj.weight"]["data_offsets"])
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "overlap", "'model.layers.0.self_attn.q_proj.weight'",
            "'model.layers.0.self_attn.o_proj.weight'")


def test_gap_between_tensors(tmp_path, tiny):
    # 8 stray bytes before the last tensor, its offsets moved past them: every offset is right,
    # but safetensors refuses bytes that belong to no tensor.
    def edit(h, data):
        last = h[by_offset(h)[-1]]
        begin, end = last["data_offsets"]
        last["data_offsets"] = [begin + 8, end + 8]
        return h, data[:begin] + b"\xee" * 8 + data[begin:]
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "gap of 8 bytes", repr(by_offset(split(path)[0])[-1]))


def test_trailing_bytes(tmp_path, tiny):
    folder, path = broken(tmp_path, tiny, lambda h, data: (h, data + b"\0" * 16))
    refused(folder, path, "16 bytes after the last tensor", "end of the file")


def test_offsets_past_the_end(tmp_path, tiny):
    def edit(h, data):
        last = h[by_offset(h)[-1]]
        last["data_offsets"] = [o + 64 for o in last["data_offsets"]]
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "truncated or corrupt", "'model.norm.weight'", "but the file holds")


def test_byte_count_not_dtype_times_shape(tmp_path, tiny):
    def edit(h, data):
        h["lm_head.weight"]["shape"] = [128, 8]  # 4096 bytes of F32, but the offsets span 8192
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "'lm_head.weight'", "[128, 8]", "needs 4096 bytes", "(8192 bytes)")


def test_entry_without_data_offsets(tmp_path, tiny):
    def edit(h, data):
        del h["model.norm.weight"]["data_offsets"]
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "'model.norm.weight'", "no 'data_offsets'", "expected")


def test_header_is_a_json_list(tmp_path, tiny):
    folder, path = broken(tmp_path, tiny, lambda h, data: (dumps(list(h.items())), data))
    refused(folder, path, "expected a JSON object")


def test_negative_offsets(tmp_path, tiny):
    # lm_head moved to [-8192, 0]: the old reader took 8 KB before the data, the header, as weights.
    def edit(h, data):
        h["lm_head.weight"]["data_offsets"] = [-8192, 0]
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "'lm_head.weight'", "[-8192, 0]", "non-negative")


def test_shape_not_integers(tmp_path, tiny):
    def edit(h, data):
        h["lm_head.weight"]["shape"] = [128.0, 16]
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "'lm_head.weight'", "[128.0, 16]", "non-negative integers")
    # bools are ints to Python, not to safetensors
    folder, path = broken(tmp_path, tiny, lambda h, d: h["model.norm.weight"].update(shape=[True] * 16),
                          name="bools")
    refused(folder, path, "'model.norm.weight'", "True", "non-negative integers")


def test_unknown_dtype(tmp_path, tiny):
    folder, path = broken(tmp_path, tiny, lambda h, d: h["lm_head.weight"].update(dtype="F33"))
    refused(folder, path, "'lm_head.weight'", "'F33'", "no safetensors dtype", "expected one of", "BF16")
    folder, path = broken(tmp_path, tiny, lambda h, d: h["lm_head.weight"].update(dtype=["F32"]), name="list")
    refused(folder, path, "'lm_head.weight'", "['F32']", "expected one of")


def test_dtype_safetensors_knows_but_nb_offload_cannot_read(tmp_path, tiny):
    # U32 [128, 16] spans the same bytes: a valid file, which nb_offload still can't read.
    folder, path = broken(tmp_path, tiny, lambda h, d: h["lm_head.weight"].update(dtype="U32"))
    assert not reference_rejects(path)
    refused(folder, path, "'lm_head.weight'", "'U32'", "nb_offload can't read", reference=False)


def test_nan_in_header(tmp_path, tiny):
    def edit(h, data):
        return dumps(h).replace(b'"shape":[16]', b'"shape":[NaN]', 1), data
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "NaN", "not valid JSON")


def test_duplicate_key(tmp_path, tiny):
    # Two entries for lm_head.weight: safetensors (and the old reader) keep the last one silently;
    # refused here, since the file is ambiguous.
    def edit(h, data):
        entry = dumps({"lm_head.weight": h["model.embed_tokens.weight"]})[1:-1]
        return b"{" + entry + b"," + dumps(h)[1:], data
    folder, path = broken(tmp_path, tiny, edit)
    refused(folder, path, "'lm_head.weight' appears twice", reference=False)


def test_metadata_not_str_to_str(tmp_path, tiny):
    folder, path = broken(tmp_path, tiny, lambda h, d: h.update(__metadata__={"format": 1}))
    refused(folder, path, "__metadata__", "'format'", "expected a string")
    folder, path = broken(tmp_path, tiny, lambda h, d: h.update(__metadata__=["pt"]), name="list")
    refused(folder, path, "__metadata__", "list", "expected an object of strings")


def test_header_length_past_the_file(tmp_path, tiny):
    size = os.path.getsize(os.path.join(tiny, "model.safetensors"))
    folder, path = broken(tmp_path, tiny, lambda h, d: None, n=size)
    refused(folder, path, f"header claims {size} bytes", "re-download")
    folder, path = broken(tmp_path, tiny, lambda h, d: None, n=2**64 - 1, name="huge")
    refused(folder, path, f"header claims {2**64 - 1} bytes")


def test_header_length_past_safetensors_limit(tmp_path, tiny):
    # 100_000_001 bytes of header (spaces after the JSON): within the file, but over safetensors'
    # limit (the old reader allowed 100 MiB).
    folder = copy_model(tiny, tmp_path / "big", weights=False)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "wb") as fh:  # a sparse file: the header is refused before it is read
        fh.write(struct.pack("<Q", 100_000_001) + b"{")
        fh.truncate(8 + 100_000_001)
    refused(folder, path, "100000001 bytes", "limit of 100000000")


def test_valid_edits_still_load(tmp_path, tiny):
    """What safetensors accepts and nb_offload keeps accepting: padding spaces, no metadata,
    null metadata, extra fields in an entry, tensors laid out in another order."""
    def edit(h, data):
        h.pop("__metadata__")
        h["model.norm.weight"]["note"] = "extra fields are ignored"
        out = relayout(h, data, by_offset(h)[::-1])      # rewrites the offsets: before dumps(h)
        return dumps(h) + b"   ", out
    folder, path = broken(tmp_path, tiny, edit)
    ckpt = Checkpoint(folder)
    ref = Checkpoint(tiny)
    assert set(ckpt.tensors) == set(ref.tensors)
    for k in ref.tensors:
        assert torch.equal(ckpt.get(k), ref.get(k))
    folder, path = broken(tmp_path, tiny, lambda h, d: h.update(__metadata__=None), name="null")
    assert len(Checkpoint(folder).tensors) == len(ref.tensors)


# -- quantized checkpoints: packed values are not weights ----------------------------------------

@pytest.mark.parametrize("quant_config,fragment", [
    ({"quant_method": "gptq", "bits": 4}, "quantized by gptq.*accepted: checkpoints saved by transformers with "
                                          "bitsandbytes, or unquantized ones"),
    # a bitsandbytes config over plain float weights: they are not the quantized weights it promises
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "q_proj.weight.*is not the int8 weight of shape"),
])
def test_a_checkpoint_quantized_another_way_is_refused_by_its_config(quant_config, fragment, tmp_path, tiny):
    """config.json's quantization_config says the tensors are packed values and scales: reading them
    as weights would give wrong output, so plan and load refuse what nb_offload can't read, naming it."""
    pytest.importorskip("bitsandbytes")
    folder = copy_model(tiny, tmp_path / "quantized")
    with open(os.path.join(folder, "config.json")) as fh:
        config = json.load(fh)
    config["quantization_config"] = quant_config
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh)
    for call in (nb_offload.plan, nb_offload.load):
        with pytest.raises(CheckpointError, match=fragment):
            call(folder, device="cpu")


def test_integer_values_for_a_float_weight_are_refused(tmp_path, tiny):
    """An int8 tensor where the model has a float weight (a quantized checkpoint without its config)."""
    from safetensors.torch import load_file, save_file
    folder = copy_model(tiny, tmp_path / "ints", weights=False)
    state = load_file(os.path.join(tiny, "model.safetensors"))
    key = next(k for k in sorted(state) if k.endswith("q_proj.weight"))
    state[key] = state[key].to(torch.int8)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{key}.*holds int8 values.*float32 weight"):
        nb_offload.load(folder, device="cpu", progress=False)


# -- following the index -------------------------------------------------------------------------

def shard(src, dst, index_name="model.safetensors.index.json", pickle=False):
    """The tiny model split into two shards plus an index, as save_pretrained writes them."""
    from safetensors.torch import load_file, save_file
    folder = copy_model(src, dst, weights=False)
    state = load_file(os.path.join(src, "model.safetensors"))
    keys = sorted(state)
    ext = "bin" if pickle else "safetensors"
    stem = "pytorch_model" if pickle else "model"
    names = [f"{stem}-00001-of-00002.{ext}", f"{stem}-00002-of-00002.{ext}"]
    weight_map = {}
    for name, part in zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2:])):
        piece = {k: state[k].clone() for k in part}
        if pickle:
            torch.save(piece, os.path.join(folder, name))
        else:
            save_file(piece, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, index_name), "w") as fh:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, fh)
    return folder, state, names


def write_index(folder, index, name="model.safetensors.index.json"):
    with open(os.path.join(folder, name), "w") as fh:
        fh.write(index if isinstance(index, str) else json.dumps(index))


def test_stray_file_beside_an_index_is_ignored(tmp_path, tiny):
    from safetensors.torch import save_file
    folder, state, names = shard(tiny, tmp_path / "sharded")
    # A leftover copy with other weights, and an old shard of another split (transformers ignores both).
    save_file({k: v + 1.0 for k, v in state.items()}, os.path.join(folder, "model-old.safetensors"))
    save_file({"lm_head.weight": state["lm_head.weight"] * 2}, os.path.join(folder, "model-00003-of-00003.safetensors"))
    ckpt = Checkpoint(folder)
    assert set(ckpt.tensors) == set(state)
    assert {os.path.basename(i.file) for i in ckpt.tensors.values()} == set(names)
    for k, v in state.items():
        assert torch.equal(ckpt.get(k), v)
    assert torch.equal(greedy_tokens(folder, ours=True), greedy_tokens(folder, ours=False))


def test_single_file_beside_an_index_is_refused(tmp_path, tiny):
    # transformers loads model.safetensors alone when it exists and ignores the index; following the
    # index would give other weights than transformers, following the file would let a stray win.
    from safetensors.torch import save_file
    folder, state, names = shard(tiny, tmp_path / "sharded")
    save_file({k: v + 1.0 for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder)
    msg = str(info.value)
    assert "'model.safetensors'" in msg and "'model.safetensors.index.json'" in msg and repr(names[0]) in msg, msg


def test_missing_shard_is_named(tmp_path, tiny):
    folder, _, names = shard(tiny, tmp_path / "sharded")
    os.remove(os.path.join(folder, names[1]))
    with pytest.raises(CheckpointError) as info:
        nb_offload.load(folder, device="cpu", progress=False)
    msg = str(info.value)
    assert repr(names[1]) in msg and "model.safetensors.index.json" in msg and "re-download" in msg, msg


def test_two_files_with_one_tensor_without_index(tmp_path, tiny):
    from safetensors.torch import load_file, save_file
    folder = copy_model(tiny, tmp_path / "m")
    norm = load_file(os.path.join(folder, "model.safetensors"))["model.norm.weight"]
    save_file({"model.norm.weight": norm * 0}, os.path.join(folder, "zz-leftover.safetensors"))
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder)
    msg = str(info.value)
    assert all(s in msg for s in ("'model.norm.weight'", "'model.safetensors'", "'zz-leftover.safetensors'")), msg


def test_tensor_in_two_listed_shards(tmp_path, tiny):
    # The index can't settle it: transformers loads every listed shard whole, the last one winning.
    from safetensors.torch import load_file, save_file
    folder, state, names = shard(tiny, tmp_path / "sharded")
    first = load_file(os.path.join(folder, names[0]))
    k = sorted(first)[0]
    second = load_file(os.path.join(folder, names[1]))
    second[k] = first[k] * 3
    save_file(second, os.path.join(folder, names[1]))
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder)
    msg = str(info.value)
    assert repr(k) in msg and repr(names[0]) in msg and repr(names[1]) in msg and "index" in msg, msg


def test_index_assigns_a_tensor_to_the_wrong_shard(tmp_path, tiny):
    folder, state, names = shard(tiny, tmp_path / "sharded")
    with open(os.path.join(folder, "model.safetensors.index.json")) as fh:
        index = json.load(fh)
    k = next(k for k, v in index["weight_map"].items() if v == names[0])
    index["weight_map"][k] = names[1]
    write_index(folder, index)
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder)
    msg = str(info.value)
    assert repr(k) in msg and f"to {names[1]!r}" in msg and f"it is in {names[0]!r}" in msg, msg


@pytest.mark.parametrize("index, fragment", [
    ("{not json", "not valid JSON"),
    ('{"weight_map": {"a": "model-00001-of-00002.safetensors", "a": "x.safetensors"}}', "appears twice"),
    ([], "a JSON list"),
    ({"metadata": {}}, "expected an object with a \"weight_map\""),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, "expected a non-empty object"),
    ({"weight_map": {}}, "expected a non-empty object"),
    ({"weight_map": {"lm_head.weight": 1}}, "expected a shard file name"),
    ({"weight_map": {"lm_head.weight": "../model.safetensors"}}, "no path separators"),
    ({"weight_map": {"lm_head.weight": "/etc/passwd.safetensors"}}, "no path separators"),
    ({"weight_map": {"lm_head.weight": ".."}}, "no path separators"),
    ({"weight_map": {"lm_head.weight": "model-00001-of-00002.bin"}}, "expected the name of a .safetensors file"),
    ({"metadata": [], "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}, "metadata []"),
])
def test_malformed_index(tmp_path, tiny, index, fragment):
    folder, _, _ = shard(tiny, tmp_path / "sharded")
    write_index(folder, index)
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder)
    msg = str(info.value)
    assert "model.safetensors.index.json" in msg and fragment in msg, msg


def test_pickle_index_is_followed(tmp_path, tiny):
    folder, state, names = shard(tiny, tmp_path / "pickled", "pytorch_model.bin.index.json", pickle=True)
    stray = os.path.join(folder, "pytorch_model-00003-of-00003.bin")  # an old shard of another split
    torch.save({k: v + 1.0 for k, v in state.items()}, stray)
    with pytest.raises(CheckpointError, match="allow_pickle=True") as info:
        Checkpoint(folder)
    assert names[0] in str(info.value)
    ckpt = Checkpoint(folder, allow_pickle=True)
    assert ckpt.is_pickle and {os.path.basename(i.file) for i in ckpt.tensors.values()} == set(names)
    for k, v in state.items():
        assert torch.equal(ckpt.get(k), v)
    os.replace(stray, os.path.join(folder, "pytorch_model.bin"))  # what transformers would load instead
    with pytest.raises(CheckpointError, match="would load 'pytorch_model.bin' alone"):
        Checkpoint(folder, allow_pickle=True)
    os.remove(os.path.join(folder, "pytorch_model.bin"))
    os.remove(os.path.join(folder, names[0]))
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder, allow_pickle=True)
    assert repr(names[0]) in str(info.value)


# -- fuzz: a few thousand mutations of a real header, against safetensors itself ----------------

ALL_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
              "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
        "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
BAD_DTYPES = ["f32", "F33", "", "float32", None, 1, ["F32"], {"F32": None}, True]
DELTAS = [-4096, -512, -64, -8, -4, -1, 1, 2, 4, 8, 64, 512, 4096, 2**32, 2**64]
NUMBER_SWAPS = [b"NaN", b"Infinity", b"-Infinity", b"-0", b"-1", b"1e400", b"1.0", b"1e2", b"01", b"+1", b"0x10",
                b"18446744073709551616", b"18446744073709551615", b"9223372036854775808", b"true", b"null",
                b'"1"', b"[]", b"{}"]


# Kinds of mutation (some listed twice: drawn twice as often).
KINDS = ["offset_shift", "offset_move", "offset_reverse", "offset_copy", "offset_swap", "offset_negative",
         "offset_junk", "dtype_any", "dtype_same_bytes", "dtype_same_bytes", "shape_dim", "reshape", "reshape",
         "shape_junk", "entry_junk", "field_drop", "field_extra", "metadata", "drop_entry", "rename",
         "relayout", "relayout", "root", "len_field", "truncate", "append", "chop_data", "pad", "text_number",
         "text_number", "text_dup", "text_bytes", "text_bytes", "combo"]


def _mutate(rng, header, data):
    """One random mutation of the file: (kind, file bytes)."""
    h = copy.deepcopy(header)
    keys = [k for k in h if k != "__metadata__"]
    k = rng.choice(keys)
    e = h[k]
    tail, n, raw = data, None, None
    kind = rng.choice(KINDS)
    if kind == "combo":  # two structural mutations at once
        for _ in range(2):
            sub = rng.choice(["offset_shift", "shape_dim", "dtype_any", "offset_swap", "drop_entry"])
            k = rng.choice([x for x in h if x != "__metadata__"] or [k])
            if k in h and isinstance(h[k], dict):
                _structural(rng, sub, h, k)
    elif kind in ("offset_shift", "offset_move", "offset_reverse", "offset_copy", "offset_swap",
                  "offset_negative", "offset_junk", "dtype_any", "dtype_same_bytes", "shape_dim", "reshape",
                  "shape_junk", "entry_junk", "field_drop", "field_extra", "metadata", "drop_entry", "rename"):
        _structural(rng, kind, h, k)
    elif kind == "relayout":  # a valid file: the tensors' data in another order, offsets rewritten
        order = list(keys)
        rng.shuffle(order)
        tail = relayout(h, data, order)
        if rng.random() < 0.5:
            h = {key: h[key] for key in rng.sample(list(h), len(h))}  # and the header in another order
    elif kind == "root":
        raw = rng.choice([dumps(list(h.items())), b"1", b'"x"', b"null", b"[]", b"{}", b"true", dumps([h])])
        tail = rng.choice([data, b""])
    elif kind == "len_field":
        hb = dumps(h)
        n = rng.choice([len(hb) + d for d in (-9, -8, -1, 1, 7, 8, len(data))]
                       + [0, 1, 2**64 - 1, 2**63, 10**8 + 1, 8 + len(hb) + len(data)])
    elif kind == "truncate":
        blob = pack(h, data)
        return kind, blob[:rng.randrange(len(blob))]
    elif kind == "append":
        tail = data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 8, 64])))
    elif kind == "chop_data":
        tail = data[:-rng.choice([1, 4, 8, 64, len(data)])]
    elif kind == "pad":
        hb = dumps(h)
        raw = rng.choice([hb + b" " * rng.randrange(1, 16), hb + b"\n\t\r ", b" " + hb, b"\n" + hb, hb + b"\0",
                          hb + b"\x0c", b"\xef\xbb\xbf" + hb])
    elif kind == "text_number":  # one number in the header text replaced by something else
        hb = dumps(h)
        spots = [i for i in range(1, len(hb)) if hb[i:i + 1].isdigit() and hb[i - 1:i] in (b"[", b",")]
        i = rng.choice(spots)
        j = i
        while hb[j:j + 1].isdigit():
            j += 1
        raw = hb[:i] + rng.choice(NUMBER_SWAPS) + hb[j:]
    elif kind == "text_dup":  # a key written twice (same or other value)
        hb = dumps(h)
        other = h[rng.choice(keys)] if rng.random() < 0.5 else e
        raw = b"{" + dumps({k: other})[1:-1] + b"," + hb[1:]
        if rng.random() < 0.3:
            raw = hb.replace(b'"dtype":', b'"dtype":"F32","dtype":', 1)
        if rng.random() < 0.2:
            raw = hb[:-1] + b',"__metadata__":{"a":"b"}}'
    elif kind == "text_bytes":  # raw byte damage inside the header
        hb = bytearray(dumps(h))
        i = rng.randrange(len(hb))
        op = rng.choice(["flip", "delete", "insert", "utf8", "surrogate", "control", "comma"])
        if op == "flip":
            hb[i] ^= 1 << rng.randrange(8)
        elif op == "delete":
            del hb[i]
        elif op == "insert":
            hb[i:i] = bytes([rng.randrange(256)])
        elif op == "utf8":
            hb[i:i] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc3\xa9"])
        elif op in ("surrogate", "control"):  # inside a tensor's name
            q = bytes(hb).index(b'"' + k.encode() + b'":') + 1 + len(k.encode())
            hb[q:q] = (rng.choice([b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\\u00e9"]) if op == "surrogate"
                       else bytes([rng.randrange(32)]))
        else:
            hb[-1:] = b",}"
        raw = bytes(hb)
    return kind, pack(raw if raw is not None else h, tail, n)


def _structural(rng, kind, h, k):
    e = h[k]
    b, end = e["data_offsets"]
    keys = [x for x in h if x != "__metadata__" and isinstance(h[x], dict) and "data_offsets" in h[x]]
    if kind == "offset_shift":
        e["data_offsets"][rng.randrange(2)] += rng.choice(DELTAS)
    elif kind == "offset_move":
        d = rng.choice(DELTAS)
        e["data_offsets"] = [b + d, end + d]
    elif kind == "offset_reverse":
        e["data_offsets"] = [end, b] if b != end else [end + 1, b]
    elif kind == "offset_copy":
        e["data_offsets"] = list(h[rng.choice(keys)]["data_offsets"])
    elif kind == "offset_swap":  # valid when both tensors have the same size: their data trade places
        o = h[rng.choice(keys)]
        e["data_offsets"], o["data_offsets"] = o["data_offsets"], e["data_offsets"]
    elif kind == "offset_negative":
        e["data_offsets"][rng.randrange(2)] = -rng.choice([1, 4, b or 1, end or 1, 2**63])
    elif kind == "offset_junk":
        e["data_offsets"] = rng.choice([[b], [b, end, end], [float(b), end], [b, float(end)], f"{b},{end}", None,
                                        {"0": b, "1": end}, [str(b), end], [True, end], [b, 2**64 + end], [],
                                        [[b], [end]], b, [b, None]])
    elif kind == "dtype_any":
        e["dtype"] = rng.choice(ALL_DTYPES + BAD_DTYPES)
    elif kind == "dtype_same_bytes":  # another dtype, a shape of the same byte count: often valid
        d = rng.choice(ALL_DTYPES)
        bits = BITS.get(d, 8)
        if ((end - b) * 8) % bits == 0:
            count = (end - b) * 8 // bits
            numel = 1
            for v in e["shape"]:
                numel *= v
            shapes = [[count], [1, count]] + [[a, count // a] for a in (2, 4, 8, 16) if count % a == 0]
            if count == numel:  # the same shape too: e.g. F32 -> I32, which a model can still load
                shapes += [list(e["shape"])] * 3
            e["dtype"], e["shape"] = d, rng.choice(shapes)
    elif kind == "shape_dim":
        shape = e["shape"]
        if shape:
            i = rng.randrange(len(shape))
            v = shape[i]
            shape[i] = rng.choice([v + 1, v - 1, v * 2, v // 2, 0, -v, float(v), True, str(v), None, 2**63,
                                   2**64, 2**64 + v, 2**63 - 1])
        else:
            shape.append(rng.choice([0, 1, 2]))
    elif kind == "reshape":  # same element count: both readers accept, the model may not
        count = 1
        for v in e["shape"]:
            count *= v
        e["shape"] = rng.choice([e["shape"][::-1], [count], e["shape"] + [1], [1] + e["shape"],
                                 [count // 2, 2] if count % 2 == 0 else [count], e["shape"] + [0]])
    elif kind == "shape_junk":
        e["shape"] = rng.choice([None, 16, "16", {}, [[16]], [], [16, [16]], {"0": 16}])
    elif kind == "entry_junk":
        h[k] = rng.choice([None, [], 0, "x", {}, [e["dtype"], e["shape"], e["data_offsets"]], True])
    elif kind == "field_drop":
        del e[rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == "field_extra":
        e[rng.choice(["offsets", "x", "dtype2", ""])] = rng.choice([1, "x", None, [1, 2], {"a": 1}, -0.5, 2**70])
    elif kind == "metadata":
        choice = rng.choice(["drop", None, [], 1, "pt", {"format": 1}, {"format": None}, {"a": {"b": "c"}}, {},
                             {"format": "pt", "x": "y"}, {"format": ["pt"]}])
        if choice == "drop":
            h.pop("__metadata__", None)
        else:
            h["__metadata__"] = choice
    elif kind == "drop_entry":
        del h[k]
    elif kind == "rename":
        new = rng.choice([k + ".x", k.upper(), "", "__metadata__", rng.choice(keys), "\u00e9" + k])
        h[new] = h.pop(k)


def _reference(path):
    """safe_open's view of the file: {key: (dtype, shape, raw bytes)}, or None when it (or any
    get_tensor) refuses. Raw bytes, not tensors: nothing may still map the file when the next case
    rewrites it, and a copy of a BOOL tensor would turn bytes such as 0x3f into 0x01."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            out = {}
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = (t.dtype, tuple(t.shape), raw_bytes(t))
            return out
    except Exception:
        return None


def _ours(path, info):
    """The tensor nb_offload would read: its bytes at info.offset, as info.dtype and info.shape."""
    with open(path, "rb") as fh:
        fh.seek(info.offset)
        blob = fh.read(info.nbytes)
    assert len(blob) == info.nbytes
    dtype = getattr(torch, info.dtype)
    flat = torch.frombuffer(bytearray(blob), dtype=dtype) if blob else torch.empty(0, dtype=dtype)
    return flat.reshape(info.shape)


FUZZ_CASES = 3000
LOAD_SAMPLE = 5


def test_fuzz_reader_against_safetensors(tmp_path, tiny):
    started = time.perf_counter()
    src = os.path.join(tiny, "model.safetensors")
    header, data = split(src)
    with open(src, "rb") as fh:
        original = fh.read()
    folder = copy_model(tiny, tmp_path / "fuzz", weights=False)
    path = os.path.join(folder, "model.safetensors")
    rng = random.Random(20240611)
    counts = Counter()
    kinds = Counter()
    stricter = Counter()  # kinds of mutation only nb_offload refuses
    failures = []
    accepted = {}  # kind -> first file both readers accepted
    for i in range(FUZZ_CASES):
        kind, blob = _mutate(rng, header, data)
        kinds[kind] += 1
        fd = os.open(path, os.O_RDWR | os.O_CREAT)  # rewritten in place: far cheaper than a new file
        try:
            os.pwrite(fd, blob, 0)
            os.ftruncate(fd, len(blob))
        finally:
            os.close(fd)
        ref = _reference(path)
        try:
            ckpt = Checkpoint(folder)
        except CheckpointError as exc:
            assert repr(path) in str(exc) or repr(folder) in str(exc), str(exc)
            ckpt = None
        except Exception as exc:  # anything else escaping is a bug
            failures.append((i, kind, f"raised {type(exc).__name__}: {exc}"))
            continue
        if ref is None:
            counts["safetensors rejects"] += 1
            if ckpt is None:
                counts["both reject"] += 1
            else:
                failures.append((i, kind, f"safetensors rejects, nb_offload accepts {sorted(ckpt.tensors)[:3]}"))
            continue
        counts["safetensors accepts"] += 1
        if ckpt is None:
            counts["only nb_offload rejects"] += 1
            stricter[kind] += 1
            continue
        counts["both accept"] += 1
        if set(ckpt.tensors) != set(ref):
            failures.append((i, kind, f"keys differ: {sorted(set(ckpt.tensors) ^ set(ref))[:3]}"))
            continue
        for key, info in ckpt.tensors.items():
            t = _ours(path, info)
            got = (t.dtype, tuple(t.shape), raw_bytes(t))
            if got != ref[key]:
                failures.append((i, kind, f"tensor {key!r}: {got[:2]} vs {ref[key][:2]}, or other bytes"))
                break
        if blob != original:
            label = kind
            if kind == "dtype_same_bytes" and all(
                    info.shape == tuple(header[key]["shape"]) for key, info in ckpt.tensors.items()):
                label += " (same shape)"  # e.g. F32 -> I32: a model can still load it
            accepted.setdefault(label, blob)
    fuzz_s = time.perf_counter() - started
    print(f"\n{FUZZ_CASES} mutations in {fuzz_s:.1f}s: {dict(counts)}\nby kind: {dict(sorted(kinds.items()))}"
          f"\nonly nb_offload rejects, by kind: {dict(sorted(stricter.items()))}")
    assert not failures, f"{len(failures)} failures, e.g. {failures[:10]}"
    assert counts["both reject"] == counts["safetensors rejects"] > FUZZ_CASES // 2
    assert counts["both accept"] > FUZZ_CASES // 10
    assert set(kinds) == set(KINDS)

    # A few accepted files through the whole load: nb_offload gives transformers' tokens, or a
    # CheckpointError (e.g. a shape the model doesn't have, where transformers raises too).
    loaded = {}
    wanted = ["offset_swap", "dtype_same_bytes (same shape)", "relayout", "reshape", "rename", "pad"]
    sample = [k for k in wanted if k in accepted] + [k for k in sorted(accepted) if k not in wanted]
    for n, kind in enumerate(sample[:LOAD_SAMPLE]):
        one = copy_model(tiny, tmp_path / f"load{n}", weights=False)
        with open(os.path.join(one, "model.safetensors"), "wb") as fh:
            fh.write(accepted[kind])
        try:
            ours = greedy_tokens(one, ours=True)
        except CheckpointError:
            loaded[kind] = "CheckpointError"
            continue
        theirs = greedy_tokens(one, ours=False)  # raises if transformers refuses what nb_offload took
        assert torch.equal(ours, theirs), (kind, ours, theirs)
        loaded[kind] = "same tokens as transformers"
    total_s = time.perf_counter() - started
    print(f"whole loads: {loaded}; {total_s:.1f}s in all")
    assert len(loaded) == min(LOAD_SAMPLE, len(sample))
    assert list(loaded.values()).count("same tokens as transformers") >= 2
