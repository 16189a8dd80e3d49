"""Fused RMSNorm / SiLU-MLP / RoPE kernels: against transformers' formulas, and which modules get them."""

import pytest
import torch
from models import tiny

from specdec.kernels import rms_norm, rms_norm_reference, rope, rope_fits, rope_reference, silu_mul, silu_mul_reference
from specdec.runtime.fusion import RopeSite, fusable, fused_forwards, rope_sites

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
    # one rotary site per modeling file with the Llama formula (Gemma 2's is; GPT-2 has no RoPE)
    sites = [m.name for m, _ in found if isinstance(m, RopeSite)]
    assert sites == ([] if arch == "gpt2" else [f"transformers.models.{arch}.modeling_{arch}"]), sites


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

    calls = {"norm": 0, "mlp": 0, "rope": 0}
    norm, mlp, rope_ = K.rms_norm, K.silu_mul, K.rope
    monkeypatch.setattr(K, "rms_norm", lambda *a: (calls.__setitem__("norm", calls["norm"] + 1), norm(*a))[1])
    monkeypatch.setattr(K, "silu_mul", lambda *a: (calls.__setitem__("mlp", calls["mlp"] + 1), mlp(*a))[1])
    monkeypatch.setattr(K, "rope", lambda *a: (calls.__setitem__("rope", calls["rope"] + 1), rope_(*a))[1])
    model = tiny("qwen3", vocab=64, num_hidden_layers=1).to(DEV)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEV)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    for fuse in (True, False):
        calls.update(norm=0, mlp=0, rope=0)
        engine = specdec.Engine(model, specdec.Ngram(num_tokens=2), block_size=4, cuda_graphs=False)
        engine.kernels = True
        engine.target.fuse = fuse
        out = specdec.generate(model, ids, max_new_tokens=5, do_sample=False, engine=engine)
        assert torch.equal(out, ref)
        # 1 layer: three norms, one MLP and one RoPE per forward; the prefill and at least one step ran
        if fuse:
            assert calls["norm"] >= 2 * 3 and calls["mlp"] >= 2 and calls["rope"] == calls["mlp"], calls
        else:
            assert calls == {"norm": 0, "mlp": 0, "rope": 0}, calls
    assert not any("forward" in m.__dict__ for m in model.modules())


def _rope_problem(dtype, B, HQ, HK, T, D, cos_rows, seed=0):
    """q / k as attention makes them ([B, T, H, D] projections viewed as [B, H, T, D]) and the
    rotary module's cos / sin [cos_rows, T, D] (duplicated halves, as transformers builds them)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, HQ, D, generator=g) * 3).to(dtype).to(DEV).transpose(1, 2)
    k = (torch.randn(B, T, HK, D, generator=g) * 3).to(dtype).to(DEV).transpose(1, 2)
    ang = torch.randn(cos_rows, T, D // 2, generator=g) * 5
    emb = torch.cat([ang, ang], -1)
    return q, k, emb.cos().to(dtype).to(DEV), emb.sin().to(dtype).to(DEV)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 2, 1, 64, 1), (2, 8, 2, 5, 32, 2), (3, 2, 2, 7, 128, 1), (2, 3, 1, 4, 8, 2)])
def test_rope_is_transformers_formula_bit_for_bit(dtype, shape):
    """The kernel rounds where torch does (each product, then the sum), so it equals transformers'
    apply_rotary_pos_emb exactly; on the CPU Triton's interpreter truncates bf16 where the GPU
    rounds (at most a few ulps there). Also the layout: the output is laid out as its input."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = _rope_problem(dtype, *shape)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(rope_reference(q, k, cos, sin), want, strict=True))
    got = rope(q, k, cos, sin)

    def layout(x):  # the strides of the dims that have more than one element
        return [st for st, n in zip(x.stride(), x.shape, strict=True) if n > 1]

    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert layout(g) == layout(w)
        if dtype == torch.bfloat16 and DEV == "cpu":  # a few ulps of the inputs' scale (the sum may cancel)
            scale = float(max(q.abs().max(), k.abs().max()))
            assert float((g.float() - w.float()).abs().max()) <= 4 * torch.finfo(dtype).eps * scale
        else:
            assert torch.equal(g, w)
    swapped = rope(q, k, sin, cos)  # the comparison can fail: cos and sin are not interchangeable
    assert not torch.equal(swapped[0], want[0])


def test_rope_fits_names_what_it_takes():
    q, k, cos, sin = _rope_problem(torch.float32, 2, 4, 2, 3, 16, 1)
    assert rope_fits(q, k, cos, sin)
    assert not rope_fits(q, k, cos.double(), sin.double())  # one dtype
    assert not rope_fits(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])  # D even
    assert not rope_fits(q, k, cos[:, :2], sin[:, :2])  # positions of q
    assert not rope_fits(q.transpose(-1, -2), k, cos, sin)  # unit stride in D
    with pytest.raises(ValueError, match=r"rope: q \(2, 4, 3, 16\).*need q \[B, Hq, T, D\]"):
        rope(q, k, cos.double(), sin.double())


def rotate_half(x):  # a modeling file's helper, the Llama formula (this module's own globals)
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """A copy of the Llama formula in another file (docstrings differ: they do not count)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def partial_rotary(q, k, cos, sin, unsqueeze_dim=1):  # another formula under the same name elsewhere
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) - (rotate_half(q) * sin)
    k_embed = (k * cos) - (rotate_half(k) * sin)
    return q_embed, k_embed


class _Attn(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_rope_sites_take_the_llama_formula_only(monkeypatch):
    here = _Attn.forward.__globals__
    assert [s.name for s in rope_sites(_Attn())] == [__name__]
    monkeypatch.setitem(here, "apply_rotary_pos_emb", partial_rotary)
    assert rope_sites(_Attn()) == []
    monkeypatch.setitem(here, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    hooked = _Attn()
    hooked.register_forward_pre_hook(lambda m, a: None)  # someone else's hooks decide its inputs
    assert rope_sites(hooked) == []


@pytest.mark.gpu
def test_rope_swap_lasts_for_the_call_and_nests(monkeypatch):
    """The file's global is the fused function inside the context (nested and repeated contexts
    share one swap) and the original object after it; the model's output is unchanged (fp32) and
    the kernel ran (counted)."""
    import transformers.models.llama.modeling_llama as ml

    import specdec.kernels as K

    calls = []
    kernel = K.rope
    monkeypatch.setattr(K, "rope", lambda *a: (calls.append(1), kernel(*a))[1])
    model = tiny("llama", num_hidden_layers=2).to(DEV).eval()
    sites = [e for e in fusable(model) if isinstance(e[0], RopeSite)]
    original = ml.apply_rotary_pos_emb
    x = torch.randint(0, 50, (2, 7), device=DEV)
    with torch.no_grad():
        want = model(x).logits
        assert not calls
        with fused_forwards(sites):
            swapped = ml.apply_rotary_pos_emb
            assert swapped is not original
            with fused_forwards(sites):
                assert ml.apply_rotary_pos_emb is swapped
            assert ml.apply_rotary_pos_emb is swapped  # the outer context still holds it
            got = model(x).logits
        assert ml.apply_rotary_pos_emb is original
    assert len(calls) == 2  # one per layer
    assert torch.equal(got, want)
