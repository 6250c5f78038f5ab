"""Train the small model the demo and the notebooks use: a 4-layer Llama that writes English sentences.

It learns ``nb_offload/data/corpus.txt`` (sentences written for this project) by heart, so greedy
generations from a prompt taken from it read as sentences, not bytes. Deterministic (fixed seeds,
one thread); under two minutes on two CPU cores. The result is committed in
``nb_offload/data/small-llama`` (about 3 MB); run this again after changing the corpus:

    .venv/bin/python scripts/train_small_model.py
"""

from __future__ import annotations

import argparse
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "nb_offload", "data")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(DATA, "small-llama"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--vocab", type=int, default=512)
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nb_offload.tiny import build_tokenizer
    torch.manual_seed(0)
    torch.set_num_threads(1)        # the same weights on every machine
    with open(os.path.join(DATA, "corpus.txt")) as fh:
        lines = [line.strip() for line in fh if line.strip()]
    tok = build_tokenizer(args.vocab, lines)
    ids = []
    for line in lines:
        ids += [tok.bos_token_id] + tok(line)["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(ids)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    window, batch = 96, 16
    t0 = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - window - 1, (batch,))
        x = torch.stack([data[s:s + window] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    prompt = tok("The old baker", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    print("sample:", tok.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
