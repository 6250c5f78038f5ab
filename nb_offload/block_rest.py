"""What a decoder block's batch-1 forward costs the CPU besides its products: the norms, the rotary embedding,
the KV-cache update and the attention over it, the activation, the residual adds, and torch's dispatch of each.

The CPU's rate a hybrid plan splits at (hybrid.rates_by_tokens) is measured on a block's products alone, and
the blocks read slower while decoding: on the H200 host the load measured 44.9 to 50.9 GB/s and the blocks
reached 35.6 to 41.4 (benchmarks/RESULTS.md, s19-s21), so a plan made at load was planned again after the
first generate, and the plan a dry run predicts (``%offload_plan``) read 22 % fast at 4 GiB. The rest of the
forward doesn't grow with the weights' bytes: on the CPU machine (2 cores) it took 1.4 ms of a LLaMA-7B block's
16-21 ms (benchmarks/RESULTS.md, s24), and with more threads the products shrink faster than it does.

So ``seconds`` builds a few of the model's blocks from its config (its own classes, the attention the load
uses, weights of a constant in host memory), runs decode steps through them as a CPU block runs (torch's
threads set, a static cache of the shortest bucket, the link copying beside on CUDA), and times each block's
forward and, inside it, each of its linears: the rest is the difference, the median over the steps. The
loader adds it to each CPU block's time (``with_rest``). Where the blocks can't be built or run this way (a
config this doesn't know how to shorten, blocks whose weights aren't all linears', blocks past MOST_BYTES),
there is no measure and the products' rate stands.
"""

from __future__ import annotations

import copy
import time
import warnings

# The largest block measured (a 70B block is 1.7 GB: its rest is a smaller share of its time, and the probe
# would hold it in host memory for the moment it runs).
MOST_BYTES = 1 << 30
# Blocks built: their weights share one block's memory (the rest, not the products, is what is timed), and
# each step gives a sample of each.
BLOCKS = 3
# The probe holds one block's bytes for the moment it runs, outside the cpu budget (as the products' probe holds
# its copies): it runs only where the host has this many blocks' bytes available.
ROOM_BLOCKS = 4
PROMPT = 16             # the tokens in the cache before the timed decode steps


def seconds(torch, config, dtype, block_bytes: int, threads: int, *, attn_implementation=None, kernel=None,
            beside=None, repeats: int = 5, trust_remote_code: bool = False) -> float | None:
    """The seconds a decoder block's batch-1 decode forward takes on the CPU besides its linears' products,
    measured on blocks built from ``config`` in ``dtype`` (each ``block_bytes``) at ``threads`` torch threads,
    their linears multiplied by ``kernel`` (a cpu_kernel.KernelLinears policy; F.linear where None); the
    median of ``repeats`` steps after two to warm up. ``beside``: a hybrid.BusyLink copying during each step.
    ``trust_remote_code``: the load's (a model whose code comes with its checkpoint is built only where that is
    True, as the load builds it). None where it can't be measured (module docstring)."""
    if block_bytes <= 0 or block_bytes > MOST_BYTES:
        return None
    from .budget import host_memory
    if host_memory()[1] < ROOM_BLOCKS * block_bytes:   # the blocks' bytes aren't in the cpu budget: only with room
        return None
    try:
        with warnings.catch_warnings():     # the shortened config's, not the user's model's (process-wide while
            warnings.simplefilter("ignore")     # it runs, a fraction of a second at load)
            model, blocks = _built(torch, config, dtype, BLOCKS, attn_implementation, trust_remote_code)
            if blocks is None:
                return None
            return _timed(torch, model, blocks, threads, kernel, beside, repeats)
    except Exception:       # a model this can't run so: the products' rate stands (the plan says nothing more)
        return None


def with_rest(gbps: float, block_bytes: int, rest: float | None) -> float:
    """The rate a block of ``block_bytes`` computes at whose products read at ``gbps`` and whose forward takes
    ``rest`` seconds besides (None: the products' rate)."""
    if not rest or gbps <= 0 or block_bytes <= 0:
        return gbps
    return block_bytes / (block_bytes / (gbps * 1e9) + rest) / 1e9


