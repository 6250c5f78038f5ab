"""Fused kernels of the captured step (fused.py), what can be checked without a GPU: which code is
recognised as the known forms, the swaps undone, the fused forwards falling back to the eager code
for inputs the kernels don't take. The kernels' bits against the eager ops: tests/gpu/test_graph_gpu.py."""

import pytest

torch = pytest.importorskip("torch")

from nb_offload import fused  # noqa: E402

FOUND = {   # per architecture: whether its norms, its MLPs (SiLU) and its rotary embedding are fused
    "llama": (True, True, True),
    "qwen2": (True, True, True),
    "mistral": (True, True, True),
    "mixtral": (True, False, True),     # its experts compute in the experts' own code
    "gemma": (False, False, True),      # a 1 + weight norm and a GELU MLP: not these forms
}


def _model(model_dirs, arch):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dirs(arch), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", sorted(FOUND))
def test_finds_the_known_forms_in_each_architecture(model_dirs, arch):
    model = _model(model_dirs, arch)
    layers = model.config.num_hidden_layers
    norms, mlps, rotary = FOUND[arch]
    assert fused.Fusion(model).counts == {"norms": norms * (2 * layers + 1), "MLPs": mlps * layers,
                                          "rotary": int(rotary)}


def test_a_changed_forward_is_not_fused(model_dirs):
    model = _model(model_dirs, "llama")
    norm = model.model.norm

    class ScaledNorm(type(norm)):
        def forward(self, hidden_states):       # not the form: one more multiply
            return 2 * super().forward(hidden_states)
    norm.__class__ = ScaledNorm
    model.model.layers[0].mlp.forward = lambda x: x     # wrapped by someone else
    fusion = fused.Fusion(model)
    swapped = {id(obj) for obj, _, _ in fusion.swaps}
    assert id(norm) not in swapped and id(model.model.layers[0].mlp) not in swapped
    assert id(model.model.layers[1].mlp) in swapped


def test_forms_compare_code_not_text():
    def spaced(self, hidden_states):
        """A docstring and other spacing don't matter."""
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim = True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def other_eps(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + 1e-5)
        return self.weight * hidden_states.to(input_dtype)
    assert fused.is_form(spaced, fused.NORM_FORM)
    assert not fused.is_form(other_eps, fused.NORM_FORM)
    assert not fused.is_form(len, fused.NORM_FORM)          # no Python source: not a form


def test_swaps_are_undone_also_after_an_error(model_dirs):
    import sys
    model = _model(model_dirs, "qwen2")
    fusion = fused.Fusion(model)
    home = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rotary = home.apply_rotary_pos_emb
    with pytest.raises(RuntimeError), fusion.applied():
        assert "forward" in vars(model.model.norm) and home.apply_rotary_pos_emb is not rotary
        raise RuntimeError("a step that fails")
    assert "forward" not in vars(model.model.norm) and "forward" not in vars(model.model.layers[0].mlp)
    assert home.apply_rotary_pos_emb is rotary


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_fused_forwards_fall_back_to_eager_off_cuda(model_dirs, arch):
    """On the CPU (and in float32) every fused forward runs the eager code: the same logits, bit for bit."""
    model = _model(model_dirs, arch).to(torch.bfloat16)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        want = model(ids).logits
        with fused.Fusion(model).applied():
            got = model(ids).logits
    assert torch.equal(got, want)


def test_check_refuses_without_the_kernels_or_a_half_dtype(model_dirs):
    fusion = fused.Fusion(_model(model_dirs, "llama"))
    assert not fusion.check(torch.device("cpu"), torch.float32)
    assert "float32" in fusion.why_not and fusion.describe() == ""
    fusion = fused.Fusion(_model(model_dirs, "llama"))
    assert not fusion.check(torch.device("cpu"), torch.bfloat16)    # no triton here, or no CUDA: a reason
    assert fusion.why_not
