"""The small model that ships with nb_offload (nb_offload/data/small-llama): it writes English
sentences through every tier, the same tokens as plain transformers, and stays small."""

import os

import pytest
import torch

import nb_offload
from nb_offload.tiny import small_model


def corpus():
    with open(os.path.join(os.path.dirname(small_model()), "corpus.txt")) as fh:
        return [line.strip() for line in fh if line.strip()]


def test_it_is_small_and_complete():
    folder = small_model()
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size < 20 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(folder, name)), name


@pytest.mark.parametrize("prompt", ["The old baker", "Offloading keeps", "A notebook is"])
def test_it_writes_a_sentence_it_learned_streamed_from_disk(prompt, tmp_path):
    from transformers import AutoModelForCausalLM
    folder = small_model()
    llm = nb_offload.load(folder, device="cpu", disk=tmp_path, pins={"model.layers.1-3": "disk"}, progress=False)
    try:
        inputs = llm.tokenizer(prompt, return_tensors="pt")
        out = llm.generate(**inputs, max_new_tokens=60, do_sample=False)
        text = llm.tokenizer.decode(out[0], skip_special_tokens=True)
        assert text in corpus(), text          # a whole sentence of the text it learned, ending at its full stop
        assert out[0, -1].item() == llm.tokenizer.eos_token_id
        ref = AutoModelForCausalLM.from_pretrained(folder)
        with torch.inference_mode():
            want = ref.generate(**inputs, max_new_tokens=60, do_sample=False)
        assert torch.equal(out, want)
    finally:
        llm.unload()


def test_its_chat_template_renders():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(small_model())
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert "hello" in text and text.endswith("<|assistant|>")


def test_the_model_draws_its_timeline_with_plotly(tmp_path):
    pytest.importorskip("plotly")
    llm = nb_offload.load(small_model(), device="cpu", disk=tmp_path, pins={"model.layers.2-3": "disk"},
                          hold_spare=False, progress=False)
    try:
        llm.generate(**llm.tokenizer("The old baker", return_tensors="pt"), max_new_tokens=8, do_sample=False)
        fig = llm.timeline_figure()
        assert {"read", "compute"} <= {d.name for d in fig.data}
        path = tmp_path / "timeline.html"
        fig.write_html(path)
        assert path.stat().st_size > 1000
    finally:
        llm.unload()
