"""Tiny models built offline, for the demo and the tests: random weights, a real tokenizer.

Nothing here touches the network: configs are written by hand and the tokenizer is trained
in memory on a few sentences.
"""

from __future__ import annotations

import os

ARCHITECTURES = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=256),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=256),
    "mixtral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32),
}

CORPUS = [
    "Model offloading keeps parts of a model in CPU memory or on disk.",
    "Each block is streamed to the GPU just before it is needed.",
    "The quick brown fox jumps over the lazy dog.",
    "A notebook is a good place to run a language model.",
    "Pinned memory moves to the GPU faster than pageable memory.",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


SMALL_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "small-llama")


def small_model() -> str:
    """The folder of the small model that ships with nb_offload: a 4-layer Llama (3 MB) trained on
    ``data/corpus.txt``, so its greedy generations from a prompt in that text are English sentences
    (``scripts/train_small_model.py`` made it). Read-only: load it, don't write into it."""
    return SMALL_MODEL


def hollow_llama(folder: str, *, layers: int = 32, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
                 vocab: int = 32000, dtype: str = "bfloat16") -> str:
    """A LLaMA-7B-shaped checkpoint with no weights in it, for dry-run plans at real sizes on any machine.

    Its safetensors header names every tensor, and the file is as long as the weights would be, but
    sparse: it takes no disk space and holds zeros. ``nb_offload.plan`` reads only headers, so it plans
    this as it would the real model; loading it would give a model of zeros."""
    import json
    import struct

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=4096, dtype=dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    codes = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, p in model.state_dict().items():
        nbytes = p.numel() * p.element_size()
        header[name] = {"dtype": codes[str(p.dtype).removeprefix("torch.")], "shape": list(p.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(folder, "model.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(8 + len(text) + offset)     # sparse: the length without the bytes
    return folder


def build_tokenizer(vocab_size: int = 256, texts=CORPUS):
    """A byte-level BPE tokenizer trained in memory on ``texts``: same on every machine, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(folder: str, arch: str = "llama", *, dtype="float32", seed: int = 0, tokenizer: bool = True,
                    vocab_size: int = 320, **overrides) -> str:
    """Write a tiny random ``arch`` model (and a tokenizer) with ``save_pretrained`` into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r}; known: {sorted(ARCHITECTURES)}")
    kwargs = dict(ARCHITECTURES[arch])
    kwargs.update(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1)
    if arch not in ("gpt2", "opt"):
        kwargs.setdefault("max_position_embeddings", 512)
    if arch == "opt":
        kwargs["pad_token_id"] = 2
    if arch == "gemma":
        kwargs["pad_token_id"] = 2
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Random init of norms is all ones; perturb every weight so a wrong binding changes the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.generation_config.pad_token_id = kwargs.get("pad_token_id", 2)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer:
        build_tokenizer(vocab_size=min(vocab_size, 300)).save_pretrained(folder)
    return folder
