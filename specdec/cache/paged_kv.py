"""PagedKVCache: per-layer K/V page pools addressed by slot, with write, gather and compaction.

Layout: k, v [L, num_slots, Hkv, D] with num_slots = num_blocks * block_size, allocated on the first
write (dtype, device, heads and head size come from the model's own key states).
"""

from __future__ import annotations

import torch


class PagedKVCache:
    """K/V storage for L layers; slots come from a BlockManager.

    Examples
    --------
    >>> cache = PagedKVCache(num_layers=1, num_blocks=2, block_size=4)
    >>> k = torch.randn(1, 2, 3, 8)                       # [B, Hkv, T, D]
    >>> cache.write(0, torch.tensor([[5, 6, -1]]), k, k)  # -1: not stored
    >>> cache.gather(0, torch.tensor([[5, 6]]))[0].shape
    torch.Size([1, 2, 2, 8])
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int):
        self.num_layers = num_layers
        self.num_slots = num_blocks * block_size
        self.block_size = block_size
        self.k: torch.Tensor | None = None  # [L, S, Hkv, D]
        self.v: torch.Tensor | None = None

    def _ensure(self, like: torch.Tensor) -> None:
        if self.k is None:
            _, H, _, D = like.shape
            shape = (self.num_layers, self.num_slots, H, D)
            self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def layer(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The [S, Hkv, D] K and V pools of one layer (allocated like `like` [B, Hkv, T, D])."""
        self._ensure(like)
        return self.k[layer], self.v[layer]

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store key/value [B, Hkv, T, D] at slots [B, T]; slots < 0 are skipped (padding)."""
        self._ensure(key)
        keep = slots >= 0
        idx = slots[keep]
        self.k[layer, idx] = key.transpose(1, 2)[keep].to(self.k.dtype)
        self.v[layer, idx] = value.transpose(1, 2)[keep].to(self.v.dtype)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, Hkv, S, D] at slots [B, S]; entries with slot < 0 read slot 0 (mask them)."""
        idx = slots.clamp(min=0)
        k = self.k[layer, idx]  # [B, S, H, D]
        v = self.v[layer, idx]
        return k.transpose(1, 2), v.transpose(1, 2)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slot src[i] to dst[i] in every layer at once (accepted-path compaction).

        Sources are read before any destination is written, so overlapping lists are safe.
        """
        if self.k is None or src.numel() == 0:
            return
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def compact(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move slot src[b, k] to dst[b, k] in every layer (src < 0: nothing). src, dst [B, K];
        dst increases along k and src >= dst, as for an accepted tree path. One launch on the GPU."""
        if self.k is None or src.numel() == 0:
            return
        if self.k.is_cuda:
            from specdec.kernels import compact_kv

            compact_kv(self.k, self.v, src.to(torch.int32).contiguous(), dst.to(torch.int32).contiguous())
            return
        move = (src >= 0) & (src != dst)
        self.copy_slots(src[move], dst[move])

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-write): pairs of (src_block, dst_block)."""
        if not pairs or self.k is None:
            return
        bs = self.block_size
        off = torch.arange(bs, device=self.k.device)
        src = torch.cat([off + s * bs for s, _ in pairs])
        dst = torch.cat([off + d * bs for _, d in pairs])
        self.copy_slots(src, dst)
