"""Paged tree attention (Triton): split-KV over the committed prefix pages, a tree mask on the new keys.

One kernel serves plain decode (T = 1), tree verification (T = nodes) and prefill chunks (a causal
mask). GQA groups are folded into query rows: row r of a query tile is (query t = r // G, head
g = r % G) of one KV head; tiles of BLOCK_M rows cover T x G. Pass 1 writes per-split partial softmax
states; pass 2 merges them. What transformers' attention layers may ask for besides the mask: a
sliding window (key visible iff q_pos - k_pos < window; Mistral, Qwen2, Gemma2), logit softcapping
(s <- c tanh(s / c); Gemma2) and attention sinks (one extra logit per head in the softmax
denominator; GPT-OSS). Head sizes need not be powers of two (padded to one).
Dims: B rows, T new tokens, H query heads, Hkv KV heads, G = H / Hkv, D head size, S cache slots.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _softcap(s, cap):
    """cap * tanh(s / cap), through exp (the interpreter has no tanh)."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))


# sizes and the strides that follow them (T, the splits, the batch) are not specialised: an eager
# prefill meets a new remainder length after every prefix-cache hit, and a specialisation on
# "divisible by 16" or "== 1" would compile a new variant (about a second) inside the call
@triton.jit(
    do_not_specialize=["T", "num_splits", "num_q_tiles", "window", "sq_b", "sn_b", "sm_b", "sm_q", "sp_b",
                       "sa_b", "sa_s", "sml_b", "sml_s"]
)  # fmt: skip
def _split_kernel(
    Q,
    K,
    V,
    Tables,
    PrefixLens,
    NewSlots,
    TreeMask,
    QPos,
    Acc,
    M,
    L,
    sq_b,
    sq_t,
    sq_h,
    sk_s,
    sk_h,
    st_b,
    sn_b,
    sm_b,
    sm_q,
    sp_b,
    sa_b,
    sa_s,
    sa_r,
    sa_h,
    sml_b,
    sml_s,
    sml_r,
    sml_h,
    scale,
    softcap,
    window,
    T,
    num_splits,
    num_q_tiles,
    G: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1) // num_q_tiles
    q_tile = tl.program_id(1) % num_q_tiles
    split = tl.program_id(2)
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    h = kvh * G + rows % G
    row_ok = t < T
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q_ptr = Q + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = tl.load(QPos + b * sp_b + t, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    prefix = tl.load(PrefixLens + b)
    # this row's prefix split evenly (in BLOCK_N steps) over the splits: the grid may be sized for a
    # longer prefix than this row has (CUDA graphs), and the work still spreads
    keys_per_split = tl.cdiv(tl.cdiv(prefix, num_splits), BLOCK_N) * BLOCK_N
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, prefix)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        page = tl.load(Tables + b * st_b + pos // PAGE, mask=ok, other=0)
        slot = page.to(tl.int64) * PAGE + pos % PAGE
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(K + slot[:, None] * sk_s + kvh * sk_h + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + slot[:, None] * sk_s + kvh * sk_h + d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_SOFTCAP:
            s = _softcap(s, softcap)
        vis = ok[None, :]
        if HAS_WINDOW:
            vis = vis & ((q_pos[:, None] - pos[None, :]) < window)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if split == 0:  # the new keys (tree nodes / prefill chunk), visible through the mask
        for j0 in range(0, T, BLOCK_T):
            j = j0 + tl.arange(0, BLOCK_T)
            j_ok = j < T
            slot = tl.load(NewSlots + b * sn_b + j, mask=j_ok, other=-1).to(tl.int64)
            j_ok = j_ok & (slot >= 0)  # padding tokens have no slot: never read through one
            kv_ok = j_ok[:, None] & d_ok[None, :]
            k = tl.load(K + slot[:, None] * sk_s + kvh * sk_h + d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(V + slot[:, None] * sk_s + kvh * sk_h + d[None, :], mask=kv_ok, other=0.0)
            vis = tl.load(
                TreeMask + b * sm_b + t[:, None] * sm_q + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0
            )
            vis = (vis != 0) & j_ok[None, :]
            if HAS_WINDOW:
                k_pos = tl.load(QPos + b * sp_b + j, mask=j_ok, other=0)
                vis = vis & ((q_pos[:, None] - k_pos[None, :]) < window)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            if HAS_SOFTCAP:
                s = _softcap(s, softcap)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    base = b * sml_b + split * sml_s + t * sml_r + h * sml_h
    tl.store(M + base, m_i, mask=row_ok)
    tl.store(L + base, l_i, mask=row_ok)
    if (split == 0) | (lo < hi):  # an idle split (a short prefix) writes only m = -inf: merge skips its acc
        a_ptr = Acc + b * sa_b + split * sa_s + t[:, None] * sa_r + h[:, None] * sa_h + d[None, :]
        tl.store(a_ptr, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_splits", "H", "sa_b", "sa_s", "sml_b", "sml_s", "so_b"])
def _merge_kernel(
    Acc,
    M,
    L,
    Sinks,
    Out,
    sa_b,
    sa_s,
    sa_r,
    sa_h,
    sml_b,
    sml_s,
    sml_r,
    sml_h,
    so_b,
    so_t,
    so_h,
    num_splits,
    H,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1)
    h = tl.program_id(2)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    base = b * sml_b + s * sml_s + t * sml_r + h * sml_h
    m = tl.load(M + base, mask=s_ok, other=float("-inf"))
    l = tl.load(L + base, mask=s_ok, other=0.0)
    sink = tl.full([], float("-inf"), tl.float32)
    if HAS_SINKS:  # the sink's logit joins the softmax denominator and contributes no value
        sink = tl.load(Sinks + h).to(tl.float32)
    m_max = tl.maximum(tl.max(m, 0), sink)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(s_ok, tl.exp(m - m_max), 0.0)
    denom = tl.sum(w * l, 0) + tl.exp(sink - m_max)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    live = s_ok & (m != float("-inf"))  # splits that saw a key (others never wrote their acc)
    acc = tl.load(
        Acc + b * sa_b + s[:, None] * sa_s + t * sa_r + h * sa_h + d[None, :],
        mask=live[:, None] & d_ok[None, :],
        other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + b * so_b + t * so_t + h * so_h + d, out.to(Out.dtype.element_ty), mask=d_ok)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# programs the split grid aims for: two per SM of a 132-SM Hopper card
TARGET_PROGRAMS = 132 * 2


@dataclass(frozen=True)
class Tiles:
    """One launch's tile shapes: query rows (T x G folded), prefix keys and new keys a step."""

    block_m: int
    block_n: int
    block_t: int
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None  # None: enough programs to fill the card

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_t"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"Tiles.{name}={v!r}: tl.dot takes a power of two >= 16 (16, 32, 64, ...)")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"Tiles.num_splits={self.num_splits!r}: need >= 1, or None to fill the card")


@functools.lru_cache(maxsize=256)
def tile_config(T: int, G: int, D_PAD: int) -> Tiles:
    """The tiles for T new tokens of G query heads per KV head (few shapes: each one is a compile).

    16 query rows for decode, 64 for trees (T <= 64) and 128 for longer prefill chunks (more rows
    are more tiles); 16 or 64 new keys a step. Trees: on an H100 at the 8B shape (G = 4, D = 128,
    prefix 1024) 64-row tiles took 32- and 64-node trees from 41 to 18 and 22 us a layer against
    128-row ones (benchmarks/bench_attention.py, docs/benchmarks.md 2026-12-07 (c)).
    """
    rows = T * G
    block_m = min(16 if rows <= 16 else 64 if rows <= 64 or T <= 64 else 128, max(16, 16384 // D_PAD))
    return Tiles(
        block_m=block_m,
        block_n=64 if block_m <= 64 else 32,
        block_t=16 if T <= 16 else 64,
        num_warps=8 if D_PAD >= 256 else 4,
    )


def paged_tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    new_slots: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    page_size: int,
    max_prefix: int,
    num_splits: int | None = None,
    q_positions: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """Attention of T new tokens per row over their committed prefix and each other.

    Parameters
    ----------
    q : [B, T, H, D] queries (after RoPE).
    k_cache, v_cache : [S, Hkv, D] one layer's pools; the new tokens' K/V are already stored.
    block_tables : [B, max_blocks] int, page ids of each row.
    prefix_lens : [B] int, committed keys per row (visible to every new token, within the window).
    new_slots : [B, T] int, slots of the new tokens' K/V.
    tree_mask : [B, T, T] bool, new token t may see new token j (ancestors or causal).
    scale : softmax scale.
    page_size : tokens per page.
    max_prefix : an upper bound of prefix_lens (sizes the split; a python int, no device sync).
    num_splits : prefix splits (None: enough programs to fill the GPU).
    q_positions : [B, T] int, position ids of the new tokens (committed key p has position p);
        needed with sliding_window.
    sliding_window : key visible to query only if q_pos - k_pos < sliding_window (None: no window).
    softcap : logits s become softcap * tanh(s / softcap) before masking (None: off).
    sinks : [H] per-head sink logits added to the softmax denominator (None: off).
    tiles : the launch's tile shapes (None: `tile_config`'s; benchmarks/bench_attention.py sweeps them).

    Returns
    -------
    out : [B, T, H, D] in q's dtype.
    """
    B, T, H, D = q.shape
    S, Hkv, Dk = k_cache.shape
    assert Dk == D and H % Hkv == 0 and v_cache.shape == k_cache.shape, "cache layout must be [S, Hkv, D]"
    assert block_tables.dim() == 2 and tree_mask.shape == (B, T, T) and new_slots.shape == (B, T)
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert sliding_window is None or q_positions is not None, "a sliding window needs q_positions"
    assert sinks is None or sinks.shape == (H,), f"sinks must be [H={H}]"
    G = H // Hkv
    D_PAD = max(16, _next_pow2(D))
    tiles = tiles or tile_config(T, G, D_PAD)
    BLOCK_M, BLOCK_N, BLOCK_T, num_warps, num_stages = (
        tiles.block_m,
        tiles.block_n,
        tiles.block_t,
        tiles.num_warps,
        tiles.num_stages,
    )
    num_q_tiles = triton.cdiv(T * G, BLOCK_M)
    num_splits = num_splits or tiles.num_splits
    if num_splits is None:
        num_splits = max(
            1,
            min(triton.cdiv(max(max_prefix, 1), BLOCK_N), TARGET_PROGRAMS // max(B * Hkv * num_q_tiles, 1)),
        )
    if q_positions is None:
        q_positions = torch.zeros(B, T, dtype=torch.long, device=q.device)
    acc = torch.empty(B, num_splits, T, H, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, num_splits, T, H, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    mask = tree_mask.to(torch.int8)
    _split_kernel[(B, Hkv * num_q_tiles, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        prefix_lens,
        new_slots,
        mask,
        q_positions,
        acc,
        m,
        l,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        new_slots.stride(0),
        mask.stride(0),
        mask.stride(1),
        q_positions.stride(0),
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        acc.stride(3),
        m.stride(0),
        m.stride(1),
        m.stride(2),
        m.stride(3),
        scale,
        float(softcap or 1.0),
        int(sliding_window or 0),
        T,
        num_splits,
        num_q_tiles,
        G=G,
        PAGE=page_size,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_T=BLOCK_T,
        D=D,
        D_PAD=D_PAD,
        HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no tf32 rounding
        num_warps=num_warps,
        num_stages=num_stages,
    )
    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    _merge_kernel[(B, T, H)](
        acc,
        m,
        l,
        sinks if sinks is not None else m,  # unused without sinks
        out,
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        acc.stride(3),
        m.stride(0),
        m.stride(1),
        m.stride(2),
        m.stride(3),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        num_splits,
        H,
        BLOCK_S=max(16, _next_pow2(num_splits)),  # few variants: a new split count rarely compiles
        D=D,
        D_PAD=D_PAD,
        HAS_SINKS=sinks is not None,
    )
    return out


def paged_tree_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    new_slots: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    page_size: int,
    q_positions: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch oracle of `paged_tree_attention` (gather pages, one masked softmax), fp32."""
    B, T, H, D = q.shape
    Hkv = k_cache.shape[1]
    P = int(prefix_lens.max()) if B else 0
    pos = torch.arange(P, device=q.device)
    slots = block_tables.long().gather(1, (pos // page_size).expand(B, P)) * page_size + pos % page_size
    keys = torch.cat([slots, new_slots.long()], 1)  # [B, P + T]
    k = k_cache[keys].float()  # [B, P + T, Hkv, D]
    v = v_cache[keys].float()
    visible = torch.cat(
        [(pos[None, :] < prefix_lens[:, None]).expand(B, P)[:, None, :].expand(B, T, P), tree_mask.bool()], 2
    )  # [B, T, P + T]
    if sliding_window is not None:
        k_pos = torch.cat([pos.expand(B, P), q_positions.long()], 1)  # [B, P + T]
        visible = visible & ((q_positions.long()[:, :, None] - k_pos[:, None, :]) < sliding_window)
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible[:, None], float("-inf"))
    if sinks is not None:  # one more logit per head in the denominator, with no value
        s = torch.cat([s, sinks.float()[None, :, None, None].expand(B, H, T, 1)], -1)
    w = torch.nan_to_num(s.softmax(-1), nan=0.0)[..., : P + T]
    return torch.einsum("bhts,bshd->bthd", w, v).to(q.dtype)
