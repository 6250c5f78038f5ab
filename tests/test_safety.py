"""Untrusted folders and options: the offload cache checks itself, offload folders must be private,
opt-ins take the bool True only, a failed load removes only what it wrote, re-plans wait for runs."""

import glob
import os
import shutil
import stat
import threading
import time
import warnings

import pytest
import torch
from helpers import PROMPT, pin_while_generating

import nb_offload
from nb_offload import DiskTierError, OffloadError, OptionError

IDS = torch.tensor(PROMPT)


def load(folder, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return nb_offload.load(folder, **kw)


def greedy(llm, n=8):
    return llm.generate(IDS, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def reference_tokens(folder, dtype=torch.float32, n=8):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.inference_mode():
        return model.generate(IDS, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def cached(folder, disk, **kw):
    """A load whose disk units go through the offload cache (bf16 from a float32 checkpoint)."""
    return load(folder, disk=disk, dtype="bfloat16", pins={"model.layers.*": "disk"}, **kw)


def cache_files(disk):
    return sorted(glob.glob(os.path.join(disk, "nb_offload-*", "*.bin")))


def copy_model(model_dirs, tmp_path, arch="llama"):
    dest = tmp_path / f"{arch}-copy"
    shutil.copytree(model_dirs(arch), dest)
    return str(dest)


# -- security: opt-ins ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trust_remote_code", "allow_pickle"])
@pytest.mark.parametrize("value", ["False", "no", 1, None])
def test_opt_ins_take_the_bool_true_only(model_dirs, name, value):
    for call in (lambda: load(model_dirs("llama"), **{name: value}),
                 lambda: nb_offload.plan(model_dirs("llama"), device="cpu", **{name: value})):
        with pytest.raises(OptionError, match=f"{name}={value!r} is not a bool; only True opts in"):
            call()


CUSTOM_TOKENIZER = '''
from transformers import PreTrainedTokenizerFast


class MarkedTokenizer(PreTrainedTokenizerFast):
    """A tokenizer whose code lives in the model folder."""
    marked = True
'''


def test_tokenizer_gets_the_remote_code_decision(model_dirs, tmp_path, monkeypatch):
    """A tokenizer with code of its own loads with trust_remote_code=True and is skipped with False;
    neither asks on stdin (in a kernel that prompt hangs the cell)."""
    import json
    folder = copy_model(model_dirs, tmp_path)
    (tmp_path / "llama-copy" / "marked_tok.py").write_text(CUSTOM_TOKENIZER)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["tokenizer_class"] = "MarkedTokenizer"
    cfg["auto_map"] = {"AutoTokenizer": [None, "marked_tok.MarkedTokenizer"]}
    json.dump(cfg, open(cfg_path, "w"))

    def no_prompt(*args):
        raise AssertionError(f"asked on stdin: {args}")
    monkeypatch.setattr("builtins.input", no_prompt)
    llm = load(folder, trust_remote_code=True)
    assert type(llm.tokenizer).__name__ == "MarkedTokenizer" and llm.tokenizer.marked
    llm.unload()
    with pytest.warns(RuntimeWarning, match="tokenizer .* was not loaded"):
        llm = load(folder)
    assert llm.tokenizer is None
    assert torch.equal(greedy(llm), reference_tokens(folder))
    llm.unload()


# -- security: offload folders ------------------------------------------------------------------
def test_offload_folder_writable_by_others_is_refused(model_dirs, tmp_path):
    disk = tmp_path / "shared"
    disk.mkdir()
    os.chmod(disk, 0o777)
    with pytest.raises(DiskTierError) as info:
        cached(model_dirs("llama"), disk)
    msg = str(info.value)
    assert str(disk) in msg and "0777" in msg and "chmod go-w" in msg
    assert os.listdir(disk) == []


def test_offload_folder_of_another_user_is_refused(model_dirs, tmp_path, monkeypatch):
    disk = tmp_path / "theirs"
    disk.mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(disk, 65534, 65534)          # nobody
    else:
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 1)
    with pytest.raises(DiskTierError, match="not to you") as info:
        cached(model_dirs("llama"), disk)
    assert str(disk) in str(info.value) and "0755" in str(info.value)


def test_link_planted_at_a_cache_file_is_never_followed(model_dirs, tmp_path):
    """A link at a unit's file name (or at the old, predictable temporary name) would make a load
    read another file as weights, or overwrite a file outside the folder."""
    folder = model_dirs("llama")
    disk = tmp_path / "offload"
    llm = cached(folder, disk)
    want = greedy(llm)
    files = cache_files(disk)
    llm.unload()
    victim = tmp_path / "victim.bin"
    payload = os.urandom(os.path.getsize(files[0]))
    victim.write_bytes(payload)
    os.unlink(files[0])
    os.symlink(victim, files[0])
    for pid in range(os.getpid() - 2, os.getpid() + 3):      # the temporary name the old code used
        os.symlink(victim, f"{files[1]}.tmp-{pid}")
    os.unlink(files[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = cached(folder, disk)
    assert any("a link" in str(w.message) for w in caught)
    assert victim.read_bytes() == payload
    assert not os.path.islink(files[0]) and os.path.isfile(files[1])
    assert torch.equal(greedy(llm), want)
    llm.unload()


def test_cache_folder_that_is_a_link_is_refused(model_dirs, tmp_path):
    folder = model_dirs("llama")
    disk = tmp_path / "offload"
    cached(folder, disk).unload()
    (cache_dir,) = glob.glob(str(disk / "nb_offload-*"))
    elsewhere = tmp_path / "elsewhere"
    os.rename(cache_dir, elsewhere)
    os.symlink(elsewhere, cache_dir)
    with pytest.raises(DiskTierError, match="is not a folder"):
        cached(folder, disk)


# -- the offload cache verifies itself ------------------------------------------------------------
def test_cache_file_overwritten_with_same_size_bytes_is_detected(model_dirs, tmp_path):
    folder = model_dirs("llama")
    disk = tmp_path / "offload"
    llm = cached(folder, disk)
    want = greedy(llm)
    llm.unload()
    assert torch.equal(want, reference_tokens(folder, torch.bfloat16))
    for path in cache_files(disk):
        with open(path, "r+b") as fh:          # same size, other bytes at the end of the weights
            fh.seek(-4096, os.SEEK_END)
            fh.write(os.urandom(4096))
    with pytest.warns(RuntimeWarning, match="don't match their SHA-256"):
        llm = cached(folder, disk)
    cache = llm._storage.cache
    assert cache.verified_bytes == cache.stamped_bytes == 0      # every file was rewritten, none trusted
    assert torch.equal(greedy(llm), want)
    disk_bytes = sum(e.bytes for e in llm.plan if e.tier == "disk")
    llm.unload()
    llm = cached(folder, disk)          # unchanged since written: trusted on their stamps, not read
    assert (llm._storage.cache.stamped_bytes, llm._storage.cache.verified_bytes) == (disk_bytes, 0)
    assert torch.equal(greedy(llm), want)
    llm.unload()
    (stamps,) = glob.glob(str(disk / "nb_offload-*" / "verified.json"))
    with open(stamps, "w") as fh:       # a damaged stamp file costs a hash, never trust
        fh.write('{"fingerprint": 1, "files": [')
    llm = cached(folder, disk)
    assert (llm._storage.cache.stamped_bytes, llm._storage.cache.verified_bytes) == (0, disk_bytes)
    assert torch.equal(greedy(llm), want)
    llm.unload()


def test_file_changed_with_its_times_restored_is_hashed_again(model_dirs, tmp_path):
    """The stamps can't hide a change: writing a file moves its change time, which can't be set back."""
    folder = model_dirs("llama")
    disk = tmp_path / "offload"
    cached(folder, disk).unload()
    path = cache_files(disk)[0]
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(-64, os.SEEK_END)
        fh.write(os.urandom(64))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(RuntimeWarning, match="don't match their SHA-256"):
        llm = cached(folder, disk)
    assert torch.equal(greedy(llm), reference_tokens(folder, torch.bfloat16))
    llm.unload()


def test_checkpoint_changed_with_its_mtime_kept_gets_a_new_cache(model_dirs, tmp_path):
    from nb_offload.tiny import make_tiny_model
    folder = copy_model(model_dirs, tmp_path)
    disk = tmp_path / "offload"
    cached(folder, disk).unload()
    weights = os.path.join(folder, "model.safetensors")
    before = os.stat(weights)
    other = make_tiny_model(str(tmp_path / "other"), "llama", seed=1, tokenizer=False)
    shutil.copyfile(os.path.join(other, "model.safetensors"), weights)      # same size, other weights
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(weights)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    llm = cached(folder, disk)
    assert torch.equal(greedy(llm), reference_tokens(folder, torch.bfloat16))
    llm.unload()


# -- clean-up -------------------------------------------------------------------------------------
def test_interrupt_while_writing_the_cache_leaves_nothing(model_dirs, tmp_path, monkeypatch):
    """Into a cache folder an earlier load made: the interrupted load removes its temporary file
    and what it wrote, and leaves the earlier load's files."""
    folder = model_dirs("llama")
    disk = tmp_path / "offload"
    load(folder, disk=disk, dtype="bfloat16", pins={"model.layers.0-1": "disk"}).unload()
    earlier = cache_files(disk)
    real = os.fsync
    calls = {"n": 0}

    def interrupted_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(fd)
    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        cached(folder, disk)
    assert calls["n"] == 2
    (cache_dir,) = glob.glob(str(disk / "nb_offload-*"))
    assert sorted(n for n in os.listdir(cache_dir) if n not in (".lock", "verified.json")) == \
        [os.path.basename(p) for p in earlier]


def test_interrupted_load_keeps_what_another_load_uses(model_dirs, tmp_path, monkeypatch):
    """Load A creates the cache folder; while it writes, load B (another process, as far as the
    folder lock can tell) loads from the same folder; then A is interrupted. A's clean-up must not
    pull the files from under B."""
    folder = model_dirs("llama")
    disk = tmp_path / "offload"
    real = os.fsync
    state = {"n": 0, "b": None}

    def fsync(fd):
        if state["b"] is None:
            state["n"] += 1
            if state["n"] == 2:
                state["b"] = cached(folder, disk)       # B loads while A is half-way
                raise KeyboardInterrupt                 # then A is interrupted
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        cached(folder, disk)
    b = state["b"]
    assert torch.equal(greedy(b), reference_tokens(folder, torch.bfloat16))
    assert not glob.glob(str(disk / "*" / "*.tmp-*")) and not glob.glob(str(disk / "*" / ".*.tmp-*"))
    b.unload()


def test_no_cache_folder_when_every_disk_unit_reads_the_checkpoint(model_dirs, tmp_path):
    disk = tmp_path / "offload"
    llm = load(model_dirs("llama"), disk=disk, pins={"model.layers.*": "disk"})
    assert all(e.tier == "disk" for e in llm.plan if e.kind == "block")
    assert torch.equal(greedy(llm), reference_tokens(model_dirs("llama")))
    llm.unload()
    assert not disk.exists()


# -- files changed after load ---------------------------------------------------------------------
@pytest.mark.parametrize("what", ["cache file", "checkpoint"])
def test_offload_file_removed_after_load_is_a_disk_tier_error(model_dirs, tmp_path, what):
    folder = copy_model(model_dirs, tmp_path)
    disk = tmp_path / "offload"
    llm = cached(folder, disk) if what == "cache file" else load(folder, disk=disk, pins={"model.layers.*": "disk"})
    want = greedy(llm)
    path = cache_files(disk)[0] if what == "cache file" else os.path.join(folder, "model.safetensors")
    aside = str(tmp_path / "aside")
    os.rename(path, aside)
    with pytest.raises(DiskTierError) as info:
        greedy(llm)
    assert repr(os.path.realpath(path)) in str(info.value) or repr(path) in str(info.value)
    os.symlink(aside, path)                   # a link there is refused too (never followed)
    with pytest.raises(DiskTierError):
        greedy(llm)
    os.unlink(path)
    os.rename(aside, path)                    # put back: the model works again
    assert torch.equal(greedy(llm), want)
    llm.unload()


def test_calling_the_model_after_unload_is_an_offload_error(model_dirs):
    llm = load(model_dirs("llama"))
    llm.unload()
    for call in (lambda: llm.model(IDS), lambda: llm(IDS), lambda: llm.model.generate(IDS, max_new_tokens=2)):
        with pytest.raises(OffloadError, match="was unloaded"):
            call()


# -- re-plans wait for runs -----------------------------------------------------------------------
def test_pin_from_another_thread_waits_for_the_generate(model_dirs, tmp_path):
    folder = model_dirs("llama")
    llm = load(folder, disk=tmp_path / "offload", pins={"model.layers.2-3": "disk"}, hold_spare=False)
    want = greedy(llm, 24)
    got, pin_waited = pin_while_generating(llm, "model.layers.0-1", "disk")
    assert torch.equal(got, want)
    assert pin_waited                                   # the pin waited for the generate
    assert llm.plan.tier_of("model.layers.0") == "disk"
    assert torch.equal(greedy(llm, 24), want)
    llm.unload()


def test_replan_from_inside_a_run_is_refused(model_dirs):
    llm = load(model_dirs("llama"))
    want = greedy(llm)

    class PinningStreamer:
        def put(self, value):
            llm.pin("model.layers.0", "cpu")

        def end(self):
            pass
    with pytest.raises(OffloadError, match="can't re-pin while this model is running"):
        llm.generate(IDS, max_new_tokens=4, streamer=PinningStreamer())
    assert torch.equal(greedy(llm), want)          # and the model carries on
    llm.unload()


def test_unload_from_another_thread_waits(model_dirs):
    llm = load(model_dirs("llama"))
    started = threading.Event()

    def slow(module, args):
        started.set()
        time.sleep(0.002)
    hook = llm.model.get_submodule("model.layers.0").register_forward_pre_hook(slow)
    thread = threading.Thread(target=lambda: (started.wait(), llm.unload()))
    thread.start()
    out = greedy(llm, 16)
    thread.join()
    hook.remove()
    assert out.shape[1] == IDS.shape[1] + 16
    with pytest.raises(OffloadError, match="was unloaded"):
        greedy(llm)


def test_folder_modes(model_dirs, tmp_path):
    disk = tmp_path / "a" / "b"
    cached(model_dirs("llama"), disk).unload()
    for d in (tmp_path / "a", disk, *map(type(disk), glob.glob(str(disk / "nb_offload-*")))):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for f in cache_files(disk):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600


def test_the_tests_cannot_reach_the_network():
    """conftest refuses connections beyond this machine and fails the test that tries, even where a library
    catches the refusal; connections to this machine go through."""
    import socket

    from helpers import REACHED
    with socket.socket() as out, pytest.raises(ConnectionRefusedError, match="may not reach the network"):
        out.connect(("192.0.2.1", 80))         # TEST-NET-1: never routed
    assert REACHED.pop() == ("192.0.2.1", 80)     # taken back, so this test itself passes
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.connect(server.getsockname())
