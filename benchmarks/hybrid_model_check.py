"""The step model (hybrid.step_seconds) against hybrid decode runs already measured: each run's plan rebuilt on
this machine from a LLaMA-7B-shaped checkpoint of headers alone (its data a sparse file), with the blocks
the run computed on the CPU (bench_hybrid.py's JSON: their count, the rates at load, the depth copied
ahead), then the modelled tok/s at the CPU's rate measured at load and at the rate reached while running,
against the measured tok/s. Runs no GPU.

    PYTHONPATH=. python3 benchmarks/hybrid_model_check.py benchmarks/runs/raw-...-hybrid.json
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile


def headers_only_7b(folder, layers=32):
    """A LLaMA-7B-shaped bf16 checkpoint whose safetensors data is a hole: a plan reads headers alone."""
    h, inner, vocab = 4096, 11008, 32000
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h,
                       intermediate_size=inner, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=vocab, max_position_embeddings=4096,
                       dtype="bfloat16", rms_norm_eps=1e-6, tie_word_embeddings=False), f)
    shapes = {"model.embed_tokens.weight": [vocab, h]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": [h, h] for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": [inner, h], p + "mlp.up_proj.weight": [inner, h],
                       p + "mlp.down_proj.weight": [h, inner], p + "input_layernorm.weight": [h],
                       p + "post_attention_layernorm.weight": [h]})
    shapes.update({"model.norm.weight": [h], "lm_head.weight": [vocab, h]})
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    import nb_offload
    from nb_offload import hybrid
    folder = os.path.join(tempfile.mkdtemp(), "llama-7b-headers")
    headers_only_7b(folder)
    for path in args.runs:
        for r in json.load(open(path))["rows"]:
            if "error" in r or not r.get("prefetch"):
                continue
            cpu, link = r["measured_at_load_cpu_gbps"], r["measured_at_load_link_gbps"]
            streamed = nb_offload.plan(folder, gpu=r["budget"], cpu="100GiB")
            in_host = [e.name for e in streamed if e.tier == "cpu" and e.kind == "block"]
            runs = [("hybrid", r["hybrid_tok_s"], r["blocks_on_cpu"], r["cpu_gbps_while_running"])]
            runs += [(k, v["tok_s"], v["blocks_on_cpu"], v["cpu_gbps"]) for k, v in r.get("variants", {}).items()]
            for name, measured, count, reached in runs:
                chosen = hybrid.spread(in_host, count / len(in_host))
                plan = nb_offload.plan(folder, gpu=r["budget"], cpu="100GiB", prefetch=r["prefetch"],
                                       pins=dict.fromkeys(chosen, "cpu-compute"))
                at_load = 1 / plan.predicted_seconds_per_step(link, cpu_gbps=cpu)
                at_reached = 1 / plan.predicted_seconds_per_step(link, cpu_gbps=reached)
                print(f"{os.path.basename(path)} {r['budget']} {name}: {count} blocks on the CPU, {plan.prefetch} "
                      f"ahead; measured {measured:.2f} tok/s; modelled at the CPU's rate at load ({cpu:.1f} GB/s) "
                      f"{at_load:.2f} ({100 * (at_load / measured - 1):+.0f} %), at the rate reached "
                      f"({reached:.1f} GB/s) {at_reached:.2f} ({100 * (at_reached / measured - 1):+.0f} %)")


if __name__ == "__main__":
    main()
