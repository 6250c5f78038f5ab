"""How often the next MoE block's router, applied to this block's experts input, names the experts that
block's router then picks: the guess that would let the link start copying before the router has run
(issue 15). Runs on the CPU: the Mixtral anchor's block shape (hidden 2048, 8 experts of 5632, top 2) with
random bf16 weights as bench_offload.save_random draws them, ``--layers`` blocks, a greedy generate; counts
over the decode steps only (the prefill routes every expert anyway).

    PYTHONPATH=. python3 benchmarks/guess_next_experts.py [--layers 8] [--tokens 24]
"""

from __future__ import annotations

import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                        num_attention_heads=16, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                        vocab_size=32000, max_position_embeddings=4096, dtype="bfloat16")
    model = MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    seen = {}       # block -> [(experts input, chosen experts)] a call

    def keep(i):
        def pre(module, args, kwargs):
            seen.setdefault(i, []).append((args[0].clone(), args[1].clone()))
        return pre
    for i, layer in enumerate(model.model.layers):
        layer.mlp.experts.register_forward_pre_hook(keep(i), with_kwargs=True)
    with torch.inference_mode():
        model.generate(torch.randint(3, 31000, (1, 16)), max_new_tokens=args.tokens, do_sample=False)
        named = routed = whole = calls = 0
        for i in range(args.layers - 1):
            gate = model.model.layers[i + 1].mlp.gate
            for (hidden, _), (_, chosen) in zip(seen[i][1:], seen[i + 1][1:]):
                guess = set(gate(hidden)[2].flatten().tolist())
                want = set(chosen.flatten().tolist())
                named += len(guess & want)
                routed += len(want)
                whole += guess == want
                calls += 1
    print(json.dumps({"layers": args.layers, "decode_calls": calls, "experts_named": named, "experts_routed": routed,
                      "share_named": round(named / routed, 3), "share_all_named": round(whole / calls, 3),
                      "random_guess_share": cfg.num_experts_per_tok / cfg.num_local_experts}))


if __name__ == "__main__":
    main()
