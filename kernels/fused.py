"""Fused RMSNorm, SiLU-gate and rotary-embedding kernels (Triton), with the torch formulas they
replace as references.

transformers' Llama-style RMSNorm runs eight small kernels (cast, square, mean, add, rsqrt, multiply,
cast, weight multiply) and its gated MLP two more between the GEMMs (SiLU, multiply). In a decode
step of an 8B model each is a few microseconds of launch and memory round trip, ~600 of them per
forward; here each becomes one kernel that rounds where the torch formula rounds (the input dtype
after the normalisation, the activation's dtype after SiLU), so only the order of the mean's sum
differs from transformers' result. transformers' `apply_rotary_pos_emb` runs eight more per layer
(two multiplies, a negation, a concatenation and an add, for q and for k); `rope` is one kernel for
both that rounds after each multiply and after the add, as torch does, so its output is transformers'
bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, W, Out, D, stride_x, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK)
    ok = d < D
    x = tl.load(X + row * stride_x + d, mask=ok, other=0.0).to(tl.float32)
    var = tl.sum(x * x, 0) / D
    y = (x * tl.rsqrt(var + eps)).to(X.dtype.element_ty)  # rounded to the input dtype, as transformers does
    w = tl.load(W + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * D + d, (w * y.to(tl.float32)).to(Out.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim: x [..., D], weight [D] -> [..., D] in
    the promoted dtype of weight and x (transformers' LlamaRMSNorm), one program per row."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim {D} of x")
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, D, x2.stride(0), eps, BLOCK=triton.next_power_of_2(D))
    return out.view(x.shape)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, as a function."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@triton.jit(do_not_specialize=["n"])
def _silu_mul_kernel(G, U, Out, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(G + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + i, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty)  # SiLU, rounded to its dtype as torch's is
    tl.store(Out + i, (act.to(tl.float32) * u).to(Out.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise: gate, up [..., I] of one shape and dtype -> [..., I]."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    BLOCK = 1024
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](g, u, out, n, BLOCK=BLOCK)
    return out


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _rope_kernel(
    Q, K, C, S, QO, KO, T, HQ,
    sqb, sqh, sqt, skb, skh, skt, scb, sct, ssb, sst,
    soqb, soqh, soqt, sokb, sokh, sokt,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # one (batch, position) row
    h = tl.program_id(1).to(tl.int64)  # a query head, then the key heads
    b = row // T
    t = row - b * T
    d = tl.arange(0, BLOCK)
    ok = d < HALF
    c1 = tl.load(C + b * scb + t * sct + d, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(C + b * scb + t * sct + HALF + d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(S + b * ssb + t * sst + d, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(S + b * ssb + t * sst + HALF + d, mask=ok, other=0.0).to(tl.float32)
    hv = h + d * 0  # the head as a vector: masks stay block-shaped (Triton's interpreter needs it)
    is_q = hv < HQ
    hk = h - HQ
    mq = ok & is_q
    mk = ok & (hv >= HQ)
    src_q = Q + b * sqb + h * sqh + t * sqt
    src_k = K + b * skb + hk * skh + t * skt
    x1 = tl.where(is_q, tl.load(src_q + d, mask=mq, other=0.0), tl.load(src_k + d, mask=mk, other=0.0)).to(tl.float32)
    x2 = tl.where(
        is_q, tl.load(src_q + HALF + d, mask=mq, other=0.0), tl.load(src_k + HALF + d, mask=mk, other=0.0)
    ).to(tl.float32)
    dt = QO.dtype.element_ty
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): each product rounded, then the sum
    lo = ((x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)).to(dt)
    hi = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    dst_q = QO + b * soqb + h * soqh + t * soqt
    dst_k = KO + b * sokb + hk * sokh + t * sokt
    tl.store(dst_q + d, lo, mask=mq)
    tl.store(dst_q + HALF + d, hi, mask=mq)
    tl.store(dst_k + d, lo, mask=mk)
    tl.store(dst_k + HALF + d, hi, mask=mk)


def rope_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope` takes these (else the caller runs the torch formula): q [B, Hq, T, D] and
    k [B, Hk, T, D] plain tensors of one dtype and device with unit stride in D (D even), cos and sin
    [B or 1, T, D] of that dtype with unit stride in D."""
    if not all(type(x) is torch.Tensor for x in (q, k, cos, sin)):  # no DTensor / subclass
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    B, _, T, D = q.shape
    if D % 2 or k.shape[0] != B or k.shape[2:] != (T, D) or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        return False
    if len({x.dtype for x in (q, k, cos, sin)}) != 1 or len({x.device for x in (q, k, cos, sin)}) != 1:
        return False
    return all(x.stride(-1) == 1 or x.shape[-1] == 1 for x in (q, k, cos, sin))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1) as one kernel:
    q [B, Hq, T, D], k [B, Hk, T, D], cos / sin [B or 1, T, D] (`rope_fits`) -> the rotated q and k,
    each laid out in memory as its input is (a [B, T, H, D] projection viewed as [B, H, T, D] stays
    so), equal to the formula's result bit for bit."""
    if not rope_fits(q, k, cos, sin):
        raise ValueError(
            f"rope: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, cos {tuple(cos.shape)} {cos.dtype}: "
            "need q [B, Hq, T, D] and k [B, Hk, T, D] with D even, cos / sin [B or 1, T, D], one dtype, "
            "unit stride in D"
        )
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko

    def sb(x):  # one cos / sin row for every batch row: stride 0
        return 0 if x.shape[0] == 1 else x.stride(0)

    _rope_kernel[(B * T, HQ + HK)](
        q, k, cos, sin, qo, ko, T, HQ,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        sb(cos), cos.stride(1), sb(sin), sin.stride(1),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        HALF=D // 2, BLOCK=max(16, triton.next_power_of_2(D // 2)), enable_fp_fusion=False,
    )  # fmt: skip
    return qo, ko


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' Llama `apply_rotary_pos_emb(q, k, cos, sin)`, as a function."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)

    def half(x):
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)

    return q * c + half(q) * s, k * c + half(k) * s
