"""The magics, run in a real IPython InteractiveShell (fresh IPYTHONDIR), on tiny models."""

import _thread
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import run_cell as run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Pieces:
    """A stdout that records each write, to see text arrive while a cell runs."""

    def __init__(self, on_write=None):
        self.writes, self.on_write = [], on_write

    def write(self, s):
        if s:
            self.writes.append(s)
            if self.on_write:
                self.on_write(self)
        return len(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.writes)


def capture(sh, code, on_write=None):
    out = Pieces(on_write)
    old = sys.stdout
    sys.stdout = out
    try:
        run(sh, code)
    finally:
        sys.stdout = old
    return out


def test_load_ext_imports_no_torch(tmp_path):
    code = ("import os, sys; os.environ['IPYTHONDIR'] = %r\n"
            "from IPython.core.interactiveshell import InteractiveShell\n"
            "sh = InteractiveShell.instance(); r = sh.run_cell('%%load_ext nb_offload')\n"
            "assert r.success\n"
            "assert 'offload_load' in sh.magics_manager.magics['line']\n"
            "bad = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]\n"
            "assert not bad, bad\n" % str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_load_generate_stream_and_bindings(shell, model_dirs, tmp_path):
    folder = model_dirs("llama")
    # four blocks on disk, more than the three staging slots hold: every step reads some
    run(shell, f"%offload_load {folder} --device cpu --disk {tmp_path} --pin model.layers.*=disk --as tiny")
    llm = shell.user_ns["tiny"]
    assert llm.plan.tier_of("model.layers.3") == "disk"
    out = capture(shell, "%%generate --model tiny --max-new-tokens 12 --as answer\nModel offloading keeps")
    text = shell.user_ns["answer"]
    assert isinstance(text, str) and text
    pieces = [w for w in out.writes if w.strip() and not w.startswith("\n[")]
    assert len(pieces) >= 3, out.writes       # tokens arrived one write at a time, not at the end
    assert "12 tokens in" in out.text and "tok/s" in out.text and "from disk" in out.text
    # the same text as transformers' greedy decode of the same prompt
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(folder)
    ids = llm.tokenizer("Model offloading keeps", return_tensors="pt")
    want = ref.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=llm.tokenizer.pad_token_id)
    assert text == llm.tokenizer.decode(want[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    run(shell, "%offload_unload tiny")
    assert "tiny" not in shell.user_ns


def test_load_takes_where_the_cpu_computes_and_how_it_multiplies(shell, model_dirs):
    """%offload_load passes --compute, --expert-compute and --cpu-kernel on to the API's options, which check
    them (a bad one names the accepted forms) and, on the CPU device, give the kernel to the bf16 linears."""
    folder = model_dirs("llama", dtype="bfloat16", hidden_size=128, intermediate_size=256)
    run(shell, f"%offload_load {folder} --device cpu --compute hybrid --expert-compute 0.5 --cpu-kernel fast "
               "--as opts")
    try:
        llm = shell.user_ns["opts"]
        assert (llm.options.compute, llm.options.expert_compute, llm.options.cpu_kernel) == ("hybrid", 0.5, "fast")
        assert llm.plan.cpu_products in ("fast", "F.linear")
        assert (llm.stats.cpu_fast_linears > 0) == (llm.plan.cpu_products == "fast")
    finally:
        run(shell, "%offload_unload opts")
    from nb_offload import OptionError
    with pytest.raises(OptionError, match="cpu_kernel='quick' is unknown; accepted: 'exact', 'fast'"):
        shell.run_line_magic("offload_load", f"{folder} --device cpu --cpu-kernel quick --as bad")
    assert "bad" not in shell.user_ns


def test_generate_says_when_the_model_planned_again_at_the_cpu_rate_reached(shell, model_dirs, monkeypatch):
    """A generate after which the model planned again at the rate its CPU blocks reached (a CUDA hybrid plan;
    here the re-plan stands in) gets a line saying so, once."""
    run(shell, f"%offload_load {model_dirs('llama')} --device cpu --as replanning")
    llm = shell.user_ns["replanning"]

    def recalibrate():
        if llm.replanned_at is None:
            llm.replanned_at = (46.9, 31.7)
    monkeypatch.setattr(llm, "_recalibrate", recalibrate)
    out = capture(shell, "%%generate --model replanning --max-new-tokens 3\nHello")
    assert "planned again at the rate the CPU's blocks reached decoding, 31.7 GB/s (46.9 measured at load)" \
        in out.text, out.text
    out = capture(shell, "%%generate --model replanning --max-new-tokens 3\nHello")
    assert "planned again" not in out.text
    run(shell, "%offload_unload replanning")


def test_offload_cell_accepts_every_key(shell, model_dirs, tmp_path):
    folder = model_dirs("gpt2")
    run(shell, f"""%%offload cellmodel
model: {folder}
cpu: 1GiB
disk: {tmp_path}
dtype: float32
quant:
context: 128
device: cpu
batch: 1
prefetch: 2
trace: true
hold_spare: false
split_blocks: true
drop_page_cache: true
read_threads: 3
pin:
  transformer.h.2-3: disk
  lm_head: cpu
""")
    llm = shell.user_ns["cellmodel"]
    assert llm.plan.context == 128 and llm.plan.tier_of("transformer.h.3") == "disk"
    assert llm.hold_spare is False and llm.plan.split_blocks
    assert llm.uncached_disk_reads and llm.options.read_threads == 3
    assert llm.plan["lm_head"].pinned
    run(shell, "%offload_unload cellmodel")
    run(shell, f"%%offload\nmodel: {folder}\ndevice: cpu\nas: named_by_key\n")
    assert "named_by_key" in shell.user_ns
    run(shell, "%offload_unload named_by_key")


def test_offload_cell_unknown_key_binds_nothing(shell, model_dirs):
    from nb_offload import OffloadError
    with pytest.raises(OffloadError) as info:
        run(shell, f"%%offload oops\nmodel: {model_dirs('llama')}\ngpus: 4GiB\n")
    assert "unknown key(s) ['gpus']" in str(info.value) and "accepted keys: model, gpu" in str(info.value)
    assert "oops" not in shell.user_ns


def test_missing_path_fails_the_cell_briefly(shell, tmp_path):
    from nb_offload import CheckpointError
    missing = tmp_path / "no-such-model"
    result = shell.run_cell(f"%offload_load {missing} --as ghost", store_history=False)
    assert isinstance(result.error_in_exec, CheckpointError)
    assert "ghost" not in shell.user_ns
    assert result.error_in_exec._render_traceback_() == [f"CheckpointError: {result.error_in_exec}"]


def test_pins_by_magic_and_model_choice(shell, model_dirs, tmp_path):
    folder = model_dirs("llama")
    run(shell, f"%offload_load {folder} --device cpu --disk {tmp_path / 'a'} --as first")
    run(shell, f"%offload_load {folder} --device cpu --disk {tmp_path / 'b'} --as second")
    run(shell, "%offload_pin model.layers.1 disk")          # no name: the most recent
    assert shell.user_ns["second"].plan.tier_of("model.layers.1") == "disk"
    assert shell.user_ns["first"].plan.tier_of("model.layers.1") == "cpu"
    out = capture(shell, "%offload_pin first model.layers.0-1 disk")
    assert shell.user_ns["first"].plan.tier_of("model.layers.0") == "disk"
    assert "first: pinned model.layers.0-1 to disk; moved model.layers.0-1 cpu -> disk." in out.text
    run(shell, "%offload_unpin first model.layers.0-1")
    assert not shell.user_ns["first"].plan["model.layers.0"].pinned
    from nb_offload import PinError
    with pytest.raises(PinError):
        run(shell, "%offload_pin first model.layers.0 tape")
    out = capture(shell, "%offload_list")
    assert "first:" in out.text and "second:" in out.text
    out = capture(shell, "%%generate --model first --max-new-tokens 3\nhello")
    assert "3 tokens in" in out.text
    run(shell, "%offload_unload --all")
    assert "first" not in shell.user_ns and "second" not in shell.user_ns


def test_interrupt_during_generate_keeps_partial_text_and_model(shell, model_dirs, tmp_path):
    import torch
    from transformers import DynamicCache
    folder = model_dirs("llama")
    run(shell, f"%offload_load {folder} --device cpu --disk {tmp_path} --pin model.layers.1-3=disk --as intr")
    llm = shell.user_ns["intr"]
    fired = threading.Event()

    def interrupt_after_a_few(out):
        n = len(out.writes)
        # Lands wherever the main thread is; again every 25 pieces, as one that lands inside a
        # finalizer is reported as unraisable and lost, as it would be in a kernel.
        if n == 4 or (fired.is_set() and n % 25 == 0):
            fired.set()
            threading.Timer(0.01, _thread.interrupt_main).start()
        elif fired.is_set():
            time.sleep(0.002)     # let the timer thread in, on a busy machine too (a generate is fast)

    # interrupt_main() does nothing while SIGINT is ignored or left to the OS; something earlier in
    # a run (seen once, on a fresh machine's first run) may have left it so. A kernel's handler is
    # Python's own, as here.
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = capture(shell, "%%generate --max-new-tokens 400 --as partial\nModel offloading keeps",
                      on_write=interrupt_after_a_few)
    finally:
        signal.signal(signal.SIGINT, before)
    assert fired.is_set() and "interrupted: partial text kept" in out.text, f"SIGINT handler was {before!r}"
    partial = shell.user_ns["partial"]
    assert partial and len(llm.tokenizer(partial)["input_ids"]) < 400
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, DynamicCache)]   # no KV cache left behind
    ids = torch.tensor([[5, 17, 42, 7]])
    from transformers import AutoModelForCausalLM
    want = AutoModelForCausalLM.from_pretrained(folder).generate(ids, max_new_tokens=8, min_new_tokens=8,
                                                                 do_sample=False)
    assert torch.equal(llm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False), want)
    run(shell, "%offload_unload intr")


