"""nb_offload on the CPU device against plain transformers on the CPU, in one process: decode at batch 1 with
torch's products (``cpu_kernel="torch"``: F.linear), with the exact ones by default (F.linear's bits, by
nb_offload's AMX kernel where the CPU has AMX, cpu_amx.py) and with ``cpu_kernel="fast"`` (nb_offload's own
kernel for one-row products, cpu_kernel.py).

A LLaMA-shaped model with random bf16 weights (1.7 GB at the defaults), saved and loaded three ways: plain
transformers (``from_pretrained(dtype=bfloat16)``), nb_offload ``device="cpu"`` with ``cpu_kernel="torch"``, with
the default ``"exact"``, and with ``"fast"``. Decode time per token is the difference between a 2-token and an
18-token greedy generate, divided by 16, so the prefill cancels; rounds interleaved (plain, torch, exact, fast),
medians with their spread. A prefill of ``--prompt`` tokens is timed the same way. Tokens: the torch and exact
loads' against plain transformers', the fast load's against plain transformers with the same linears
multiplying one row by the same kernel. Runs on any CPU; the fast rows need AVX-512 BF16 and a C compiler, the
AMX kernel AMX (else the rows say why, and "exact" is F.linear).

    PYTHONPATH=. python3 benchmarks/bench_cpu_device.py --json out.json
    python3 benchmarks/report.py out.json --title "..."
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from bench_offload import row_recorder


def build(folder, torch, hidden, layers, intermediate, vocab):
    """A LLaMA-shaped model with random bf16 weights saved in ``folder`` (safetensors); (its bytes, the bytes a
    decode step reads: all but the embedding table's other rows)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                      vocab_size=vocab, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    for p in model.parameters():        # small random weights, so the logits stay finite and the tokens vary
        p.data.normal_(0.0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    model.save_pretrained(folder)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    table = model.get_input_embeddings().weight
    return nbytes, nbytes - table.numel() * table.element_size() + table.shape[1] * table.element_size()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from nb_offload import cpu_amx, cpu_kernel
    torch.set_grad_enabled(False)
    out = {"meta": {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "kernel": cpu_kernel.why_unavailable() or "runs here",
                    "amx_kernel": cpu_amx.why_unavailable() or "runs here"}, "rows": []}
    add = row_recorder(out, args.json, digits=4)
    folder = tempfile.mkdtemp(prefix="nb_offload-cpu-device-")
    try:
        measure(args, torch, out, add, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(args, torch, out, add, folder):
    from transformers import AutoModelForCausalLM

    import nb_offload
    from nb_offload import cpu_kernel
    nbytes, step_bytes = build(folder, torch, args.hidden, args.layers, args.intermediate, args.vocab)
    out["meta"].update(model_bytes=nbytes, step_bytes=step_bytes, prompt=args.prompt,
                       shape=f"hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
                             f"vocab {args.vocab}")
    print(f"model: {out['meta']['shape']}, {nbytes / 1e9:.2f} GB bf16; kernel: {out['meta']['kernel']}; "
          f"AMX kernel: {out['meta']['amx_kernel']}", flush=True)

    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    loads = {"plain transformers": plain,
             "nb_offload cpu_kernel=\"torch\"": nb_offload.load(folder, device="cpu", cpu_kernel="torch",
                                                                progress=False),
             "nb_offload exact": nb_offload.load(folder, device="cpu", progress=False)}
    out["meta"]["exact_products"] = loads["nb_offload exact"].plan.cpu_products or "F.linear"
    out["meta"]["amx_linears"] = loads["nb_offload exact"].stats.cpu_amx_linears
    fast_why = cpu_kernel.why_unavailable()
    if fast_why is None:
        loads["nb_offload cpu_kernel=\"fast\""] = nb_offload.load(folder, device="cpu", cpu_kernel="fast",
                                                                  progress=False)
    ids = torch.randint(3, args.vocab - 1, (1, 16), generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(3, args.vocab - 1, (1, args.prompt), generator=torch.Generator().manual_seed(2))

    def generate(model, tokens, n):
        return model.generate(tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def timed(model, tokens, n):
        t0 = time.perf_counter()
        generate(model, tokens, n)
        return time.perf_counter() - t0

    decode = {name: [] for name in loads}
    prefill = {name: [] for name in loads}
    for model in loads.values():        # warm: threads started, the kernel built
        generate(model, ids, 2)
    for _ in range(args.rounds):
        for name, model in loads.items():
            decode[name].append((timed(model, ids, 18) - timed(model, ids, 2)) / 16)
            prefill[name].append(timed(model, prompt, 1))
    # tokens: exact against plain; fast against plain with the same linears by the kernel
    want = generate(plain, ids, 16)
    same = {name: bool(torch.equal(generate(loads[name], ids, 16), want))
            for name in ("nb_offload cpu_kernel=\"torch\"", "nb_offload exact")}
    if fast_why is None:
        fast_load = loads["nb_offload cpu_kernel=\"fast\""]
        linears = cpu_kernel.FastLinears(torch, plain)
        linears.install()
        try:
            kernel_want = generate(plain, ids, 16)
        finally:
            linears.remove()
        same["nb_offload cpu_kernel=\"fast\""] = bool(torch.equal(generate(fast_load, ids, 16), kernel_want))
        out["meta"]["fast_linears"] = fast_load.stats.cpu_fast_linears
        out["meta"]["kernel_tokens_differ_from_plain"] = int((kernel_want != want).sum())
    base = statistics.median(decode["plain transformers"])
    for name in loads:
        step = statistics.median(decode[name])
        add(what=name, decode_tok_s=1 / step, decode_spread_ms=[min(decode[name]) * 1e3, max(decode[name]) * 1e3],
            over_plain=base / step, prefill_s=statistics.median(prefill[name]),
            prefill_spread_s=[min(prefill[name]), max(prefill[name])],
            bytes_gbps=step_bytes / step / 1e9, tokens_equal=same.get(name))
        print(f"{name:34s} decode {1 / step:6.2f} tok/s ({base / step:.2f}x plain), "
              f"{step_bytes / step / 1e9:5.1f} GB/s of weights; prefill {args.prompt} "
              f"{statistics.median(prefill[name]):.3f} s; "
              f"tokens equal to their reference: {same.get(name, 'the reference itself')}", flush=True)
    if fast_why is not None:
        print(f"cpu_kernel=\"fast\" not measured: {fast_why}", flush=True)
    print(f"exact: {out['meta']['exact_products']}, {out['meta']['amx_linears']} linears by the AMX kernel", flush=True)
    for model in loads.values():
        if hasattr(model, "unload"):
            model.unload()


if __name__ == "__main__":
    main()
