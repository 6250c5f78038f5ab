"""Plain helpers and constants the test modules share (fixtures live in conftest.py).

A module of its own, so no test module imports another or conftest. It is importable as
``helpers`` from tests/ and tests/gpu/: pytest's default "prepend" import mode puts tests/ on
sys.path when it loads tests/conftest.py, which it does for any test under tests/.
torch and transformers are imported inside the helpers, so modules that need neither stay light.
"""

import nb_offload

ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "opt", "mixtral", "qwen2_moe"]
PROMPT = [[5, 17, 42, 7, 99, 3, 64, 12]]


def reference(folder, device="cpu", max_new_tokens=10):
    """Greedy tokens and prompt logits of the plain transformers model."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    with torch.inference_mode():
        return run_offloaded(model, max_new_tokens, device=device)


def three_tier_pins(plan):
    """Pins putting the first third of the blocks on the GPU, the next third in host memory, the rest on disk."""
    names = [e.name for e in blocks(plan)]
    third = max(1, len(names) // 3)
    pins = {n: "gpu" for n in names[:third]}
    pins.update({n: "cpu" for n in names[third:2 * third]})
    pins.update({n: "disk" for n in names[2 * third:]})
    return pins


def bnb_config(fmt, dtype="bfloat16", double_quant=False):
    """The BitsAndBytesConfig that nb_offload's ``quant=fmt`` stands for (compute in the load dtype)."""
    import torch
    from transformers import BitsAndBytesConfig
    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, dtype))


def quant_reference(folder, config, device="cpu", dtype="bfloat16", max_new_tokens=10):
    """Greedy tokens and prompt logits of transformers' own bitsandbytes model, loaded with
    ``from_pretrained(quantization_config=config)`` entirely on ``device`` (quantized there)."""
    import torch
    from transformers import AutoModelForCausalLM
    extra = {} if config is None else {"quantization_config": config}     # None: a checkpoint saved quantized
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), device_map=device,
                                                 **extra).eval()
    with torch.inference_mode():
        return run_offloaded(model, max_new_tokens, device=device)


def run_offloaded(llm, max_new_tokens=10, device="cpu"):
    """Greedy tokens and prompt logits of ``llm`` (an OffloadedModel, or a plain model on ``device``)."""
    import torch
    ids = torch.tensor(PROMPT, device=device)
    logits = llm(ids).logits.float().cpu()
    tokens = llm.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                          do_sample=False).cpu()
    return tokens, logits


def greedy(llm, n=10, **kw):
    import torch
    ids = torch.tensor(PROMPT)
    return llm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw).cpu()


def staging_bytes(folder, prefetch, units=None):
    """What streaming blocks costs the compute device with split_blocks=True: slots for the largest
    piece, plus every block's leftovers kept resident while it streams (``units``: the folder's, where
    the caller has them)."""
    from nb_offload.loader import Inspection
    units = [u for u in (units or Inspection(folder).units) if u.kind == "block"]
    return (prefetch + 1) * max(u.stream_nbytes for u in units) + sum(u.rest_nbytes for u in units)


def host_staging(folder, read_ahead=2):
    """Page-locked disk staging with blocks split (split_blocks=True): a buffer per piece of
    ``read_ahead`` blocks."""
    from nb_offload.loader import Inspection
    units = [u for u in Inspection(folder).units if u.kind == "block"]
    return read_ahead * max(len(u.pieces) for u in units) * max(u.stream_nbytes for u in units)


def blocks(plan):
    return [e for e in plan if e.kind == "block"]


