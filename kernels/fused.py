"""Fused RMSNorm and SiLU-gate kernels (Triton), with the torch formulas they replace as references.

transformers' Llama-style RMSNorm runs eight small kernels (cast, square, mean, add, rsqrt, multiply,
cast, weight multiply) and its gated MLP two more between the GEMMs (SiLU, multiply). In a decode
step of an 8B model each is a few microseconds of launch and memory round trip, ~600 of them per
forward; here each becomes one kernel that rounds where the torch formula rounds (the input dtype
after the normalisation, the activation's dtype after SiLU), so only the order of the mean's sum
differs from transformers' result.
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
