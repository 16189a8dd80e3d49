"""Fused exact tree verification (Triton): one program walks one row's tree in node order.

It applies the same rules as `specdec.verify._verify_exact` (POINT: accept x with r(x), then drop x;
IID: accept with min(1, r(x)/q(x)), then r <- norm(max(0, r - q)); WOR: the same with q' = q without
the tokens of the earlier WOR siblings, renormalised) and samples the recovered or bonus token by
inverse CDF, touching the vocabulary only when a child is rejected. Dims: B rows, N nodes, V vocab,
K depth.

WOR without a mask over the vocabulary: a node is tested only after every earlier sibling was
rejected, and a rejected sampled child x leaves r(x) = 0 exactly (rejected means r(x) < q'(x), so
max(0, r(x) - q'(x)) = 0). The removed tokens therefore already have r = 0, and r - q'/s with the
unmasked q gives the masked result there; only the normaliser s = sum(q) - sum of q over the
removed tokens needs them (the siblings are distinct: `DraftTree.validate`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _walk_kernel(
    P,
    Q,
    R,
    Tokens,
    Parents,
    Depth,
    Law,
    NumNodes,
    Coins,
    Final,
    Path,
    Out,
    sp_b,
    sp_n,
    sq_b,
    sq_n,
    N,
    V,
    K,
    HAS_Q: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0)
    num = tl.load(NumNodes + b)
    cur = tl.zeros([], tl.int64)
    use_res = tl.zeros([], tl.int32)
    tested = tl.zeros([], tl.int32)
    offs = tl.arange(0, BLOCK_V)
    for i in range(1, N):
        parent = tl.load(Parents + b * N + i)
        if (i < num) & (parent == cur):
            x = tl.load(Tokens + b * N + i)
            law = tl.load(Law + b * N + i)
            p_x = tl.load(P + b * sp_b + cur * sp_n + x)
            r_x = tl.where(use_res != 0, tl.load(R + b * V + x), p_x)
            a = r_x
            den = tl.zeros([], tl.float32) + 1.0  # q' = q / den (IID: den = 1)
            if HAS_Q:
                if law == 2:  # WOR: normalise q without the earlier WOR siblings' tokens
                    removed = tl.zeros([], tl.float32)
                    for j in range(1, i):
                        if (tl.load(Parents + b * N + j) == parent) & (tl.load(Law + b * N + j) == 2):
                            removed += tl.load(Q + b * sq_b + i * sq_n + tl.load(Tokens + b * N + j))
                    qsum = tl.zeros([], tl.float32)
                    for v0 in range(0, V, BLOCK_V):
                        v = v0 + offs
                        qsum += tl.sum(tl.load(Q + b * sq_b + i * sq_n + v, mask=v < V, other=0.0), 0)
                    den = tl.where(qsum - removed > 0, qsum - removed, 1.0)
                if law != 0:
                    q_x = tl.load(Q + b * sq_b + i * sq_n + x) / den
                    a = tl.minimum(r_x / tl.where(q_x > 0, q_x, 1.0), 1.0)
            coin = tl.load(Coins + b * N + i)
            if coin < a.to(tl.float64):
                cur = cur * 0 + i
                use_res = use_res * 0
                tested = tested * 0
                d = tl.load(Depth + b * N + i)
                tl.store(Path + b * K + d - 1, i)
            else:
                tested = tested * 0 + 1
                # residual: POINT drops x; IID / WOR take max(0, r - q'). Two passes: mass, then normalise.
                total = tl.zeros([], tl.float32)
                for v0 in range(0, V, BLOCK_V):
                    v = v0 + offs
                    ok = v < V
                    r = tl.where(
                        use_res != 0,
                        tl.load(R + b * V + v, mask=ok, other=0.0),
                        tl.load(P + b * sp_b + cur * sp_n + v, mask=ok, other=0.0),
                    )
                    new = tl.where(v == x, 0.0, r)
                    if HAS_Q:
                        if law != 0:
                            qv = tl.load(Q + b * sq_b + i * sq_n + v, mask=ok, other=0.0) / den
                            new = tl.maximum(r - qv, 0.0)
                    total += tl.sum(tl.where(ok, new, 0.0), 0)
                    tl.store(R + b * V + v, new, mask=ok)
                if total > 0:
                    for v0 in range(0, V, BLOCK_V):
                        v = v0 + offs
                        ok = v < V
                        tl.store(R + b * V + v, tl.load(R + b * V + v, mask=ok, other=0.0) / total, mask=ok)
                else:  # a rounding accident left no mass: keep the previous residual (as the torch walk)
                    for v0 in range(0, V, BLOCK_V):
                        v = v0 + offs
                        ok = v < V
                        r = tl.where(
                            use_res != 0,
                            tl.load(R + b * V + v, mask=ok, other=0.0),
                            tl.load(P + b * sp_b + cur * sp_n + v, mask=ok, other=0.0),
                        )
                        tl.store(R + b * V + v, r, mask=ok)
                use_res = use_res * 0 + 1
    # the next token: inverse CDF of r (the residual, or p at the last accepted node), in fp64
    mass = tl.zeros([], tl.float64)
    last_pos = tl.zeros([], tl.int64)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs
        ok = v < V
        r = tl.where(
            use_res != 0,
            tl.load(R + b * V + v, mask=ok, other=0.0),
            tl.load(P + b * sp_b + cur * sp_n + v, mask=ok, other=0.0),
        ).to(tl.float64)
        mass += tl.sum(r, 0)
        last_pos = tl.maximum(last_pos, tl.max(tl.where(ok & (r > 0), v, 0).to(tl.int64), 0))
    target = tl.load(Final + b) * mass
    carry = tl.zeros([], tl.float64)
    pick = tl.zeros([], tl.int64) + V
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs
        ok = v < V
        r = tl.where(
            use_res != 0,
            tl.load(R + b * V + v, mask=ok, other=0.0),
            tl.load(P + b * sp_b + cur * sp_n + v, mask=ok, other=0.0),
        ).to(tl.float64)
        c = tl.cumsum(r, 0) + carry
        hit = ok & (c > target)
        first = tl.min(tl.where(hit, v, V), 0).to(tl.int64)
        pick = tl.minimum(pick, first)
        carry += tl.sum(r, 0)
    pick = tl.minimum(pick, last_pos)
    tl.store(Out + b * 3 + 0, pick)
    tl.store(Out + b * 3 + 1, cur)
    tl.store(Out + b * 3 + 2, 1 - tested)


def fused_tree_walk(
    p: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    depth: torch.Tensor,
    law: torch.Tensor,
    num_nodes: torch.Tensor,
    coins: torch.Tensor,
    final_u: torch.Tensor,
    draft_probs: torch.Tensor | None,
    K: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact walk of `verify` for POINT / IID / WOR trees (WOR siblings distinct, as validated).

    p [B, N, V] fp32 processed target probabilities; tokens, parents, depth, law [B, N];
    num_nodes [B]; coins [B, N] and final_u [B] fp64 uniforms; draft_probs [B, N, V] or None; K the
    tree's max depth. Returns (accepted_indices [B, K], last accepted node [B], next token [B],
    is_bonus [B]).
    """
    B, N, V = p.shape
    assert p.dtype == torch.float32 and p.stride(-1) == 1 and coins.dtype == torch.float64
    dev = p.device
    path = torch.full((B, max(K, 1)), -1, dtype=torch.long, device=dev)
    out = torch.empty(B, 3, dtype=torch.long, device=dev)
    residual = torch.empty(B, V, dtype=torch.float32, device=dev)
    q = draft_probs.to(torch.float32).contiguous() if draft_probs is not None else p
    _walk_kernel[(B,)](
        p,
        q,
        residual,
        tokens.long().contiguous(),
        parents.long().contiguous(),
        depth.long().contiguous(),
        law.to(torch.int32).contiguous(),
        num_nodes.long().contiguous(),
        coins.contiguous(),
        final_u.to(torch.float64).contiguous(),
        path,
        out,
        p.stride(0),
        p.stride(1),
        q.stride(0),
        q.stride(1),
        N,
        V,
        max(K, 1),
        HAS_Q=draft_probs is not None,
        BLOCK_V=min(1024, triton.next_power_of_2(V)),
    )
    return path, out[:, 1], out[:, 0], out[:, 2].bool()