def test_config_defaults_and_timeline_export(shell, model_dirs, tmp_path):
    folder = model_dirs("llama")
    run(shell, "%config OffloadMagics.max_new_tokens = 5")
    run(shell, f"%config OffloadMagics.default_disk = '{tmp_path / 'd'}'")
    try:
        run(shell, f"%offload_load {folder} --device cpu --pin model.layers.3=disk --as cfg")
        assert shell.user_ns["cfg"].plan.tier_of("model.layers.3") == "disk"
        out = capture(shell, "%%generate\nhi")
        assert "5 tokens in" in out.text
        export = tmp_path / "trace.json"
        out = capture(shell, f"%offload_timeline cfg --export {export}")
        assert export.exists() and "events" in out.text
        out = capture(shell, "%offload_status cfg")
        assert "5 tokens" in out.text
        out = capture(shell, f"%offload_plan {folder} --gpu 1GiB --cpu 1GiB")
        assert "predicted decode" in out.text
    finally:
        run(shell, "%config OffloadMagics.max_new_tokens = 128")
        run(shell, "%config OffloadMagics.default_disk = None")
        shell.run_cell("%offload_unload --all", store_history=False)


def test_rich_output_in_jupyter(shell, model_dirs):
    from IPython.utils.capture import capture_output
    with capture_output() as cap:
        run(shell, f"%offload_load {model_dirs('llama')} --device cpu --as rich")
    data = cap.outputs[0].data
    assert "<table>" in data["text/html"] and "model.layers.0-3" in data["text/plain"]
    run(shell, "%offload_unload rich")


