"""Fused RMSNorm / SiLU-MLP kernels: against transformers' formulas, and which modules get them."""

import pytest
import torch
from models import tiny

from specdec.kernels import rms_norm, rms_norm_reference, silu_mul, silu_mul_reference
from specdec.runtime.fusion import fusable, fused_forwards

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the dtype's last place at b's magnitude."""
    eps = torch.finfo(b.dtype).eps
    return float(((a.float() - b.float()).abs() / (b.float().abs() * eps).clamp(min=1e-30)).max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 96), (2, 4, 3, 16)])
def test_rms_norm_matches_transformers_formula(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEV)
    w = torch.randn(shape[-1], generator=g).to(dtype).to(DEV)
    for eps in (1e-6, 4.0):  # a large eps: the kernel must add it where the formula does
        out, ref = rms_norm(x, w, eps), rms_norm_reference(x, w, eps)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        # fp32: the sum's order only; bf16: the interpreter truncates where the GPU rounds (1 ulp, twice)
        assert _ulps(out, ref) <= (8 if dtype == torch.float32 else 2.01)
    assert _ulps(rms_norm(x, w, 4.0), rms_norm_reference(x, w, 1e-6)) > 10  # eps is not ignored


@pytest.mark.gpu
def test_rms_norm_promotes_like_torch():
    x = torch.randn(2, 8).to(torch.bfloat16).to(DEV)
    w = torch.randn(8).to(DEV)  # fp32 weight, bf16 activations: transformers returns fp32
    assert rms_norm(x, w, 1e-6).dtype == rms_norm_reference(x, w, 1e-6).dtype == torch.float32
    with pytest.raises(ValueError, match="does not match the last dim 8"):
        rms_norm(x, torch.ones(4, device=DEV), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype):
    g = torch.Generator().manual_seed(5)
    gate = (torch.randn(3, 7, 300, generator=g) * 4).to(dtype).to(DEV)
    up = torch.randn(3, 7, 300, generator=g).to(dtype).to(DEV)
    out, ref = silu_mul(gate, up), silu_mul_reference(gate, up)
    assert out.dtype == dtype and _ulps(out, ref) <= (8 if dtype == torch.float32 else 2.01)
    assert _ulps(silu_mul(up, gate), ref) > 10  # the gate is the argument that goes through SiLU


@pytest.mark.parametrize(
    "arch, norms, mlps",
    [("llama", 5, 2), ("mistral", 5, 2), ("qwen2", 5, 2), ("qwen3", 9, 2), ("gemma2", 0, 0), ("gpt2", 0, 0)],
)
def test_fusable_finds_the_llama_formula_only(arch, norms, mlps):
    """2 layers: two norms each + the final norm (Qwen3 adds q/k norms); Gemma's norm (1 + weight,
    GELU MLP) and GPT-2 (LayerNorm) keep their own forwards."""
    model = tiny(arch)
    found = fusable(model)
    kinds = [type(m).__name__ for m, _ in found]
    assert sum(k.endswith("RMSNorm") for k in kinds) == norms
    assert sum(k.endswith("MLP") for k in kinds) == mlps


def test_a_changed_forward_is_not_fused():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class Offset(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1

    model = tiny("llama")
    model.model.norm = Offset(64)
    wrapped = model.model.layers[0].mlp
    wrapped.forward = lambda x: x  # someone else's instance wrapper (e.g. accelerate hooks)
    found = {id(m) for m, _ in fusable(model)}
    assert id(model.model.norm) not in found and id(wrapped) not in found
    assert id(model.model.layers[0].input_layernorm) in found


@pytest.mark.gpu
def test_fused_forwards_are_swapped_for_the_call_only():
    model = tiny("qwen3", num_hidden_layers=1).to(DEV)
    x = torch.randn(1, 3, 64, device=DEV)
    layer = model.model.layers[0]
    want = layer.mlp(layer.post_attention_layernorm(x))
    with fused_forwards(fusable(model)):
        assert "forward" in layer.mlp.__dict__
        got = layer.mlp(layer.post_attention_layernorm(x))
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(layer.mlp(x), want)  # the comparison can fail


@pytest.mark.gpu
def test_engine_runs_the_fused_kernels_and_stays_greedy_identical(monkeypatch):
    """On the Triton path the engine's forwards go through the fused kernels (counted) and the
    output still equals model.generate; fuse=False turns them off."""
    import specdec
    import specdec.kernels as K

    calls = {"norm": 0, "mlp": 0}
    norm, mlp = K.rms_norm, K.silu_mul
    monkeypatch.setattr(K, "rms_norm", lambda *a: (calls.__setitem__("norm", calls["norm"] + 1), norm(*a))[1])
    monkeypatch.setattr(K, "silu_mul", lambda *a: (calls.__setitem__("mlp", calls["mlp"] + 1), mlp(*a))[1])
    model = tiny("qwen3", vocab=64, num_hidden_layers=1).to(DEV)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEV)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    for fuse in (True, False):
        calls.update(norm=0, mlp=0)
        engine = specdec.Engine(model, specdec.Ngram(num_tokens=2), block_size=4, cuda_graphs=False)
        engine.kernels = True
        engine.target.fuse = fuse
        out = specdec.generate(model, ids, max_new_tokens=5, do_sample=False, engine=engine)
        assert torch.equal(out, ref)
        # 1 layer: three norms and one MLP per forward; the prefill and at least one step ran
        assert (calls["norm"] >= 2 * 3 and calls["mlp"] >= 2) if fuse else calls == {"norm": 0, "mlp": 0}, calls
    assert not any("forward" in m.__dict__ for m in model.modules())
