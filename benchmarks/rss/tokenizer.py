"""What a tokenizer of a real vocabulary size costs in RssAnon+RssShmem when nb_offload loads it.

nb_offload's tiny models ship a 300-token tokenizer (~1 MiB). Real ones hold 32k-256k tokens.
This builds byte-level BPE tokenizers of those sizes offline (random merges over the byte
alphabet, cached under /tmp/nb_rss), then, in a fresh process each, imports what a load has
already imported by the time ``OffloadedModel._load_tokenizer`` runs and measures
``AutoTokenizer.from_pretrained`` (the call nb_offload makes).

    .venv/bin/python benchmarks/rss/tokenizer.py
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import CACHE, MiB  # noqa: E402

SIZES = (32_000, 128_000, 256_000)


def build(vocab_size: int) -> str:
    folder = os.path.join(CACHE, f"tok-{vocab_size}")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(sorted(alphabet))}
    merges = []
    rng = random.Random(0)
    tokens = list(vocab)
    while len(vocab) < vocab_size - 3:
        a, b = rng.choice(tokens), rng.choice(tokens[: max(256, len(tokens) // 4)])
        if len(a) + len(b) > 12 or a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append((a, b))
        tokens.append(a + b)
    for s in ("<s>", "</s>", "<pad>"):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder + ".tmp")
    os.replace(folder + ".tmp", folder)
    return folder


CHILD = r"""
import sys, gc
sys.path.insert(0, sys.argv[2])
from measure import rss_anon_shmem, MiB
import torch, transformers, nb_offload
from transformers import AutoTokenizer, AutoConfig
import transformers.modeling_utils, tokenizers   # what a load has imported before the tokenizer
gc.collect()
base = rss_anon_shmem()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
gc.collect()
sample = tok("The quick brown fox jumps over the lazy dog.").input_ids
print(f"{(rss_anon_shmem() - base) / MiB:.1f} {len(tok)} {len(sample)}")
"""


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    print(f"{'vocab':>8} {'tokenizer.json MiB':>19} {'RssAnon+Shmem growth MiB':>25}")
    for n in SIZES:
        folder = build(n)
        size = os.path.getsize(os.path.join(folder, "tokenizer.json")) / MiB
        out = subprocess.run([sys.executable, "-c", CHILD, folder, here], capture_output=True, text=True,
                             env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        if out.returncode:
            print(out.stderr[-2000:])
            continue
        grown, length, _ = out.stdout.split()
        print(f"{int(length):8} {size:19.1f} {float(grown):25.1f}")


if __name__ == "__main__":
    main()