def test_plain_text_in_terminal_ipython(model_dirs, tmp_path):
    script = tmp_path / "cells.ipy"
    script.write_text(f"%load_ext nb_offload\n%offload_load {model_dirs('llama')} --device cpu --as t\n"
                      "%offload_status t\n")
    env = dict(os.environ, IPYTHONDIR=str(tmp_path / "ipy"), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", str(script)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "model.layers.0-3" in out.stdout and "<table>" not in out.stdout
    assert "0 tokens" in out.stdout


def test_unload_ext_frees_models(tmp_path, model_dirs):
    code = (f"import os; os.environ['IPYTHONDIR'] = {str(tmp_path)!r}\n"
            "from IPython.core.interactiveshell import InteractiveShell\n"
            "sh = InteractiveShell.instance(); sh.run_cell('%load_ext nb_offload')\n"
            f"r = sh.run_cell('%offload_load {model_dirs('llama')} --device cpu --as m'); assert r.success\n"
            "m = sh.user_ns['m']\n"
            "r = sh.run_cell('%unload_ext nb_offload'); assert r.success\n"
            "assert 'm' not in sh.user_ns and m._engine is None\n"
            "assert 'offload_load' not in sh.magics_manager.magics['line']\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("name,kind", [
    ("offload_load", "line"), ("offload", "cell"), ("generate", "cell"), ("offload_pin", "line"),
    ("offload_unpin", "line"), ("offload_plan", "line"), ("offload_status", "line"),
    ("offload_timeline", "line"), ("offload_unload", "line"), ("offload_list", "line"),
])
def test_help_has_usage_options_and_example(shell, name, kind):
    fn = shell.magics_manager.magics[kind][name]
    doc = fn.__doc__
    assert "Usage:" in doc and "Example" in doc
    for option in ("--gpu", "--cpu", "--disk", "--pin", "--as") if name == "offload_load" else ():
        assert option in doc
    if name == "generate":
        for option in ("--max-new-tokens", "--temperature", "--top-p", "--seed", "--chat", "--system",
                       "--no-stream", "--as"):
            assert option in doc


