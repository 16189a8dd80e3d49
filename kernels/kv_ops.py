"""KV store into slots and accepted-path compaction across all layers (Triton), with torch references.

Cache layout: k, v [L, S, Hkv, D] (all layers; one layer is a [S, Hkv, D] view).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "sn_b", "sn_h", "sv_b", "sv_h"])  # they follow T: see paged_attention
def _store_kernel(Kn, Vn, Kc, Vc, Slots, T, sn_b, sn_t, sn_h, sv_b, sv_t, sv_h, sc_s, sc_h, D: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    b = i // T
    t = i % T
    slot = tl.load(Slots + i).to(tl.int64)
    d = tl.arange(0, D)
    ok = d < tl.where(slot >= 0, D, 0)
    dst = slot * sc_s + h * sc_h + d
    tl.store(Kc + dst, tl.load(Kn + b * sn_b + t * sn_t + h * sn_h + d, mask=ok), mask=ok)
    tl.store(Vc + dst, tl.load(Vn + b * sv_b + t * sv_t + h * sv_h + d, mask=ok), mask=ok)


def store_kv(
    k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write k_new, v_new [B, T, Hkv, D] (any strides, last dim contiguous) to the layer pools
    k_cache, v_cache [S, Hkv, D] at slots [B, T] (contiguous int); slots < 0 are skipped."""
    B, T, Hkv, D = k_new.shape
    assert k_cache.shape[1:] == (Hkv, D) and k_cache.stride(-1) == 1 and k_new.stride(-1) == 1
    assert v_new.shape == k_new.shape and v_new.stride(-1) == 1
    assert v_cache.stride() == k_cache.stride() and slots.is_contiguous()
    assert k_new.dtype == k_cache.dtype, f"K/V dtype {k_new.dtype} != cache dtype {k_cache.dtype}"
    assert D & (D - 1) == 0, f"head size {D} must be a power of two"
    _store_kernel[(B * T, Hkv)](
        k_new,
        v_new,
        k_cache,
        v_cache,
        slots,
        T,
        k_new.stride(0),
        k_new.stride(1),
        k_new.stride(2),
        v_new.stride(0),
        v_new.stride(1),
        v_new.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        D=D,
    )


def store_kv_reference(k_new, v_new, k_cache, v_cache, slots) -> None:
    keep = slots >= 0
    k_cache[slots[keep].long()] = k_new[keep]
    v_cache[slots[keep].long()] = v_new[keep]


@triton.jit(do_not_specialize=["K"])
def _compact_kernel(Kc, Vc, Src, Dst, K, sc_l, sc_s, sc_h, BLOCK_D: tl.constexpr, D: tl.constexpr):
    layer = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    base = layer * sc_l + h * sc_h
    for k in range(0, K):  # in depth order: a source is never a destination written before it is read
        src = tl.load(Src + b * K + k).to(tl.int64)
        dst = tl.load(Dst + b * K + k).to(tl.int64)
        ok = d < tl.where((src >= 0) & (src != dst), D, 0)
        kv = tl.load(Kc + base + src * sc_s + d, mask=ok)
        tl.store(Kc + base + dst * sc_s + d, kv, mask=ok)
        vv = tl.load(Vc + base + src * sc_s + d, mask=ok)
        tl.store(Vc + base + dst * sc_s + d, vv, mask=ok)


def compact_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Move slot src[b, k] to dst[b, k] in every layer, one launch. src, dst [B, K] contiguous int;
    src < 0 or src == dst: nothing to do. dst must increase along k and src[b, k] >= dst[b, k]
    (an accepted path moves towards the root), which makes the in-place order safe."""
    L, S, Hkv, D = k_cache.shape
    B, K = src.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert src.is_contiguous() and dst.is_contiguous() and dst.shape == (B, K)
    if B == 0 or K == 0:
        return
    _compact_kernel[(L, Hkv, B)](
        k_cache,
        v_cache,
        src,
        dst,
        K,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_D=triton.next_power_of_2(D),
        D=D,
    )


def compact_kv_reference(k_cache, v_cache, src, dst) -> None:
    move = (src >= 0) & (src != dst)
    s, t = src[move].long(), dst[move].long()
    k_cache[:, t] = k_cache[:, s]
    v_cache[:, t] = v_cache[:, s]
