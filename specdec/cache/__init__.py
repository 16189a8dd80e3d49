"""Paged KV cache: block bookkeeping (BlockManager) and the K/V tensors (PagedKVCache)."""

from .block_manager import BlockManager, OutOfBlocksError
from .paged_kv import PagedKVCache

__all__ = ["BlockManager", "OutOfBlocksError", "PagedKVCache"]