def test_dashboard_in_a_jupyter_kernel(shell, model_dirs, monkeypatch):
    """In a kernel, %offload_load and %offload_status show the dashboard widget with its static copy."""
    pytest.importorskip("anywidget")
    from IPython.utils.capture import capture_output
    magics = shell._nb_offload_magics
    monkeypatch.setattr(type(magics), "_in_kernel", lambda self: True)
    with capture_output() as cap:
        run(shell, f"%offload_load {model_dirs('llama')} --device cpu --as board")
        run(shell, "%offload_status board")
    bundles = [o.data for o in cap.outputs]
    assert len(bundles) == 2
    for data in bundles:
        assert "application/vnd.jupyter.widget-view+json" in data
        assert "<svg" in data["text/html"]                      # shows without a kernel, too
    run(shell, "%config OffloadMagics.dashboard = False")
    with capture_output() as cap:
        run(shell, "%offload_status board")
    assert "<table>" in cap.outputs[0].data["text/html"]
    run(shell, "%config OffloadMagics.dashboard = True")
    run(shell, "%offload_unload board")


def test_quantization_in_the_magics(shell, model_dirs, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    folder = model_dirs("llama", dtype="bfloat16")
    run(shell, f"%offload_load {folder} --device cpu --quant int8 --pin model.layers.0=cpu:bf16 --as q8")
    llm = shell.user_ns["q8"]
    assert [e.fmt for e in llm.plan if e.kind == "block"] == ["bf16", "int8", "int8", "int8"]
    run(shell, "%offload_unload q8")
    run(shell, f"%%offload q4\nmodel: {folder}\ndevice: cpu\nquant: {{format: nf4, double_quant: true}}\n"
               "pin:\n  model.layers.3: bf16\n")
    llm = shell.user_ns["q4"]
    assert llm.options.quant.double_quant and llm.plan["model.layers.3"].fmt == "bf16"
    run(shell, "%offload_unload q4")
    capsys.readouterr()
    run(shell, f"%offload_plan {folder} --gpu 1GiB --cpu 1GiB --quant fp4")
    assert " fp4 " in capsys.readouterr().out
    with pytest.raises(Exception, match=r"--quant 'nf5' is unknown"):
        run(shell, f"%offload_plan {folder} --gpu 1GiB --quant nf5")
