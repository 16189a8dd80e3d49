"""Build the AttentionMetadata of a prefill chunk or a tree step from block tables.

Slot of position t in a row: table[t // bs] * bs + t % bs. Dims: B rows, T queries, S keys,
N tree nodes, P prefix keys.
"""

from __future__ import annotations

import torch

from ..cache.block_manager import BlockManager
from ..cache.paged_kv import PagedKVCache
from ..devices import to_device
from ..tree import DraftTree
from .base import AttentionMetadata


def slots_of(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """tables [B, M], positions [B, X] (< M * bs, or < 0 for padding) -> slots [B, X], -1 where pos < 0."""
    pos = positions.clamp(min=0)
    slots = tables.gather(1, pos // block_size) * block_size + pos % block_size
    return torch.where(positions >= 0, slots, -1)


def prefill_metadata(
    cache: PagedKVCache,
    bm: BlockManager,
    seq_ids: list[int],
    tokens: list[torch.Tensor],
    num_cached: list[int],
    device: torch.device,
    kernels: bool = False,
    gathered: bool = True,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Left-padded prefill of tokens[b][num_cached[b]:] (each row's prompt, [T_b]).

    Returns input_ids [B, T], positions [B, T] (padding: 0) and the metadata; the last column is
    every row's last token. width pads T to at least that many columns (a graph's token bucket).
    """
    B = len(seq_ids)
    host_lengths = [len(t) for t in tokens]
    T = max(max(n - c for n, c in zip(host_lengths, num_cached, strict=True)), width or 0)
    S = max(host_lengths)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    for b, t in enumerate(tokens):
        n = len(t) - num_cached[b]
        input_ids[b, T - n :] = t[num_cached[b] :]
    lengths = to_device(torch.tensor(host_lengths), device)
    cached = to_device(torch.tensor(num_cached), device)
    input_ids = to_device(input_ids, device)
    col = torch.arange(T, device=device)
    q_pos = lengths[:, None] - T + col  # [B, T] right-aligned positions
    q_valid = q_pos >= cached[:, None]
    q_pos = torch.where(q_valid, q_pos, -1)
    tables = to_device(bm.block_tables(seq_ids, width=bm.blocks_needed(S)), device)
    write_slots = slots_of(tables, q_pos, bm.block_size)
    meta = AttentionMetadata(cache=cache, write_slots=write_slots, q_positions=q_pos.clamp(min=0))
    if gathered:
        kv_pos = torch.arange(S, device=device).expand(B, S)
        kv_pos = torch.where(kv_pos < lengths[:, None], kv_pos, -1)
        meta.kv_slots = slots_of(tables, kv_pos, bm.block_size)
        meta.kv_positions = kv_pos.clamp(min=0)
        meta.mask = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]
    if kernels:
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))
        _add_paged(
            meta, tables, cached, write_slots, causal & q_valid[:, None, :] & q_valid[:, :, None], max(num_cached)
        )
    return input_ids, q_pos.clamp(min=0), meta


def _add_paged(meta: AttentionMetadata, tables, prefix_lens, new_slots, new_mask, max_prefix: int) -> None:
    meta.block_tables = tables.to(torch.int32)
    meta.prefix_lens = prefix_lens.to(torch.int32)
    meta.new_slots = new_slots.to(torch.int32).contiguous()
    meta.new_mask = new_mask
    meta.max_prefix = int(max_prefix)


def tree_metadata(
    cache: PagedKVCache,
    bm: BlockManager,
    seq_ids: list[int],
    tree: DraftTree,
    device: torch.device,
    kernels: bool = False,
    gathered: bool = True,
    offset: int = 0,
    advance: torch.Tensor | None = None,
    max_advance: int = 0,
) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
    """Metadata of one tree step; the rows' lookahead slots must already be reserved.

    Node i of row b is stored at logical position L_b + i (L_b = committed length) and has position
    id L_b + depth[b, i]. Returns positions [B, N], the metadata, and node_slots [B, N].
    gathered=False skips the gathered form (the CUDA-graph path reads only the paged form).
    offset > 0 places the tree that many reserved (already written) positions later: the draft
    model's chain steps write into one lookahead reservation without committing in between.
    advance [B] (device, <= max_advance): more positions before the tree that only the device
    knows (a step in flight commits them: the pipelined speculative loop).
    """
    B, N = tree.tokens.shape
    host_committed = [bm.num_tokens(s) + offset for s in seq_ids]
    P = max(host_committed) + (max_advance if advance is not None else 0)
    committed = to_device(torch.tensor(host_committed), device)  # [B]
    if advance is not None:
        committed = committed + advance.to(device)
    tables = to_device(bm.block_tables(seq_ids, width=bm.blocks_needed(P + N)), device)
    node_slots = slots_of(tables, committed[:, None] + torch.arange(N, device=device), bm.block_size)
    positions = tree.positions(committed)  # [B, N]
    anc = tree.ancestor_mask() & tree.valid()[:, None, :]  # [B, N, N]
    meta = AttentionMetadata(cache=cache, write_slots=node_slots, q_positions=positions)
    if gathered:
        prefix_pos = torch.arange(P, device=device).expand(B, P)
        prefix_pos = torch.where(prefix_pos < committed[:, None], prefix_pos, -1)
        meta.kv_slots = torch.cat([slots_of(tables, prefix_pos, bm.block_size), node_slots], 1)
        meta.kv_positions = torch.cat([prefix_pos.clamp(min=0), positions], 1)
        meta.mask = torch.cat([(prefix_pos >= 0)[:, None, :].expand(B, N, P), anc], 2)
    if kernels:
        _add_paged(meta, tables, committed, node_slots, anc, P)
    return positions, meta, node_slots