def tight_cpu_budget(folder, disk, keep_blocks=1):
    """A cpu budget that fits the resident minimum plus ``keep_blocks`` blocks: the rest go to disk
    (load with split_blocks=True: the budget counts slots for pieces)."""
    p = nb_offload.plan(folder, device="cpu", cpu="64GiB", disk=disk)
    bl = blocks(p)
    tops = sum(e.bytes for e in p if e.kind == "top")
    from nb_offload.loader import Inspection
    units = Inspection(folder).units
    slots = staging_bytes(folder, p.prefetch, units)
    fixed = sum(v for k, v in p.reserved.items() if k != "staging_slots")
    # a block kept resident needs no leftovers apart (a MoE block's are all but its routed experts)
    kept_rest = keep_blocks * max((u.rest_nbytes for u in units), default=0)
    # below what the whole model takes, which the plan would keep whole (a tiny MoE model's pieces' leftovers
    # and slots can take more than its blocks)
    everything = fixed + sum(e.bytes for e in p)
    return min(fixed + tops + slots - kept_rest + keep_blocks * bl[0].bytes + 1024, everything - 1)


def load_tight(folder, disk, **kw):
    """A CPU load under tight_cpu_budget: one block resident, the rest streamed from disk."""
    return nb_offload.load(folder, device="cpu", cpu=tight_cpu_budget(folder, disk), disk=disk,
                           progress=False, split_blocks=True, **kw)


def run_cell(sh, code):
    """Run a cell; errors are raised, not swallowed."""
    result = sh.run_cell(code, store_history=False)
    if result.error_before_exec:
        raise result.error_before_exec
    if result.error_in_exec:
        raise result.error_in_exec
    return result


def pin_while_generating(llm, pattern, tier, max_new_tokens=24):
    """Generate greedily while another thread pins ``pattern`` to ``tier``, started once the first
    forward pass runs (each pass is slowed a little, so the pin is asked for inside the generate).
    Returns the generated tokens (on the CPU) and whether the pin ended after the generate's last token."""
    import threading
    import time

    import torch
    started, times = threading.Event(), {}

    class LastToken:                    # notes the end of the generate from inside it
        def put(self, value):
            times["generated"] = time.perf_counter()

        def end(self):
            pass

    def slow(module, args):
        started.set()
        time.sleep(0.002)              # keep each pass long enough for the pin to land inside it

    def repin():
        started.wait()
        llm.pin(pattern, tier)
        times["pinned"] = time.perf_counter()
    hook = llm.model.get_submodule("model.layers.1").register_forward_pre_hook(slow)
    thread = threading.Thread(target=repin)
    thread.start()
    try:
        got = llm.generate(torch.tensor(PROMPT), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           do_sample=False, streamer=LastToken()).cpu()
    finally:
        thread.join()
        hook.remove()
    return got, times["pinned"] > times["generated"]


class InterruptAt:
    """A generate streamer that raises KeyboardInterrupt (a notebook's interrupt) at its ``n``-th call:
    the prompt, then one a token."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def put(self, value):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt

    def end(self):
        pass


def all_on_disk(folder, disk, pins=None, **options):
    """The model loaded on the CPU device with every block streamed from disk (and ``pins`` besides)."""
    import nb_offload
    return nb_offload.load(folder, device="cpu", disk=disk, pins={"model.layers.*": "disk", **(pins or {})},
                           progress=False, **options)


def batch_of_four():
    import torch
    ids = torch.tensor(PROMPT * 4)
    ids[1:, 0] = torch.tensor([9, 11, 13])
    return ids


# Connections beyond this machine that a test tried (conftest fails the test; a library may catch the refusal).
REACHED = []


def refuse_network():
    """Refuse every socket connection to anything but this machine, for the whole test session, whatever a
    library does with the offline settings."""
    import socket
    if getattr(socket.socket.connect, "refuses_network", False):
        return

    def local(sock, address) -> bool:
        import ipaddress
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return True         # Unix sockets and the like
        try:
            return ipaddress.ip_address(address[0]).is_loopback
        except ValueError:
            return address[0] == "localhost"

    def guarded(real):
        def connect(self, address):
            if not local(self, address):
                REACHED.append(address)
                raise ConnectionRefusedError(f"tests may not reach the network ({address!r})")
            return real(self, address)
        connect.refuses_network = True
        return connect
    socket.socket.connect = guarded(socket.socket.connect)
    socket.socket.connect_ex = guarded(socket.socket.connect_ex)