def _built(torch, config, dtype, count: int, attn_implementation, trust_remote_code: bool):
    """(the model of ``count`` blocks, its blocks) with every parameter outside the embeddings a constant in
    host memory, the blocks sharing one block's; (None, None) where its blocks hold weights outside linears (a
    MoE block's experts)."""
    from .planner import text_config
    from .units import build_meta_model, find_units
    config = copy.deepcopy(text_config(config))
    config.num_hidden_layers = count
    # embeddings unused (the steps give the blocks their inputs): none of the vocabulary's size is allocated
    config.vocab_size = 128
    config.pad_token_id = config.bos_token_id = config.eos_token_id = None
    layer_types = getattr(config, "layer_types", None)      # one entry a layer
    if isinstance(layer_types, list) and len(layer_types) > count:
        config.layer_types = layer_types[:count]
    model = build_meta_model(config, dtype, attn_implementation, trust_remote_code is True)
    names = [u.name for u in find_units(model) if u.kind == "block"]
    if len(names) != count:
        return None, None
    blocks = [model.get_submodule(name) for name in names]
    linears = {id(m.weight) for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)}
    if any(p.dim() >= 2 and id(p) not in linears for b in blocks for p in b.parameters()):
        return None, None
    skipped = {id(p) for emb in (model.get_input_embeddings(), model.get_output_embeddings()) if emb is not None
               for p in emb.parameters()}
    # the blocks' weights: each block's parameter of a name the first block's (one block's bytes in all, read in
    # the order a block reads them); the rest's (the final norm, say) its own. 1-D ones are norms' scales (1, as
    # initialised), the others a constant whose products hold no subnormal values.
    made = {}
    owners = [(f"{index}.", block) for index, block in enumerate(blocks)] + [("", model)]
    for prefix, owner in owners:
        for module_name, module in owner.named_modules():
            for name, p in list(module._parameters.items()):
                if p is None or id(p) in skipped or p.device.type != "meta":
                    continue
                key = f"{module_name}.{name}" if prefix else f"model:{module_name}.{name}"
                if key not in made:
                    made[key] = torch.full(p.shape, 1.0 if p.dim() == 1 else 0.01, dtype=p.dtype)
                module._parameters[name] = torch.nn.Parameter(made[key], requires_grad=False)
    return model, blocks


def _timed(torch, model, blocks, threads: int, kernel, beside, repeats: int) -> float:
    """The median over ``repeats`` decode steps (``step_times``) of a block's forward less its linears'."""
    times = step_times(torch, model, blocks, threads, kernel=kernel, beside=beside, steps=max(1, repeats))
    return sorted(max(0.0, block - linear) for block, linear in times)[len(times) // 2]


def step_times(torch, model, blocks, threads: int, *, kernel=None, beside=None, steps: int) -> list:
    """[(seconds, seconds of its linears)] a block of ``blocks`` (``model``'s decoder blocks) took, on average, in
    each of ``steps`` batch-1 decode steps through ``model``'s decoder on the CPU, after a 16-token prompt and two
    steps to warm up: a static cache of the shortest bucket, torch's threads ``threads``, the linears multiplied by
    ``kernel`` (a cpu_kernel.KernelLinears policy; F.linear where None), ``beside`` (a hybrid.BusyLink) copying
    during each step. Each block's forward and each linear in it timed by hooks, put back after (and the kernel,
    and the caller's threads)."""
    from transformers import StaticCache

    from .cpu_kernel import KernelLinears
    from .graphs import MIN_BUCKET
    decoder = model.get_decoder()
    hidden = model.config.get_text_config().hidden_size
    spent = {"block": 0.0, "linear": 0.0}
    started = {}
    handles = []

    def timing(kind):
        def pre(module, args):
            started[id(module)] = time.perf_counter()

        def post(module, args, output):
            spent[kind] += time.perf_counter() - started.pop(id(module))
        return pre, post
    installed = []
    for block in blocks:
        if kernel is not None:
            installed.append(KernelLinears(torch, block, kernel))
            installed[-1].install()
        for module, kind in [(block, "block")] + [(m, "linear") for m in block.modules()
                                                   if isinstance(m, torch.nn.Linear)]:
            pre, post = timing(kind)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    caller = torch.get_num_threads()
    try:
        cache = StaticCache(config=model.config, max_cache_len=MIN_BUCKET)
        times = []
        with torch.inference_mode():
            torch.set_num_threads(threads)
            prompt = torch.full((1, PROMPT, hidden), 0.5, dtype=next(blocks[0].parameters()).dtype)
            decoder(inputs_embeds=prompt, past_key_values=cache, use_cache=True)
            row = prompt[:, :1]
            for k in range(steps + 2):
                spent["block"] = spent["linear"] = 0.0
                if beside is not None:
                    beside.start()
                try:
                    decoder(inputs_embeds=row, past_key_values=cache, use_cache=True,
                            cache_position=torch.tensor([PROMPT + k]))
                finally:
                    if beside is not None:
                        beside.stop()
                if k >= 2:
                    times.append((spent["block"] / len(blocks), spent["linear"] / len(blocks)))
        return times
    finally:
        torch.set_num_threads(caller)
        for h in handles:
            h.remove()
        for kl in installed:
            kl.remove()
