"""Fused kernels of the captured step (fused.py), what can be checked without a GPU: which code is
recognised as the known forms, the swaps undone, the fused forwards falling back to the eager code
for inputs the kernels don't take. The kernels' bits against the eager ops: tests/gpu/test_graph_gpu.py."""

import pytest

torch = pytest.importorskip("torch")

from nb_offload import forms, fused  # noqa: E402

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
    swapped = {id(module) for module, _ in fusion.swaps}
    assert id(norm) not in swapped and id(model.model.layers[0].mlp) not in swapped
    assert id(model.model.layers[1].mlp) in swapped


def test_a_rotary_embedding_a_hub_kernel_replaces_is_not_fused(model_dirs):
    """Since transformers 5.25 a modeling module's apply_rotary_pos_emb is a module wrapping the function,
    and each attention holds its own copy that ``kernels.kernelize`` may give a Hub kernel's forward."""
    model = _model(model_dirs, "llama")
    wrappers = [w for m in model.modules() for w in vars(m).get("_kernel_funcs", {}).values()]
    if not wrappers:
        pytest.skip("this transformers calls apply_rotary_pos_emb as a plain function")
    assert fused.Fusion(model).counts["rotary"] == 1
    wrappers[-1].forward = lambda *args, **kwargs: None    # what kernelize does to one attention
    assert fused.Fusion(model).counts["rotary"] == 0


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
    assert forms.is_form(spaced, fused.NORM_FORM)
    assert not forms.is_form(other_eps, fused.NORM_FORM)
    assert not forms.is_form(len, fused.NORM_FORM)          # no Python source: not a form


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


class FakeKernels:
    """Stands in for fused_kernels (triton) on the CPU: records which kernels ran, computes as eager."""

    def __init__(self):
        self.ran = []

    def rotary(self, q, k, cos, sin, q_out, k_out):
        import threading
        self.ran.append(("rotary", threading.current_thread().name))
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q_out.copy_(q * c + fused._rotate_half(torch, q) * s)
        k_out.copy_(k * c + fused._rotate_half(torch, k) * s)
        return q_out, k_out

    def squares(self, x):
        return x.to(torch.float32).pow(2)

    def norm_scale(self, x, variance, weight, eps, out):
        return out.copy_(weight * (x.to(torch.float32) * torch.rsqrt(variance + eps)).to(x.dtype))

    def silu_mul(self, gate, up, out):
        self.ran.append(("silu_mul", None))
        return out.copy_(torch.nn.functional.silu(gate) * up)


@pytest.fixture
def fake_kernels(monkeypatch):
    import sys
    kernels = FakeKernels()
    monkeypatch.setitem(sys.modules, "nb_offload.fused_kernels", kernels)
    import nb_offload
    monkeypatch.setattr(nb_offload, "fused_kernels", kernels, raising=False)
    return kernels


def _checked(model):
    """A fusion as check() leaves it on a card, here for CPU tensors in bf16 (the kernels faked)."""
    fusion = fused.Fusion(model)
    fusion.device, fusion.dtype, fusion.checked = torch.device("cpu"), torch.bfloat16, True
    return fusion


def test_the_rotary_swap_serves_only_threads_that_fuse_and_ends_in_any_order(model_dirs, fake_kernels):
    import sys
    import threading
    model = _model(model_dirs, "llama").to(torch.bfloat16)
    home = sys.modules[type(model.model.layers[0].self_attn).__module__]
    eager = home.apply_rotary_pos_emb
    a, b = _checked(model), _checked(model)
    q = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16)
    cos, sin = torch.randn(1, 1, 16, dtype=torch.bfloat16), torch.randn(1, 1, 16, dtype=torch.bfloat16)
    first, second = a.applied(), b.applied()
    first.__enter__()
    second.__enter__()
    other = threading.Thread(target=lambda: home.apply_rotary_pos_emb(q, q, cos, sin), name="other")
    other.start()
    other.join()
    home.apply_rotary_pos_emb(q, q, cos, sin)
    assert fake_kernels.ran == [("rotary", threading.current_thread().name)]    # not the other thread's call
    first.__exit__(None, None, None)        # out of order: the first applied ends first
    assert home.apply_rotary_pos_emb is not eager
    second.__exit__(None, None, None)
    assert home.apply_rotary_pos_emb is eager
    assert fused._eager_rotary(home) is eager


def test_an_activation_with_hooks_is_called_not_fused(model_dirs, fake_kernels):
    model = _model(model_dirs, "llama").to(torch.bfloat16)
    seen = []
    fusion = _checked(model)
    assert fusion.counts["MLPs"] == model.config.num_hidden_layers
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad(), fusion.applied():
        model(torch.tensor([[5, 17, 42]]))
    # the hooked layer's activation ran (its hook saw it); the other layers' ran fused
    assert len(seen) == 1 and sum(name == "silu_mul" for name, _ in fake_kernels.ran) \
        == model.config.num_hidden_layers - 1
    assert fused.Fusion(model).counts["MLPs"] == model.config.num_hidden_layers - 1    # found hooked: not fused


def test_odd_or_wrapped_forwards_are_not_forms():
    import functools

    def norm(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def with_kwargs(self, hidden_states, **kw):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    @functools.wraps(norm)
    def doubled(self, hidden_states):
        return 2 * norm(self, hidden_states)
    assert forms.is_form(norm, fused.NORM_FORM)
    assert not forms.is_form(with_kwargs, fused.NORM_FORM)
    assert not forms.is_form(doubled, fused.NORM_FORM)

    class Lambda(torch.nn.Module):
        forward = lambda self, x: x  # noqa: E731 (a forward whose source is no def)
    assert fused.Fusion(torch.nn.Sequential(Lambda())).why_not      # not a form, and no error


def test_a_failing_fused_warm_up_step_runs_again_unfused():
    import contextlib
    import types

    from nb_offload.graphs import DecodeGraphs
    from nb_offload.trace import Stats

    class Failing:
        why_not = ""

        @contextlib.contextmanager
        def applied(self):
            self.active = True
            try:
                yield
            finally:
                self.active = False

        off = fused.Fusion.off
    fusion = Failing()
    runs = []

    def eager_step(forward, args, kwargs):
        runs.append(getattr(fusion, "active", False))
        if fusion.active:
            raise RuntimeError("a kernel that failed to compile")
        return "out"
    engine = types.SimpleNamespace(torch=torch, stats=Stats(), eager_step=eager_step)
    graphs = DecodeGraphs(engine, enabled=False)
    graphs.fusion = fusion
    assert graphs._warm_up(None, (), {}) == "out"
    assert runs == [True, False] and graphs._fusion() is None
    assert engine.stats.graph_fused.startswith("none: RuntimeError: a kernel that failed to compile")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_forwards_route_every_call_through_the_kernels(model_dirs, fake_kernels, arch, batch):
    """The wrappers' plumbing (arguments, broadcast cos and sin, the layouts worked out on the meta device),
    with kernels that compute as eager: the same logits, and every layer's calls went through them."""
    model = _model(model_dirs, arch).to(torch.bfloat16)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]] * batch)
    fusion = _checked(model)
    with torch.no_grad():
        want = model(ids).logits
        with fusion.applied():
            got = model(ids).logits
    assert torch.equal(got, want)
    assert sum(name == "rotary" for name, _ in fake_kernels.ran) == model.config.num_hidden_layers
    assert sum(name == "silu_mul" for name, _ in fake_kernels.ran) == fusion.counts["MLPs"]
